"""The network a trial trains: ResNet18 by default, any torchvision classifier, or your own.

``[model]`` of an experiment file (:class:`ModelConfig`):

- ``arch``: ``"resnet18"`` (default), any torchvision classification model by name
  (``mobilenet_v3_small``, ``mobilenet_v3_large``, ``resnet50``, ``efficientnet_b0``, ...), or
  ``"package.module:function"``: your factory, called as ``function(num_classes=N)`` and
  returning an ``nn.Module`` that maps ``N x C x H x W`` floats to ``N x classes`` logits.
- ``stem``: ``"cifar"`` keeps small images at full resolution (ResNets: a 3x3 stride-1 first
  conv and no max-pool; other torchvision networks: the first conv at stride 1), ``"imagenet"``
  is the network as published. Empty (default): ``"cifar"`` up to 64 px, ``"imagenet"`` above.
- ``weights``: where training starts: empty (random), a file holding a state dict (a prunetune
  checkpoint works too), or a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or
  ``"ResNet18_Weights.IMAGENET1K_V1"``; fetched by torch.hub when online). Layers whose shape
  differs from the file's (the classifier for another class count, the first conv for another
  stem or channel count) start fresh, and say so.

The output layer is sized from the data and the first conv from its channels. A checkpoint
records :class:`Network` (arch, stem, classes, input shape), enough to build the network again;
a user factory is imported only when the experiment file being run names it (``trusted``), never
because a checkpoint says so: a checkpoint is a file anyone can hand over.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from trainables.errors import CheckpointError, ModelError

ARCH = "cifar_resnet18"  # what checkpoints before [model] recorded: resnet18, cifar stem, 3 x 32 x 32
DEFAULT_ARCH = "resnet18"
TRUST_ENV = "PRUNETUNE_TRUSTED_ARCH"
CIFAR_STEM_MAX = 64  # images up to this many pixels get the cifar stem by default
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# A built network carries its input shape (C, H, W) as this attribute, so what probes, traces,
# times or exports it (MACs, pruning, INT8, latency, ONNX) feeds it images of its own size.
_INPUT_ATTR = "prunetune_input_shape"


@dataclass
class ModelConfig:
    """The ``[model]`` section of an experiment file."""

    arch: str = DEFAULT_ARCH
    stem: Literal["", "cifar", "imagenet"] = ""
    weights: str = ""


@dataclass(frozen=True)
class Network:
    """What a checkpoint records of its network: enough to build it again."""

    arch: str
    stem: str
    num_classes: int
    input_shape: tuple[int, int, int]  # C x H x W

    @staticmethod
    def of(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> "Network":
        stem = cfg.stem or ("cifar" if max(input_shape[1:]) <= CIFAR_STEM_MAX else "imagenet")
        return Network(cfg.arch, stem, num_classes, tuple(input_shape))  # type: ignore[arg-type]

    @staticmethod
    def from_checkpoint(ckpt: dict[str, Any]) -> "Network":
        if ckpt["arch"] == ARCH:  # written before [model]
            return Network(DEFAULT_ARCH, "cifar", int(ckpt.get("num_classes", 10)), (3, 32, 32))
        return Network(ckpt["arch"], ckpt["stem"], int(ckpt["num_classes"]), tuple(ckpt["input_shape"]))

    def record(self) -> dict[str, Any]:
        return {"arch": self.arch, "stem": self.stem, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape)}


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """The default network at CIFAR's size: ResNet18, cifar stem, 3 x 32 x 32 (11.17 M parameters
    with 10 classes)."""
    return build(Network(DEFAULT_ARCH, "cifar", num_classes, (3, 32, 32)))


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """The C x H x W images ``model`` takes (3 x 32 x 32 for a network built before it was recorded)."""
    return getattr(model, _INPUT_ATTR, (3, 32, 32))


def example_input(model: nn.Module, batch_size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros of ``model``'s input shape: what tracing and probing feed it."""
    return torch.zeros(batch_size, *input_shape(model), device=device)


def carry_input_shape(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` (a quantized or traced copy of ``source``) takes ``source``'s images."""
    setattr(target, _INPUT_ATTR, input_shape(source))
    return target


def torchvision_archs() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def check_arch(arch: str) -> None:
    """A :class:`ModelError` naming the choices unless ``arch`` names a network."""
    if arch == DEFAULT_ARCH or _FACTORY.fullmatch(arch) or arch in torchvision_archs():
        return
    raise ModelError(f"[model] arch = {arch!r} names no network: use a torchvision classification model "
                     f"({', '.join(a for a in torchvision_archs() if a.startswith(('resnet', 'mobilenet', 'efficientnet')))}, "
                     "...) or your own factory as \"package.module:function\"")


def check(cfg: ModelConfig) -> None:
    """A :class:`ModelError` unless ``cfg`` names a network, and weights that are a file or a
    torchvision weights name of that network (whether the file is there is
    :func:`check_weights_file`'s, asked where training starts: a spec read back from a checkpoint
    to sweep or export it no longer needs the file it started from)."""
    check_arch(cfg.arch)
    if not cfg.weights or is_weights_file(cfg.weights):
        return
    if _FACTORY.fullmatch(cfg.arch):
        raise ModelError(f"[model] weights = {cfg.weights!r} is not a file, and torchvision has no weights for your "
                         f"factory {cfg.arch}: give a state-dict file")
    else:
        _weights_enum(cfg.weights, cfg.arch)


def check_weights_file(cfg: ModelConfig) -> None:
    """A :class:`ModelError` before any training when ``[model] weights`` names a file that is not there."""
    if cfg.weights and is_weights_file(cfg.weights) and not Path(cfg.weights).is_file():
        raise _no_weights_file(cfg.weights)


def _no_weights_file(path: str) -> ModelError:
    return ModelError(f"[model] weights = {path!r}: no such file; give a state-dict file or a torchvision weights "
                      "name such as \"DEFAULT\"")


def build(net: Network, trusted: str = "") -> nn.Module:
    """A freshly initialised ``net``. A factory arch is imported only when it equals ``trusted``
    (the ``[model] arch`` of the experiment file being run) or ``$PRUNETUNE_TRUSTED_ARCH``
    (for ``prunetune sweep`` / ``export`` of such a checkpoint)."""
    model = _build(net, trusted or os.environ.get(TRUST_ENV, ""))
    setattr(model, _INPUT_ATTR, tuple(net.input_shape))
    return model


def _build(net: Network, trusted: str) -> nn.Module:
    channels = net.input_shape[0]
    if _FACTORY.fullmatch(net.arch):
        if net.arch != trusted:
            raise CheckpointError(f"this network is built by user code ({net.arch}), which prunetune imports only "
                                  f"when the experiment file being run names it; to trust it here, set {TRUST_ENV}={net.arch}")
        model = _factory(net.arch)(num_classes=net.num_classes)
        if not isinstance(model, nn.Module):
            raise ModelError(f"[model] arch = {net.arch!r} returned {type(model).__name__}, not an nn.Module")
        return model
    from torchvision import models

    check_arch(net.arch)
    model = models.get_model(net.arch, weights=None, num_classes=net.num_classes)
    if net.stem == "cifar":
        _cifar_stem(model)
    first = _first_conv(model)
    if channels != first[1].in_channels:
        _replace(model, first[0], _conv_like(first[1], in_channels=channels))
    return model


def _factory(arch: str):
    module, _, name = arch.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"[model] arch = {arch!r}: cannot import it ({e}); the module must be importable on every "
                         "node (installed, or on PYTHONPATH)") from None


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _conv_like(conv: nn.Conv2d, **changes: Any) -> nn.Conv2d:
    args = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, groups=conv.groups, bias=conv.bias is not None)
    return nn.Conv2d(**{**args, **changes})


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _cifar_stem(model: nn.Module) -> None:
    """Full resolution for small images: a ResNet's 7x7 stride-2 conv + max-pool would shrink a
    32 x 32 image to 8 x 8 before the first block; elsewhere the first conv runs at stride 1."""
    if hasattr(model, "maxpool") and hasattr(model, "conv1"):
        model.conv1 = _conv_like(model.conv1, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
        return
    name, conv = _first_conv(model)
    _replace(model, name, _conv_like(conv, stride=1))


def load_weights(model: nn.Module, weights: str, arch: str) -> list[str]:
    """Start ``model`` from ``weights`` (a state-dict file or a torchvision weights name); return
    the names of the tensors that start fresh because their shapes differ."""
    state = _weights_file(weights) if is_weights_file(weights) else _torchvision_weights(weights, arch)
    own = model.state_dict()
    fresh = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    unknown = sorted(k for k in state if k not in own)
    if len(fresh) > len(own) // 2 or unknown:
        raise ModelError(f"[model] weights = {weights!r} do not fit {arch}: {len(unknown)} of its tensors are unknown "
                         f"(e.g. {unknown[:3]}) and {len(fresh)} of the network's would start fresh; give weights "
                         f"of the same architecture")
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def is_weights_file(weights: str) -> bool:
    """Whether ``[model] weights`` names a file (else a torchvision weights name)."""
    return "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or Path(weights).is_file()


def _weights_file(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise _no_weights_file(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)  # tensors only: a file never runs code
    except Exception as e:
        raise ModelError(f"[model] weights = {path!r} is not a torch file of tensors ({str(e).splitlines()[0][:200]}); "
                         "save one with torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a prunetune checkpoint
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"[model] weights = {path!r} holds no state dict (names -> tensors)")
    return state


def _weights_enum(name: str, arch: str):
    from torchvision import models

    try:
        return models.get_weight(name) if "." in name else models.get_model_weights(arch)[name]
    except (KeyError, ValueError) as e:
        raise ModelError(f"[model] weights = {name!r}: not a file, nor torchvision weights of {arch} ({e}); "
                         "e.g. \"DEFAULT\" or \"IMAGENET1K_V1\"") from None


def _torchvision_weights(name: str, arch: str) -> dict[str, torch.Tensor]:
    enum = _weights_enum(name, arch)
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline: urllib's errors come in many types
        raise ModelError(f"[model] weights = {name!r}: cannot fetch {enum.url} ({str(e).splitlines()[0][:120]}); "
                         f"offline, place that file at {target}") from None
