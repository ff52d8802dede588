"""What a compressed model costs: sparsity, parameters, size, MACs, CPU latency, GPU throughput.

Every function here works on a copy or reads only; the caller's model is never changed.
Models may carry prune masks (``weight_orig`` + ``weight_mask``) or be INT8 models from
``compress.quantize_int8``; each function says how it treats them.
"""
from __future__ import annotations

import functools
import io
import platform
import statistics
import time
import zipfile
from typing import Callable, Hashable, Mapping, TypeVar

import torch
import torch.nn as nn
import torch.ao.nn.quantized as nnq

from trainables.compress import clone, is_quantized, make_permanent
from trainables.model import example_input, input_shape
from trainables.ort import OrtModel

K = TypeVar("K", bound=Hashable)

_CONV_TYPES = (nn.Conv2d, nnq.Conv2d)
_LINEAR_TYPES = (nn.Linear, nnq.Linear)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for every Conv2d and Linear layer, float or quantized."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _CONV_TYPES + _LINEAR_TYPES)
    ]


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Return the exact fraction of zero weights in each prunable layer, by layer name.

    Uses the effective weight (masks applied), so it works before and after
    ``make_permanent`` and on INT8 models (a pruned zero stays zero after quantization;
    weights tiny enough to round to zero in INT8 count as zeros too).
    """
    return {
        name: float((_weight(module) == 0).sum()) / _weight(module).numel()
        for name, module in prunable_layers(model)
    }


def sparsity(model: nn.Module) -> float:
    """Return the exact fraction of zero weights over all prunable layers' weights."""
    weights = [_weight(module) for _, module in prunable_layers(model)]
    if not weights:
        raise ValueError("model has no Conv2d or Linear layers to measure sparsity on")
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def nonzero_params(model: nn.Module) -> int:
    """Return the number of nonzero parameters (all of them, masks applied).

    For INT8 models the packed conv/linear weights and biases are counted (BN is folded
    into the convs there, so the total is a little lower than the fp32 model's).
    """
    permanent = make_permanent(model)
    count = 0
    for module in permanent.modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, (nnq.Conv2d, nnq.Linear)):
            tensors += [t for t in (module.weight(), module.bias()) if t is not None]
        count += sum(int((_dequantized(t) != 0).sum()) for t in tensors)
    return count


def size_mb(model: nn.Module) -> float:
    """Return the size in MB (1e6 bytes) of what would ship, compressed.

    That is the model's state_dict, with masks baked in (``make_permanent``; an INT8
    model's quantized state_dict as is), serialised with ``torch.save`` and then
    zip-deflate-compressed (``zipfile.ZIP_DEFLATED``, level 1: 2.6x faster than the default
    level 6 on a 45 MB ResNet18 and ~10% larger). ``torch.save`` alone stores tensors
    uncompressed, so unstructured zeros would not show; deflate turns them into savings, as
    any compressed download or artifact store would.
    """
    raw = io.BytesIO()
    torch.save(make_permanent(model).state_dict(), raw)
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("model.pt", raw.getvalue())
    return len(packed.getvalue()) / 1e6


def macs(model: nn.Module) -> int:
    """Return multiply-accumulates of conv and linear layers for one input image (of the model's size).

    Counted with forward hooks from each layer's output shape, so it reflects the graph
    that runs: unstructured masks remove no work (a masked model has the dense model's
    MACs), channel pruning does. INT8 models are counted too (BN is folded and ReLU fused,
    so their conv/linear MACs equal the fp32 model's). BN, ReLU, pooling and residual adds
    are not counted (under 1% of ResNet18's total).

    Why not torch-pruning's ``tp.utils.count_ops_and_params`` (the tests' reference, equal
    within the classifier's bias adds on float models): it knows no quantized modules (it
    gives 8,192 MACs for the INT8 ResNet18, measured with torch-pruning 1.6.1), it cannot
    copy a masked model, and it also counts BN and ReLU, so an INT8 point and the fp32 point
    of the same graph would disagree. One counter for float, masked and INT8 models keeps
    the ``macs`` column comparable across every point of a sweep.
    """
    probe = make_permanent(model).cpu().eval()
    total = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        positions = output.numel() // output.shape[0]
        if isinstance(module, _CONV_TYPES):
            kh, kw = module.kernel_size
            total += positions * (module.in_channels // module.groups) * kh * kw
        else:
            total += positions * module.in_features

    for _, module in prunable_layers(probe):
        module.register_forward_hook(count)
    with torch.no_grad():
        probe(example_input(probe))
    return total


def cpu_latency(
    model: nn.Module | OrtModel,
    *,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 10,
    batch_size: int = 1,
) -> dict:
    """Measure CPU inference latency of ``model`` on random inputs of its size.

    Runs ``warmup`` untimed then ``runs`` timed forward passes (``time.perf_counter`` each)
    in eval and inference mode with exactly ``threads`` intra-op threads (restored after).
    Returns ``latency_ms`` (median, robust to stray slow runs), ``latency_p90_ms``,
    ``latency_cv`` (std/mean of the runs), ``threads``, ``runs`` and ``cpu`` (model name),
    since a latency means nothing without the machine it was taken on. A GPU model is
    copied to CPU, in the plain (contiguous) layout: the one every model is shipped and
    re-derived in, so a latency cached by architecture means one thing. Time a masked model after
    ``compress.make_permanent``: the mask hooks otherwise add their own cost. An
    :class:`trainables.ort.OrtModel` is timed in its own session (its thread count).
    """
    return interleaved_latency({0: model}, threads=threads, runs=runs, warmup=warmup, rounds=1,
                               batch_size=batch_size)[0]


def interleaved_latency(
    models: Mapping[K, nn.Module | OrtModel],
    *,
    threads: int = 1,
    runs: int = 100,
    warmup: int = 10,
    rounds: int = 10,
    batch_size: int = 1,
) -> dict[K, dict]:
    """Time several models in turn: ``rounds`` rounds, each running every model ``runs / rounds``
    times after ``warmup / rounds`` untimed passes, so a slow drift of the machine (frequency,
    a neighbour on the host) shifts every model alike instead of whichever was timed during it.
    Returns what :func:`cpu_latency` returns, per key. The quiet re-measurement of a search's
    front uses this, on cores where nothing else runs."""
    if runs < 1 or warmup < 0 or threads < 1 or batch_size < 1 or rounds < 1:
        raise ValueError("runs, threads, rounds and batch_size must be >= 1 and warmup >= 0")
    forwards = {key: _forward(m, batch_size) for key, m in models.items()}
    per_round, warm = max(1, runs // rounds), -(-warmup // rounds)
    seconds: dict[K, list[float]] = {key: [] for key in models}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for key, forward in forwards.items():
                    for _ in range(warm):
                        forward()
                    for _ in range(per_round):
                        start = time.perf_counter()
                        forward()
                        seconds[key].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return {key: _stats(seconds[key], getattr(models[key], "threads", threads)) for key in models}


def _forward(model: nn.Module | OrtModel, batch_size: int) -> Callable[[], object]:
    """One inference of ``model`` on a fixed random batch, as a call."""
    if isinstance(model, OrtModel):
        feed = model.feed(batch_size)
        return lambda: model.session.run(None, feed)
    inputs = torch.randn(batch_size, *input_shape(model), generator=torch.Generator().manual_seed(0))
    timed = clone(model).cpu().eval().to(memory_format=torch.contiguous_format)  # the layout that ships
    return lambda: timed(inputs)


def _stats(seconds: list[float], threads: int) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    mean = statistics.fmean(ms)
    return {
        "latency_ms": statistics.median(ms),
        "latency_p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "latency_cv": statistics.pstdev(ms) / mean if mean > 0 else 0.0,
        "threads": threads,
        "runs": len(ms),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
    }


def gpu_throughput(model: nn.Module, *, batch_size: int = 256, runs: int = 20) -> float | None:
    """Return inference throughput in images/s on the current CUDA GPU, or None.

    Uses bf16 autocast and channels_last (how the model would be served on a GPU) and
    times with CUDA events after a short warmup. None when CUDA is unavailable or the model
    is INT8 (its quantized kernels are CPU-only).
    """
    if not torch.cuda.is_available() or is_quantized(model):
        return None
    device = torch.device("cuda")
    timed = make_permanent(model).eval().to(device, memory_format=torch.channels_last)
    inputs = torch.randn(batch_size, *input_shape(model), device=device).to(
        memory_format=torch.channels_last
    )
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            timed(inputs)
        torch.cuda.synchronize()
        start.record()
        for _ in range(runs):
            timed(inputs)
        end.record()
        torch.cuda.synchronize()
    return batch_size * runs / (start.elapsed_time(end) / 1e3)


def _weight(module: nn.Module) -> torch.Tensor:
    """The effective weight: masked for pruned layers, dequantized for INT8 layers."""
    weight = module.weight() if callable(module.weight) else module.weight
    return _dequantized(weight.detach())


def _dequantized(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.dequantize() if tensor.is_quantized else tensor


# The CPU features that change a CPU latency, and for INT8 even the accuracy (8-bit dot products
# saturate on x86 without VNNI): recorded beside every latency.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> str:
    """The :data:`ISA_FLAGS` this CPU has, space-separated ("" if none, or not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return ""


def has_vnni() -> bool:
    """Whether this CPU multiplies 8-bit integers without saturating (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return any(f in cpu_flags().split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
