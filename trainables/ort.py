"""ONNX Runtime, where models ship: export, INT8, the classifier users call, its session.

A deployable point is a file: the ONNX classifier built here, measured (accuracy, latency)
by running that very file in an ONNX Runtime session, and then registered, served and
exported as those bytes (``OrtModel.sha256`` names them). Its graph:

- :func:`export_core`: the network (fp32, masks baked in) -> ONNX with ``torch.onnx.export``'s
  ``torch.export``-based exporter (the TorchScript-based one is deprecated): input ``image``
  (normalised float NCHW), output ``logits``, a dynamic batch axis;
- :func:`quantize_core`: ONNX Runtime's static INT8 of that graph (QDQ, per-channel weights,
  ranges calibrated on training images) in one of the schemes of :data:`INT8_SCHEMES`;
- :func:`classifier`: the core with the preprocessing in front (``images``: uint8
  ``batch x H x W x C`` as decoded, the training normalisation inside) and ``label``,
  ``probabilities`` and ``class`` (the class name) behind.

The session runs like a deployment: ``intra_op_num_threads`` fixed, sequential execution,
every graph optimisation on, the CPU execution provider.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from trainables.data import MEAN, STD, Split
from trainables.errors import OrtError
from trainables.model import example_input

INPUT, OUTPUT = "image", "logits"  # the core network's
IMAGES, LABEL, PROBABILITIES, CLASS = "images", "label", "probabilities", "class"  # the classifier's

# ORT static INT8 schemes: activation type, weight type, reduce_range (7-bit weights). x86 CPUs
# without VNNI multiply u8 x s8 with VPMADDUBSW, whose pairwise sums saturate at 16 bits: "u8s8"
# (ORT's default types) lost 15 points on such a CPU. With 7-bit weights a pair sums to at most
# 2 x 255 x 64 = 32,640 < 32,767: "u8s8-7bit" cannot saturate (OpenVINO's workaround, PyTorch's x86
# default), and keeps ORT's fast u8 x s8 kernels; "s8s8" ran 1.2x faster than fp32 where u8s8-7bit
# ran 4x (experiments/bench_int8.py, BENCHMARKS.md), on a CPU with VNNI.
INT8_SCHEMES = {"s8s8": ("QInt8", "QInt8", False), "u8s8": ("QUInt8", "QInt8", False),
                "u8s8-7bit": ("QUInt8", "QInt8", True)}
INT8_SCHEME = "u8s8-7bit"


class OrtModel:
    """A serialised ONNX model and a CPU session over it. For a :func:`classifier` (what ships)
    :meth:`predict` and :meth:`evaluate` feed it uint8 images as decoded."""

    def __init__(self, onnx_bytes: bytes, threads: int = 1, name: str = "model") -> None:
        import onnxruntime as ort

        self.onnx_bytes, self.threads, self.name = onnx_bytes, threads, name
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # InvalidGraph, NotImplemented (an operator ORT lacks), ...
            raise OrtError(f"ONNX Runtime cannot load {name}: {_first_line(e)}") from None
        first = self.session.get_inputs()[0]
        self.input, self.input_shape = first.name, first.shape
        self.uint8 = first.type == "tensor(uint8)"

    @property
    def sha256(self) -> str:
        """What names these bytes: the registry, export and verification compare it."""
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Labels of uint8 images (``N x H x W x 3``), run through this classifier's session."""
        if not self.uint8:
            raise OrtError(f"{self.name} is not a classifier of uint8 images (its input is {self.input})")
        out = [self.session.run([LABEL], {self.input: images[i : i + batch_size]})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def evaluate(self, split: Split) -> tuple[float, np.ndarray]:
        """Top-1 accuracy (0-1) on ``split`` (uint8 NCHW as the data keeps it) and the labels it gave."""
        labels = self.predict(split.x.permute(0, 2, 3, 1).contiguous().cpu().numpy())
        return float((labels == split.y.cpu().numpy()).mean()) if len(labels) else 0.0, labels

    def feed(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """A fixed random input batch of this model's input type and shape (for timing)."""
        shape = [batch_size, *(d if isinstance(d, int) else 1 for d in self.input_shape[1:])]
        rng = np.random.default_rng(0)
        if self.uint8:
            return {self.input: rng.integers(0, 256, shape, dtype=np.uint8)}
        return {self.input: rng.standard_normal(shape, dtype=np.float32)}

    def latency(self, *, runs: int = 50, warmup: int = 10, batch_size: int = 1) -> dict:
        """:func:`trainables.measure.cpu_latency` of this session (its own thread count)."""
        from trainables.measure import cpu_latency

        return cpu_latency(self, threads=self.threads, runs=runs, warmup=warmup, batch_size=batch_size)

    def size_mb(self) -> float:
        """Bytes of the .onnx file, zip-deflated (level 1) like ``measure.size_mb``, in MB."""
        packed = io.BytesIO()
        with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            archive.writestr("model.onnx", self.onnx_bytes)
        return len(packed.getvalue()) / 1e6

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.onnx_bytes)


def labels_digest(labels: np.ndarray) -> str:
    """A short hash of a label sequence: two runs that gave the very same labels share it."""
    return hashlib.sha256(np.asarray(labels, dtype="<i8").tobytes()).hexdigest()[:16]


def export_core(model: nn.Module, name: str = "model") -> bytes:
    """``model`` (fp32, masks baked in, on any device) -> ONNX bytes for images of its size
    with a dynamic batch axis, exported with the ``torch.export``-based exporter."""
    example = example_input(model)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model.cpu().eval(), (example,), dynamo=True, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
    except Exception as e:
        raise OrtError(f"cannot export {name} to ONNX: {_first_line(e)}") from None
    return program.model_proto.SerializeToString()


def quantize_core(core: bytes, calibration: torch.Tensor, name: str = "model", scheme: str = INT8_SCHEME) -> bytes:
    """ORT static INT8 of an exported core: QDQ format, per-channel symmetric weights, MinMax
    activation ranges from ``calibration`` (float, normalised NCHW images), types by ``scheme``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    activations, weights, seven_bit = INT8_SCHEMES[scheme]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            images = calibration.cpu().numpy().astype(np.float32)
            self.batches = iter(np.array_split(images, max(1, len(images) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    with tempfile.TemporaryDirectory(prefix="prunetune-ort-") as d:
        raw, pre, out = (os.path.join(d, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(raw).write_bytes(core)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(raw, pre, skip_symbolic_shape=True)
                quantize_static(pre, out, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=getattr(QuantType, activations), weight_type=getattr(QuantType, weights),
                                reduce_range=seven_bit)
        except Exception as e:
            raise OrtError(f"ONNX Runtime cannot quantize {name}: {_first_line(e)}") from None
        return Path(out).read_bytes()


def classifier(core: bytes, classes: Sequence[str], mean: Sequence[float] = MEAN,
               std: Sequence[float] = STD) -> bytes:
    """``core`` with the preprocessing in front and the answer behind: input ``images`` (uint8
    ``batch x H x W x C``, RGB (or grey) as decoded), outputs ``label`` (int64), ``probabilities`` and
    ``class`` (the label's name). The core graph is kept node for node (its names prefixed
    ``core_``); ``mean`` and ``std`` are the training normalisation (0-1 scale)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(core)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    _, channels, height, width = (d.dim_value or "batch" for d in model.graph.input[0].type.tensor_type.shape.dim)

    def graph_model(nodes, inputs, outputs, inits=()):
        g = helper.make_graph(nodes, "io", inputs, outputs, initializer=list(inits))
        return helper.make_model(g, opset_imports=opsets, ir_version=model.ir_version)

    pre = graph_model([
        helper.make_node("Cast", [IMAGES], ["pre_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_float"], ["pre_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["pre_nchw", "pre_mean"], ["pre_centred"]),
        helper.make_node("Div", ["pre_centred", "pre_std"], ["pre_image"]),
    ], [helper.make_tensor_value_info(IMAGES, TensorProto.UINT8, ["batch", height, width, channels])],
        [helper.make_tensor_value_info("pre_image", TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor("pre_mean", TensorProto.FLOAT, [1, channels, 1, 1], [m * 255 for m in mean]),
         helper.make_tensor("pre_std", TensorProto.FLOAT, [1, channels, 1, 1], [s * 255 for s in std])])
    post = graph_model([
        helper.make_node("Softmax", ["core_" + OUTPUT], [PROBABILITIES], axis=1),
        helper.make_node("ArgMax", ["core_" + OUTPUT], [LABEL], axis=1, keepdims=0),
        helper.make_node("Gather", ["post_names", LABEL], [CLASS], axis=0),
    ], [helper.make_tensor_value_info("core_" + OUTPUT, TensorProto.FLOAT, ["batch", len(classes)])],
        [helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", len(classes)]),
         helper.make_tensor_value_info(CLASS, TensorProto.STRING, ["batch"])],
        [helper.make_tensor("post_names", TensorProto.STRING, [len(classes)], [c.encode() for c in classes])])
    front = onnx.compose.merge_models(pre, model, io_map=[("pre_image", INPUT)], prefix2="core_")
    whole = onnx.compose.merge_models(front, post, io_map=[("core_" + OUTPUT, "core_" + OUTPUT)])
    onnx.checker.check_model(whole)
    return whole.SerializeToString()


def build(model: nn.Module, classes: Sequence[str], stats: tuple[Sequence[float], Sequence[float]], *,
          threads: int = 1, name: str = "model", calibration: torch.Tensor | None = None) -> list[OrtModel]:
    """The shipped classifiers of ``model`` (fp32, masks baked in) for its images, normalised with
    ``stats`` (the training mean and std): its fp32 one and, given ``calibration`` images, its
    INT8 one, each loaded in a session of ``threads`` threads."""
    core = export_core(model, name)
    out = [OrtModel(classifier(core, classes, *stats), threads, name)]
    if calibration is not None:
        out.append(OrtModel(classifier(quantize_core(core, calibration, name), classes, *stats), threads,
                            f"{name} (int8)"))
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
