"""A compressed model as users call it: uint8 images in, the label and class probabilities out.

A network's input is a normalised float NCHW tensor, and its output raw logits: calling it
right takes the training normalisation, which the network does not carry. Everything that
leaves a search does carry it:

- the deployable points are ONNX classifiers (:func:`trainables.ort.classifier`), and
  :func:`log_model` logs one for MLflow's registry with MLflow's ONNX flavour (ONNX Runtime
  loads it; nothing of ours runs), a signature that names the input (``uint8``,
  ``-1 x H x W x C``) and the outputs, a real image as input example, requirements pinned to the
  versions that measured it, and the point's metrics on the logged model;
- :class:`Classifier` and :func:`torchscript`: the same in eager PyTorch, for
  ``prunetune export --format torchscript`` only (TorchScript and torch's quantized tensors
  are deprecated; the ONNX file is what a search measured).
"""
from __future__ import annotations

import io
import warnings
from importlib import metadata

import numpy as np
import torch
import torch.nn as nn

from trainables.model import input_shape
from trainables.ort import CLASS, LABEL, PROBABILITIES


class Classifier(nn.Module):
    """uint8 images (N x H x W x C, as decoded from a PNG or JPEG) -> class probabilities;
    ``stats``: the training mean and std (0-1 scale, per channel)."""

    def __init__(self, model: nn.Module, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(stats[0]).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(stats[1]).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return torch.softmax(self.model(x), dim=1)


def torchscript(model: nn.Module, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> bytes:
    """The traced :class:`Classifier` of ``model`` (fp32 or FX INT8) for its images, serialised."""
    c, h, w = input_shape(model)
    example = torch.zeros(1, h, w, c, dtype=torch.uint8)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit is deprecated": still the most portable torch format
        torch.jit.save(torch.jit.trace(Classifier(model.eval(), stats), example), buffer)
    return buffer.getvalue()


def requirements() -> list[str]:
    """Pinned to the versions installed here (the ones that built and measured the model)."""
    return [f"{n}=={metadata.version(n).split('+')[0]}" for n in ("mlflow", "numpy", "pandas", "onnx", "onnxruntime")]


# MLflow copies the active run's metrics of the step a model is logged at onto the model: logged at a
# step no metric of the run has, each point's model carries its own metrics only (logged at step 0).
_MODEL_STEP = 1


def log_model(packed: bytes, name: str, registered_name: str, example: np.ndarray, classes: list[str],
              metrics: dict[str, float], params: dict[str, str]) -> int:
    """Log the ONNX classifier ``packed`` (its bytes kept as they are) on the active MLflow run
    under the logged-model ``name`` with ``metrics`` and ``params``, and register it under
    ``registered_name``; returns the new version. ``example``: real uint8 images (N x H x W x C)."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *example.shape[1:]))])  # unnamed: "inputs" is the batch
    outputs = Schema([TensorSpec(np.dtype(np.int64), (-1,), LABEL),
                      TensorSpec(np.dtype(np.float32), (-1, len(classes)), PROBABILITIES),
                      TensorSpec(np.dtype(object), (-1,), CLASS)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.onnx.log_model(onnx.load_from_string(packed), name=name, signature=ModelSignature(inputs, outputs),
                                     input_example=example, registered_model_name=registered_name,
                                     pip_requirements=requirements(), await_registration_for=60,
                                     save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
                                     params=params, step=_MODEL_STEP)
    mlflow.log_metrics(metrics, step=0, model_id=info.model_id)
    return int(info.registered_model_version)
