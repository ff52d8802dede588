"""ONNX Runtime as the latency target: export a compressed model, quantize it with ORT's own
static INT8, time and evaluate it in an ``InferenceSession``.

Most CPU deployments run ONNX Runtime, not PyTorch eager, and the two price the same network
differently (ORT fuses conv + BN + ReLU and picks its own kernels), so a front measured in eager
mode ranks models for a runtime nobody ships. With ``[sweep] runtime = "onnxruntime"`` every
point is exported with :func:`export`, INT8 points come from :func:`quantize` (QDQ, per-channel
symmetric INT8 weights, UINT8 activations calibrated on training images: ORT's tooling on top of
any pruning method, not ``torch.ao``), and accuracy and latency are measured by running that
same ONNX model. The session runs like a deployment: ``intra_op_num_threads`` fixed, sequential
execution, every graph optimisation on.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from trainables.errors import OrtError
from trainables.data import Split, normalize

INPUT, OUTPUT = "image", "logits"


class OrtModel:
    """A serialised ONNX model and a CPU session over it."""

    INPUT = INPUT

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

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """Logits of a float, normalised NCHW batch."""
        return self.session.run(None, {INPUT: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0]

    def evaluate(self, split: Split, batch_size: int = 256) -> float:
        """Top-1 accuracy (0-1) on ``split``, run through this session."""
        correct = 0
        for i in range(0, len(split), batch_size):
            x, y = normalize(split.x[i : i + batch_size].cpu()), split.y[i : i + batch_size].cpu().numpy()
            correct += int((self(x).argmax(1) == y).sum())
        return correct / max(len(split), 1)

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


def export(model: nn.Module, threads: int = 1, name: str = "model") -> OrtModel:
    """``model`` (fp32, masks baked in) -> ONNX with a dynamic batch axis, loaded in ORT."""
    example = torch.zeros(1, 3, 32, 32)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-based exporter deprecation notes
            torch.onnx.export(model.cpu().eval(), (example,), buffer, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    except Exception as e:
        raise OrtError(f"cannot export {name} to ONNX: {_first_line(e)}") from None
    return OrtModel(buffer.getvalue(), threads, name)


def quantize(fp32: OrtModel, calibration: torch.Tensor, name: str = "model") -> OrtModel:
    """ORT static INT8 of an exported fp32 model: QDQ format, per-channel symmetric INT8 weights,
    UINT8 activations with MinMax ranges from ``calibration`` (float, normalised NCHW images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            images = calibration.cpu().numpy().astype(np.float32)
            self.batches = iter(np.array_split(images, max(1, len(images) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    with tempfile.TemporaryDirectory(prefix="prunetune-ort-") as d:
        raw, pre, out = (os.path.join(d, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.save(raw)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(raw, pre, skip_symbolic_shape=True)
                quantize_static(pre, out, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as e:
            raise OrtError(f"ONNX Runtime cannot quantize {name}: {_first_line(e)}") from None
        return OrtModel(Path(out).read_bytes(), fp32.threads, f"{name} (int8)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
