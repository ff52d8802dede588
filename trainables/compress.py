"""Compression methods for a trained model: pruning, making masks permanent, INT8.

Every public function is pure: it deep-copies its input and returns a new module, so a
trial can sweep many (method, ratio[, int8]) points from the same trained weights.

Methods (``METHODS``):

- ``global_l1``: L1 magnitude unstructured pruning, one threshold over all Conv2d/Linear
  weights (``torch.nn.utils.prune.global_unstructured``) - the origin report's method.
- ``layer_l1``: L1 magnitude unstructured pruning, the same fraction in every layer.
- ``global_random``: random unstructured pruning over all layers (seeded baseline).
- ``channel_l1``: structured pruning with Torch-Pruning - removes the ``ratio`` fraction of
  output channels of every conv (by L1 norm), keeping residual connections consistent
  through its dependency graph. The result is a smaller dense model that is really faster.
  Note that ``ratio`` here is a fraction of *channels*; the fraction of weights removed is
  roughly ``1 - (1 - ratio) ** 2`` because both input and output channels shrink.

The unstructured methods remove no work (masked weights are still multiplied); only
``channel_l1`` and ``quantize_int8`` make inference faster.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
import torch_pruning as tp
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from trainables.model import carry_input_shape, example_input

METHODS = ("global_l1", "layer_l1", "global_random", "channel_l1")
# The methods that remove work (a smaller dense network): the only ones that can make a point faster
# than the dense model at the same dtype. The unstructured ones only zero weights (a smaller file).
STRUCTURED = ("channel_l1",)

# Kept channel counts of channel_l1 are multiples of this (measured: experiments/bench_round_to.py).
ROUND_TO = 8

_QUANT_BACKEND = "x86"
_CALIBRATION_BATCH = 64

# Warnings torch emits on every FX quantization call on torch >= 2.10. They are about the
# future of the API, not about the user's model, so they are hidden (see quantize_int8).
_QUANT_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


def prune(model: nn.Module, method: str, ratio: float, *, seed: int = 0, round_to: int = ROUND_TO) -> nn.Module:
    """Return a pruned copy of ``model``; ``model`` itself is never changed.

    ``ratio`` is the fraction of weights (unstructured methods) or of conv output channels
    (``channel_l1``) to remove, in [0, 1). ``ratio == 0`` returns an unpruned copy. ``seed``
    only matters for ``global_random``: its mask is drawn from a CPU generator seeded with it,
    so it is the same on any device and no global RNG (CPU or CUDA) is touched.

    ``round_to`` (``channel_l1`` only) keeps every pruned layer's channel count a multiple of it
    (1 = exactly ``ratio``): CPU kernels vectorise over channel blocks, so counts off the block
    size cost nearly as much as the next multiple (``experiments/bench_round_to.py``).

    The copy is in the plain (contiguous) layout whatever ``model``'s is: torch's pruning
    flattens weights with ``view(-1)``, which channels_last tensors (a CUDA-trained model) refuse.

    The unstructured methods keep torch's prune reparametrisation (``weight_orig`` and
    ``weight_mask``) on the returned model, so fine-tuning it keeps pruned weights exactly
    zero; call ``make_permanent`` before shipping or timing it.
    """
    check_method(method)
    check_ratio(ratio)
    pruned = clone(model).to(memory_format=torch.contiguous_format)
    if ratio == 0.0:
        return pruned
    if method == "channel_l1":
        return _channel_l1(make_permanent(pruned), ratio, round_to)
    targets = [(module, "weight") for module in _weighted_layers(pruned)]
    if method == "global_l1":
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=ratio)
    elif method == "layer_l1":
        for module, name in targets:
            torch_prune.l1_unstructured(module, name, amount=ratio)
    else:  # global_random
        torch_prune.global_unstructured(targets, pruning_method=_SeededRandomUnstructured, amount=ratio, seed=seed)
    return pruned


class _SeededRandomUnstructured(torch_prune.RandomUnstructured):
    """torch's random unstructured pruning with its own seeded CPU generator.

    ``RandomUnstructured`` draws with ``torch.rand_like``, i.e. from the global generator of the
    weights' device: a CUDA sweep and a CPU re-derivation (``tuning.models.derive``) would get
    different masks, and the draw would move the global CUDA RNG.
    """

    def __init__(self, amount: float, seed: int = 0) -> None:
        super().__init__(amount)
        self.seed = seed

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        k = round(self.amount * t.nelement())  # as torch rounds a fractional amount
        if k:
            scores = torch.rand(t.shape, generator=torch.Generator().manual_seed(self.seed))
            mask.view(-1)[torch.topk(scores.view(-1), k).indices.to(mask.device)] = 0
        return mask


def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Return a copy of ``model`` with every BatchNorm's running statistics re-estimated on
    ``images`` (float, normalised NCHW, on the model's device): forward passes in train mode, no
    gradient, a cumulative average; weights untouched.

    Why: channel pruning removes inputs of every later layer, so the activations its BatchNorms
    see no longer have the mean and variance they recorded, and the no-retrain accuracy of a
    channel-pruned model is mostly that mismatch ("adaptive BN": Li et al., EagleEye, ECCV 2020).
    """
    out = clone(model)
    reestimate_bn(out, images, batch_size)
    return out.eval()


def reestimate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimate ``model``'s BatchNorm running statistics on ``images`` in place (see
    :func:`recalibrate_bn`); the model's train/eval mode is kept."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts alike
    model.train()
    with torch.no_grad():
        for batch in images.split(batch_size):
            model(batch)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def clone(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` that also works when it carries prune masks.

    Plain ``copy.deepcopy`` fails on a pruned model: its ``weight`` is computed from
    ``weight_orig * weight_mask`` and is not a leaf tensor. Here that computed tensor is
    copied detached; the pruning hook recomputes it before every forward anyway.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for name, _ in module.named_parameters(recurse=False):
            if name.endswith("_orig"):
                computed = getattr(module, name.removesuffix("_orig"))
                memo[id(computed)] = computed.detach().clone()
    return carry_input_shape(model, copy.deepcopy(model, memo))  # a GraphModule's deepcopy drops attributes


def make_permanent(model: nn.Module) -> nn.Module:
    """Return a copy with every prune mask baked into a plain ``weight`` (zeros kept).

    After this the copy has no ``*_orig``/``*_mask`` tensors or pruning hooks, so it saves,
    traces and runs like an ordinary model. A model without masks gives a plain copy.
    """
    permanent = clone(model)
    for module in permanent.modules():
        names = [name.removesuffix("_orig") for name, _ in module.named_parameters(recurse=False)
                 if name.endswith("_orig")]
        for name in names:
            torch_prune.remove(module, name)
    return permanent


def quantize_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """Return a post-training static INT8 copy of ``model`` for CPU inference (x86 backend).

    Weights are quantized per output channel (symmetric), activations per tensor with ranges
    from a histogram observer run over ``calibration``: a batch of float, normalized NCHW
    images (a few hundred are enough). Works on any method's output: masks are made permanent
    first, and channel-pruned models are just smaller dense models. The result takes and
    returns float tensors and runs on CPU only (a GPU model is copied to CPU).

    Why FX graph mode (``prepare_fx``/``convert_fx``): on torch 2.14 it is the one path that
    gives real INT8 kernels (fbgemm/oneDNN) for an ``nn.Module`` with no extra package or
    compiler: about 4-5x faster than fp32 at batch 1 on one thread for CIFAR-ResNet18, with
    BN folded and conv+ReLU fused automatically, in a few seconds. PT2E needs torchao and
    ``torch.compile`` (inductor) to become fast, and ONNX Runtime static quantization leaves
    PyTorch (export + an ORT session), so both are kept as the forward path for when
    ``torch.ao.quantization`` is removed. Its deprecation warnings are suppressed here.
    """
    calibration = calibration.cpu()
    with _quiet_quantization():
        prepared = prepare_fx(make_permanent(model).cpu().eval(), get_default_qconfig_mapping(_QUANT_BACKEND),
                              (calibration[:1],))
        with torch.no_grad():
            for batch in calibration.split(_CALIBRATION_BATCH):
                prepared(batch)
    return convert_int8(carry_input_shape(model, prepared))


def prepare_qat(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with fake quantization inserted, for quantization-aware
    fine-tuning (same x86 INT8 scheme as :func:`quantize_int8`; BN is folded into the convs
    as it trains). Train it (on any device), then :func:`convert_int8` it. Masks are made
    permanent first: keep pruned zeros at zero yourself (see ``trainables.sweep``)."""
    with _quiet_quantization():
        prepared = prepare_qat_fx(make_permanent(model).cpu().train(), get_default_qat_qconfig_mapping(_QUANT_BACKEND),
                                  (example_input(model),))
        return carry_input_shape(model, prepared)


def convert_int8(prepared: nn.Module) -> nn.Module:
    """A calibrated (:func:`quantize_int8`) or quantization-aware trained (:func:`prepare_qat`)
    model -> the INT8 CPU model."""
    with _quiet_quantization():
        return carry_input_shape(prepared, convert_fx(prepared.cpu().eval()).eval())


@contextlib.contextmanager
def _quiet_quantization():
    with warnings.catch_warnings():
        for message in _QUANT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def is_quantized(model: nn.Module) -> bool:
    """True if ``model`` holds quantized tensors (i.e. came from ``quantize_int8``)."""
    return any(tensor.is_quantized for value in model.state_dict().values() for tensor in _tensors_in(value))


def architecture_signature(model: nn.Module) -> str:
    """Return a short stable hash of what determines latency, not of the weight values.

    It covers module types, every state-dict entry's name, shape and dtype (so kept-channel
    counts, prune masks and quantization all count) - but no values. Two models from the
    same (method, ratio, int8) recipe get the same signature, so a measured latency can be
    cached under it and reused across trials.
    """
    parts = [f"{name}:{type(module).__module__}.{type(module).__qualname__}" for name, module in model.named_modules()]
    parts += [f"{key}:{_describe(value)}" for key, value in sorted(model.state_dict().items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def check_method(method: str) -> None:
    """ValueError unless ``method`` is one of :data:`METHODS`; the message lists them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def check_ratio(ratio: float) -> None:
    """ValueError unless ``ratio`` is a prune ratio, i.e. in [0, 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio!r} is outside [0, 1)")


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _channel_l1(model: nn.Module, ratio: float, round_to: int) -> nn.Module:
    """Physically remove ``ratio`` of every conv's channels in place on ``model`` (a copy),
    keeping channel counts multiples of ``round_to``."""
    was_training = model.training
    model.eval()  # tracing runs a forward pass; eval keeps BN running stats untouched
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    device = next(model.parameters()).device
    pruner = tp.pruner.MetaPruner(
        model,
        example_input(model, device=device),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=classifier,  # keep the output classes
        round_to=round_to if round_to > 1 else None,
    )
    pruner.step()
    return model.train(was_training)


def _tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    return []


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)}:{value.dtype}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_describe(item) for item in value) + ")"
    if isinstance(value, torch.dtype):
        return str(value)
    return type(value).__name__
