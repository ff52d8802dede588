"""The CUDA branches of training, pruning and the sweep, taken on a CPU.

No GPU here (nor in CI), so the bugs that lived in the CUDA branches are tested by forcing
those branches on the CPU: ``trainables.train.fast_path`` (bf16 autocast + channels_last) is
patched to say yes, torch's CPU bf16 autocast and channels_last kernels stand in for CUDA's,
and where the branch only checks ``torch.cuda.is_available()`` that check is patched too.
What still needs a real GPU (bf16 throughput, the per-process memory cap of fractional GPUs)
is measured by ``experiments/bench_gpu.py`` on one, see BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import prunetune_here
from trainables import compress, data, train
from trainables.compress import METHODS
from trainables.data import DataConfig
from trainables.measure import prunable_layers, sparsity
from trainables.model import cifar_resnet18
from trainables.sweep import SweepConfig, run_sweep
from trainables.checkpoint import ResumeWarning, load_checkpoint
from trainables.train import TrainConfig, evaluate, fit

TRAIN = TrainConfig(epochs=1, batch_size=30, lr=0.002, optimizer="adam", threads=2, eval_batch_size=64)


@pytest.fixture
def cuda_branch(monkeypatch):
    """Take the bf16 + channels_last branch on the CPU."""
    monkeypatch.setattr(train, "fast_path", lambda device, amp: amp)


@pytest.fixture(scope="module")
def tiny():
    return data.load(DataConfig(train_size=80, test_size=20, val_fraction=0.25))


def _channels_last_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet18().eval().to(memory_format=torch.channels_last)


def _masks(model: torch.nn.Module) -> list[torch.Tensor]:
    return [module.weight_mask for _, module in prunable_layers(model)]


def _plain(model: torch.nn.Module) -> bool:
    return all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_prune_takes_a_channels_last_model(method):
    model = _channels_last_model()
    assert not model.conv1.weight.is_contiguous()  # the layout a CUDA-trained model comes in
    pruned = compress.prune(model, method, 0.5)  # raised "view size is not compatible" before
    assert _plain(compress.make_permanent(pruned))
    if method != "channel_l1":
        plain = compress.prune(model.to(memory_format=torch.contiguous_format), method, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(_masks(pruned), _masks(plain)))
        assert sparsity(pruned) == pytest.approx(0.5, abs=1e-3)


def test_global_random_draws_its_mask_from_a_cpu_generator(monkeypatch):
    model = _channels_last_model()
    expected = _masks(compress.prune(model, "global_random", 0.4, seed=7))

    def device_rng(*args, **kwargs):
        raise AssertionError("drew from the weights' device generator (CUDA on a GPU)")

    monkeypatch.setattr(torch, "rand_like", device_rng)
    cpu_state = torch.get_rng_state()
    again = _masks(compress.prune(model.to(memory_format=torch.contiguous_format), "global_random", 0.4, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(expected, again))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    other = _masks(compress.prune(model, "global_random", 0.4, seed=8))
    assert not all(torch.equal(a, b) for a, b in zip(expected, other))


def test_normalize_makes_no_constant_per_call(monkeypatch):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data.normalize(x)  # the device's constants are made on first use
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    out = data.normalize(x)
    assert made == []
    mean = real(data.MEAN).view(1, 3, 1, 1) * 255
    std = real(data.STD).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(out, (x.float() - mean) / std)
    assert x.dtype == torch.uint8


def test_fit_on_the_cuda_branch_returns_a_plain_model(cuda_branch, tiny, tmp_path):
    result = fit(tiny, TRAIN, checkpoint_path=tmp_path / "c.pt")
    assert _plain(result.model)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["device"] == "cpu" and set(ckpt["rng"]) == {"torch"}


def test_evaluate_honours_amp(cuda_branch, tiny):
    model = cifar_resnet18()
    seen = []
    model.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    evaluate(model, tiny.val, 64)  # as it ships: fp32
    assert set(seen) == {torch.float32}
    seen.clear()
    evaluate(model, tiny.val, 64, amp=True)  # as it trains on the fast path: bf16
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    evaluate(model, tiny.val, 64, amp=False)
    assert set(seen) == {torch.float32}


@pytest.mark.slow
def test_channels_last_model_sweeps_every_method_with_int8_and_finetuning(cuda_branch, tiny):
    model = _channels_last_model()  # what fit trains on CUDA; weights need not be trained for this
    cfg = SweepConfig(methods=list(METHODS), ratios=[0.5], int8=True, finetune_epochs=1, finetune_lr=0.01,
                      latency_runs=2, latency_warmup=1, eval_size=20, calibration_size=16)
    df = run_sweep(model, tiny, cfg, TRAIN, progress=False)
    assert len(df) == len(METHODS) * 2
    assert df.accuracy.between(0, 1).all() and df.latency_ms.gt(0).all()
    tuned = df[(df.ratio == 0.5) & ~df.int8].set_index("method")
    assert tuned.accuracy_no_finetune.notna().all()
    for method in ("global_l1", "layer_l1", "global_random"):
        assert tuned.loc[method, "sparsity"] == pytest.approx(0.5, abs=1e-3)  # fine-tuning kept the mask
    assert tuned.loc["channel_l1", "macs"] < 0.5 * tuned.loc["global_l1", "macs"]


def _interrupted_checkpoint(tiny, tmp_path, **extra) -> dict:
    cfg = dataclasses.replace(TRAIN, epochs=2)
    path = tmp_path / "c.pt"

    def stop(m):
        if m["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny, cfg, checkpoint_path=path, on_epoch=stop)
    ckpt = load_checkpoint(path)
    ckpt.update(extra)
    return ckpt


def test_resume_with_rng_states_of_more_gpus_than_visible(tiny, tmp_path, monkeypatch):
    # a checkpoint written on a 4-GPU node (older checkpoints saved one CUDA RNG state per GPU),
    # resumed where CUDA "is available" but fewer devices are: CUDA's RNG must not be touched
    ckpt = _interrupted_checkpoint(tiny, tmp_path)
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 4

    def untouchable(*args, **kwargs):
        raise AssertionError("touched the CUDA RNG")

    import sys

    # CUDA "is available" to the training and checkpoint code only: torch's own optimiser would otherwise try it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: sys._getframe(1).f_globals.get("__name__") in
                        ("trainables.train", "trainables.checkpoint"))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", untouchable)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", untouchable)
    resumed = fit(tiny, dataclasses.replace(TRAIN, epochs=2), checkpoint_path=tmp_path / "c.pt", resume=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_resume_on_another_device_warns(tiny, tmp_path):
    ckpt = _interrupted_checkpoint(tiny, tmp_path, device="cuda")
    with pytest.warns(ResumeWarning, match="trained on cuda on cpu"):
        fit(tiny, dataclasses.replace(TRAIN, epochs=2), resume=ckpt)


@pytest.mark.slow
def test_checkpoint_of_a_gpu_trial_sweeps_on_a_cpu(tiny, tmp_path):
    from tuning.spec import from_dict

    spec = from_dict({"data": {"train_size": 80, "test_size": 20, "val_fraction": 0.25},
                      "train": {**dataclasses.asdict(TRAIN), "device": "cuda"}})
    fit(tiny, TRAIN, checkpoint_path=tmp_path / "gpu.pt", meta={"spec": spec.to_dict()})
    ckpt = load_checkpoint(tmp_path / "gpu.pt")
    ckpt["device"] = "cuda"
    torch.save(ckpt, tmp_path / "gpu.pt")
    r = prunetune_here("sweep", str(tmp_path / "gpu.pt"), "--ratios", "0,0.5", "--eval-size", "20", "--json")
    assert r.returncode == 0, r.stderr
    assert [p["ratio"] for p in json.loads(r.stdout.strip().splitlines()[-1])] == [0.0, 0.5]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use the GPU Ray assigns")
def test_a_trial_given_a_gpu_torch_cannot_use_fails_clearly():
    import ray

    from trainables.trainable import _resources

    @ray.remote(num_cpus=1, num_gpus=1)
    def on_a_gpu(requested: str) -> str:
        try:
            return str(_resources(requested)[1])
        except Exception as e:  # the DeviceError, as a string across the process boundary
            return f"{type(e).__name__}: {e}"

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False)  # a logical GPU; torch here has no CUDA
    try:
        auto, cpu = ray.get(on_a_gpu.remote("auto")), ray.get(on_a_gpu.remote("cpu"))
    finally:
        ray.shutdown()
    assert auto.startswith("DeviceError: Ray assigned GPU") and 'device = "cpu"' in auto, auto
    assert cpu == "cpu"
