"""Tests for trainables.compress: pruning methods, masks, INT8 and architecture signatures."""
from __future__ import annotations

import statistics
import warnings

import pytest
import torch

from trainables.compress import (
    METHODS,
    architecture_signature,
    clone,
    is_quantized,
    make_permanent,
    prune,
    quantize_int8,
)
from trainables.measure import cpu_latency, layer_sparsity, macs, prunable_layers, sparsity
from trainables.model import cifar_resnet18

UNSTRUCTURED = ("global_l1", "layer_l1", "global_random")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet18().eval()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return _model()


@pytest.fixture(scope="module")
def masked(dense) -> torch.nn.Module:
    """global_l1 at 0.5, shared by tests that only read it."""
    return prune(dense, "global_l1", 0.5)


@pytest.fixture(scope="module")
def channel(dense) -> torch.nn.Module:
    return prune(dense, "channel_l1", 0.5)


@pytest.fixture(scope="module")
def int8_dense(dense) -> torch.nn.Module:
    return quantize_int8(dense, _images(64))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", UNSTRUCTURED)
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_unstructured_methods_hit_requested_sparsity_and_keep_masks(dense, method, ratio):
    pruned = prune(dense, method, ratio)
    assert sparsity(pruned) == pytest.approx(ratio, abs=1e-3)
    for _, module in prunable_layers(pruned):  # reparametrised, so fine-tuning keeps zeros
        assert hasattr(module, "weight_orig") and hasattr(module, "weight_mask")


def test_global_l1_spreads_sparsity_unevenly_across_layers(masked):
    per_layer = layer_sparsity(masked).values()
    assert sparsity(masked) == pytest.approx(0.5, abs=1e-3)
    assert max(per_layer) - min(per_layer) > 0.1


def test_layer_l1_prunes_every_layer_by_the_ratio(dense):
    pruned = prune(dense, "layer_l1", 0.5)
    weights = dict(prunable_layers(pruned))
    for name, fraction in layer_sparsity(pruned).items():
        assert fraction == pytest.approx(0.5, abs=1.0 / weights[name].weight.numel())


def _masks(model: torch.nn.Module) -> list[torch.Tensor]:
    return [module.weight_mask for _, module in prunable_layers(model)]


def test_global_random_is_seeded_and_leaves_global_rng_alone(dense):
    rng_before = torch.get_rng_state()
    first = _masks(prune(dense, "global_random", 0.5, seed=3))
    again = _masks(prune(dense, "global_random", 0.5, seed=3))
    other = _masks(prune(dense, "global_random", 0.5, seed=4))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("method", METHODS)
def test_prune_never_mutates_its_input(method):
    model = _model().train()
    before = _state(model)
    prune(model, method, 0.5)
    assert _same_state(before, _state(model))
    assert model.training
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())


def test_finetuning_a_pruned_model_keeps_pruned_weights_zero(masked):
    pruned = clone(masked).train()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(pruned(_images(4)), torch.arange(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pruned(_images(2))  # the pruning hook recomputes weight = weight_orig * weight_mask
    assert sparsity(pruned) == pytest.approx(0.5, abs=1e-3)
    for _, module in prunable_layers(pruned):
        assert torch.all(module.weight[module.weight_mask == 0] == 0)


def test_ratio_zero_returns_an_unpruned_copy(dense):
    for method in METHODS:
        copy = prune(dense, method, 0.0)
        assert copy is not dense
        assert _same_state(_state(dense), _state(copy))


def test_make_permanent_bakes_masks_in(masked):
    permanent = make_permanent(masked)
    keys = permanent.state_dict().keys()
    assert not any(k.endswith("_orig") or k.endswith("_mask") for k in keys)
    assert any(k.endswith("_orig") for k in masked.state_dict())  # input untouched
    assert sparsity(permanent) == sparsity(masked)
    x = _images(4)
    with torch.no_grad():
        assert torch.allclose(permanent(x), masked(x), atol=1e-6)


def test_make_permanent_without_masks_is_a_plain_copy(dense):
    copy = make_permanent(dense)
    assert copy is not dense
    assert _same_state(_state(dense), _state(copy))


def test_clone_copies_a_masked_model_independently(masked):
    copy = clone(masked)
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(masked.parameters()))
    assert sparsity(copy) == sparsity(masked)


def test_channel_l1_makes_a_smaller_faster_dense_model(dense, channel):
    pruned = channel
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * sum(
        p.numel() for p in dense.parameters()
    )
    assert not any(k.endswith("_mask") for k in pruned.state_dict())
    assert macs(pruned) < 0.5 * macs(dense)
    with torch.no_grad():
        assert pruned(_images(2)).shape == (2, 10)


def test_channel_l1_keeps_the_training_mode():
    assert prune(_model().train(), "channel_l1", 0.25).training
    assert not prune(_model().eval(), "channel_l1", 0.25).training


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(dense, ratio):
    with pytest.raises(ValueError, match=r"is outside \[0, 1\)"):
        prune(dense, "global_l1", ratio)


def test_unknown_method_is_rejected_naming_the_allowed_ones(dense):
    with pytest.raises(ValueError, match="global_l1, layer_l1, global_random, channel_l1"):
        prune(dense, "magnitude", 0.5)


def test_int8_model_agrees_with_fp32(dense, int8_dense):
    x = _images(64, seed=7)
    with torch.no_grad():
        fp32, int8 = dense(x), int8_dense(x)
    assert is_quantized(int8_dense) and not is_quantized(dense)
    assert int8.shape == fp32.shape
    assert (fp32.argmax(1) == int8.argmax(1)).float().mean() >= 0.9
    assert (fp32 - int8).abs().mean() < 0.1 * fp32.abs().mean()


def test_int8_is_faster_than_fp32_on_one_thread(dense, int8_dense):
    # Real INT8 kernels, not fake quantization: ~4.4x faster here (BENCHMARKS.md). The two
    # models are timed alternately, so outside load slows both alike, and the 1.5x bar leaves
    # a ~3x margin; repeatability and the speedup itself are measured by bench_latency.py.
    fp32, int8 = [], []
    for _ in range(15):
        fp32.append(cpu_latency(dense, runs=1, warmup=1)["latency_ms"])
        int8.append(cpu_latency(int8_dense, runs=1, warmup=1)["latency_ms"])
    assert statistics.median(int8) * 1.5 <= statistics.median(fp32), (fp32, int8)


def test_int8_applies_on_top_of_pruned_models_silently(masked, channel):
    before = _state(masked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int8_masked = quantize_int8(masked, _images(16))
        int8_channel = quantize_int8(channel, _images(16))
    assert [str(w.message) for w in caught] == []
    assert _same_state(before, _state(masked))
    assert sparsity(int8_masked) >= 0.5
    with torch.no_grad():
        assert int8_channel(_images(2)).shape == (2, 10)


def test_signature_ignores_weight_values_but_not_architecture(
    dense, masked, channel, int8_dense
):
    other = _model(seed=1)
    assert architecture_signature(dense) == architecture_signature(other)
    for pruned, method in ((masked, "global_l1"), (channel, "channel_l1")):
        assert architecture_signature(pruned) == architecture_signature(
            prune(other, method, 0.5)
        )
    signatures = {
        architecture_signature(dense),
        architecture_signature(channel),
        architecture_signature(prune(dense, "channel_l1", 0.25)),
        architecture_signature(int8_dense),
    }
    assert len(signatures) == 4


def test_signature_of_int8_models_ignores_weights_and_calibration(int8_dense):
    other = quantize_int8(_model(seed=1), _images(16, seed=5))
    assert architecture_signature(other) == architecture_signature(int8_dense)


def test_permanent_unstructured_zeros_keep_the_dense_architecture(dense, masked):
    # baked-in zeros run the dense graph: same signature, so the sweep shares its latency
    assert architecture_signature(make_permanent(masked)) == architecture_signature(dense)


def test_recalibrate_bn_re_estimates_the_statistics_from_the_images_alone():
    """After channel pruning the BatchNorms see other activations: their running statistics become
    the mean and variance of what they see on the images (a cumulative average), weights untouched."""
    import torch.nn as nn

    from trainables.compress import prune, recalibrate_bn
    from trainables.model import cifar_resnet18

    torch.manual_seed(0)
    dense = cifar_resnet18().eval()
    pruned = prune(dense, "channel_l1", 0.5)
    images = torch.randn(128, 3, 32, 32)
    seen = []
    hook = pruned.bn1.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    recal = recalibrate_bn(pruned, images, batch_size=64)
    hook.remove()
    assert not recal.training and recal is not pruned
    x = torch.cat(seen)  # the first BN's input on the first pass: the stem's output, the same before and after
    torch.testing.assert_close(recal.bn1.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not torch.equal(recal.bn1.running_mean, pruned.bn1.running_mean)
    for (name, a), (_, b) in zip(recal.named_parameters(), pruned.named_parameters()):
        assert torch.equal(a, b), name
    assert all(m.momentum == 0.1 for m in recal.modules() if isinstance(m, nn.BatchNorm2d))
