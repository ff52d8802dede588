"""Tests for trainables.measure: sparsity, parameter counts, size, MACs and latency."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from trainables import measure
from trainables.compress import make_permanent, prune, quantize_int8
from trainables.measure import (
    cpu_latency,
    gpu_throughput,
    layer_sparsity,
    macs,
    nonzero_params,
    prunable_layers,
    size_mb,
    sparsity,
)
from trainables.model import cifar_resnet18


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return cifar_resnet18().eval()


@pytest.fixture(scope="module")
def masked(dense) -> torch.nn.Module:
    return prune(dense, "global_l1", 0.5)


@pytest.fixture(scope="module")
def dense_mb(dense) -> float:
    return size_mb(dense)


@pytest.fixture(scope="module")
def int8_dense(dense) -> torch.nn.Module:
    return quantize_int8(dense, _images(32))


def test_prunable_layers_are_the_same_with_masks_and_after_int8(dense, masked, int8_dense):
    names = [name for name, _ in prunable_layers(dense)]
    assert names and "fc" in names and "conv1" in names
    assert [name for name, _ in prunable_layers(masked)] == names
    assert [name for name, _ in prunable_layers(int8_dense)] == names


def test_prunable_layers_expose_the_masked_weight(masked):
    for _, module in prunable_layers(masked):
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


def test_dense_model_has_no_sparsity(dense):
    assert sparsity(dense) == 0.0
    assert set(layer_sparsity(dense).values()) == {0.0}


def test_sparsity_layer_sparsity_and_nonzero_params_agree(dense, masked):
    weights = {name: module.weight.numel() for name, module in prunable_layers(masked)}
    zeros = sum(fraction * weights[name] for name, fraction in layer_sparsity(masked).items())
    total = sum(weights.values())
    assert sparsity(masked) == pytest.approx(zeros / total, abs=1e-9)
    assert nonzero_params(dense) - nonzero_params(masked) == round(sparsity(masked) * total)


def test_nonzero_params_counts_all_parameters(dense):
    expected = sum(int((p != 0).sum()) for p in dense.parameters())
    assert nonzero_params(dense) == expected
    assert 0 < expected <= sum(p.numel() for p in dense.parameters())


def test_nonzero_params_of_int8_model_is_close_to_fp32(dense, int8_dense):
    assert nonzero_params(int8_dense) == pytest.approx(nonzero_params(dense), rel=0.05)


def test_size_shrinks_with_sparsity_and_int8(dense, dense_mb, masked, int8_dense):
    sizes = [dense_mb, size_mb(prune(dense, "global_l1", 0.3)), size_mb(masked)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    assert size_mb(make_permanent(masked)) == pytest.approx(sizes[2], rel=0.01)
    assert size_mb(int8_dense) < 0.35 * sizes[0]


def test_size_of_dense_fp32_is_about_four_bytes_per_parameter(dense, dense_mb):
    params = sum(p.numel() for p in dense.parameters())
    assert 0.8 * 4 * params / 1e6 < dense_mb < 1.1 * 4 * params / 1e6


def test_macs_match_torch_pruning_and_ignore_masks(dense, masked, int8_dense):
    reference, _ = tp.utils.count_ops_and_params(dense, torch.zeros(1, 3, 32, 32))
    assert macs(dense) == pytest.approx(reference, rel=0.01)  # tp also counts BN
    assert macs(masked) == macs(dense)
    assert macs(int8_dense) == macs(dense)
    assert macs(prune(dense, "channel_l1", 0.5)) < macs(dense)


def test_cpu_latency_reports_and_restores_threads(dense):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = cpu_latency(dense, threads=1, runs=5, warmup=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert set(result) == {"latency_ms", "latency_p90_ms", "latency_cv", "threads", "runs", "cpu", "cpu_flags"}
    assert set(result["cpu_flags"].split()) <= set(measure.ISA_FLAGS)
    assert result["threads"] == 1 and result["runs"] == 5 and result["cpu"]
    assert 0 < result["latency_ms"] <= result["latency_p90_ms"]
    assert result["latency_cv"] >= 0


def test_cpu_latency_leaves_a_training_model_untouched():
    torch.manual_seed(0)
    model = prune(cifar_resnet18().train(), "global_l1", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_latency(model, runs=2, warmup=1, batch_size=4)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats unchanged


def test_cpu_latency_rejects_zero_runs(dense):
    with pytest.raises(ValueError, match="runs"):
        cpu_latency(dense, runs=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_throughput_is_none_without_cuda(dense):
    assert gpu_throughput(dense) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_throughput_on_cuda(dense, int8_dense):
    assert gpu_throughput(dense, batch_size=64, runs=3) > 0
    assert gpu_throughput(int8_dense) is None
