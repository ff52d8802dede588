"""A compressed model as users call it: uint8 images in, the label and class probabilities out.

A network's input is a normalised float NCHW tensor, and its output raw logits: calling it
right takes the training normalisation, which the network does not carry. Everything that
leaves a search does carry it:

- :class:`Classifier` wraps a model (fp32 or torch INT8) with the preprocessing (uint8
  ``batch x 32 x 32 x 3`` -> normalised NCHW) and a softmax; :func:`torchscript` traces it, so
  the file needs only torch to load;
- :func:`onnx_classifier` composes an ONNX model (the very graph the search timed in ONNX
  Runtime, fp32 or ORT INT8) with the same preprocessing and with ``label`` / ``probabilities``
  outputs;
- :func:`log_model` logs either for MLflow's registry: the TorchScript one as a pyfunc from
  code (``tuning/serving_model.py``: a table with ``label``, ``class`` and one ``prob_<class>``
  column per class), the ONNX one with MLflow's ONNX flavour; both with a signature that names
  the input (``uint8``, ``-1 x 32 x 32 x 3``), a real image as input example and requirements
  pinned to the versions that made them.
"""
from __future__ import annotations

import io
import json
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from trainables.data import MEAN, STD
from trainables.ort import INPUT, OUTPUT

IMAGES, LABEL, PROBABILITIES = "images", "label", "probabilities"
SERVING_MODEL = Path(__file__).with_name("serving_model.py")


class Classifier(nn.Module):
    """uint8 images (N x 32 x 32 x 3, as decoded from a PNG or JPEG) -> class probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return torch.softmax(self.model(x), dim=1)


def torchscript(model: nn.Module) -> bytes:
    """The traced :class:`Classifier` of ``model`` (fp32 or FX INT8), serialised."""
    example = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit is deprecated": still the most portable torch format
        torch.jit.save(torch.jit.trace(Classifier(model.eval()), example), buffer)
    return buffer.getvalue()


def onnx_classifier(core: bytes) -> bytes:
    """``core`` (input ``image``: normalised float NCHW, output ``logits``) with the preprocessing
    in front (input ``images``: uint8 NHWC) and ``label`` (int64) / ``probabilities`` behind. The
    core graph is kept node for node (its names prefixed ``core_``)."""
    model = onnx.load_from_string(core)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]

    def graph_model(nodes, inputs, outputs, inits=()):
        g = helper.make_graph(nodes, "io", inputs, outputs, initializer=list(inits))
        return helper.make_model(g, opset_imports=opsets, ir_version=model.ir_version)

    mean = helper.make_tensor("pre_mean", TensorProto.FLOAT, [1, 3, 1, 1], [m * 255 for m in MEAN])
    std = helper.make_tensor("pre_std", TensorProto.FLOAT, [1, 3, 1, 1], [s * 255 for s in STD])
    pre = graph_model([
        helper.make_node("Cast", [IMAGES], ["pre_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_float"], ["pre_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["pre_nchw", "pre_mean"], ["pre_centred"]),
        helper.make_node("Div", ["pre_centred", "pre_std"], ["pre_image"]),
    ], [helper.make_tensor_value_info(IMAGES, TensorProto.UINT8, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("pre_image", TensorProto.FLOAT, ["batch", 3, 32, 32])], [mean, std])
    post = graph_model([
        helper.make_node("Softmax", ["core_" + OUTPUT], [PROBABILITIES], axis=1),
        helper.make_node("ArgMax", ["core_" + OUTPUT], [LABEL], axis=1, keepdims=0),
    ], [helper.make_tensor_value_info("core_" + OUTPUT, TensorProto.FLOAT, ["batch", None])],
        [helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", None])])
    front = onnx.compose.merge_models(pre, model, io_map=[("pre_image", INPUT)], prefix2="core_")
    whole = onnx.compose.merge_models(front, post, io_map=[("core_" + OUTPUT, "core_" + OUTPUT)])
    onnx.checker.check_model(whole)
    return whole.SerializeToString()


def requirements(onnx_flavour: bool = False) -> list[str]:
    """Pinned to the versions installed here (the ones that trained and packed the model)."""
    names = ["mlflow", "numpy", "pandas"] + (["onnx", "onnxruntime"] if onnx_flavour else ["torch", "torchvision"])
    return [f"{n}=={metadata.version(n).split('+')[0]}" for n in names]


def log_model(packed: bytes, onnx_flavour: bool, name: str, registered_name: str, example: np.ndarray,
              classes: list[str]) -> int:
    """Log a packed model (:func:`torchscript` or :func:`onnx_classifier`) on the active MLflow
    run and register it under ``registered_name``; returns the new version. ``example``: real
    uint8 images (N x 32 x 32 x 3), kept as the input example."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3))])  # unnamed: the request's "inputs" is the batch
    common = dict(name=name, input_example=example, registered_model_name=registered_name,
                  pip_requirements=requirements(onnx_flavour), await_registration_for=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if onnx_flavour:
            outputs = Schema([TensorSpec(np.dtype(np.int64), (-1,), LABEL),
                              TensorSpec(np.dtype(np.float32), (-1, len(classes)), PROBABILITIES)])
            info = mlflow.onnx.log_model(onnx.load_from_string(packed), signature=ModelSignature(inputs, outputs),
                                         **common)
        else:
            outputs = Schema([ColSpec("long", LABEL), ColSpec("string", "class")] +
                             [ColSpec("float", f"prob_{c}") for c in classes])
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "model.pt").write_bytes(packed)
                (Path(d) / "classes.json").write_text(json.dumps(classes))
                info = mlflow.pyfunc.log_model(
                    python_model=str(SERVING_MODEL), signature=ModelSignature(inputs, outputs),
                    artifacts={"model": str(Path(d) / "model.pt"), "classes": str(Path(d) / "classes.json")}, **common)
    return int(info.registered_model_version)
