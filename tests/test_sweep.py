import pytest
import torch

from trainables import compress, data
from trainables.data import DataConfig
from trainables.measure import sparsity
from trainables.finetune import distillation_loss, finetune
from trainables.sweep import COLUMNS, SweepConfig, run_sweep
from trainables.train import TrainConfig, evaluate, fit

TRAIN = TrainConfig(epochs=1, batch_size=30, lr=0.002, optimizer="adam", threads=2, eval_batch_size=64)


@pytest.fixture(scope="module")
def trained():
    splits = data.load(DataConfig(train_size=120, test_size=40, val_fraction=0.25))
    return fit(splits, TRAIN).model.eval(), splits


def quick(**kw) -> SweepConfig:
    base = dict(methods=["global_l1"], ratios=[0.0, 0.5], latency_runs=5, latency_warmup=1, eval_size=30)
    base.update(kw)
    return SweepConfig(**base)


def test_table_rows_and_columns(trained):
    model, splits = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = run_sweep(model, splits, quick(methods=["global_l1", "channel_l1"]), TRAIN, progress=False)
    assert list(df.columns) == COLUMNS
    assert len(df) == 4 and set(df.method) == {"global_l1", "channel_l1"} and not df.int8.any()
    g = df[df.method == "global_l1"].set_index("ratio")
    assert g.loc[0.5, "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert g.loc[0.0, "accuracy"] == evaluate(model, splits.val.head(30))
    c = df[df.method == "channel_l1"].set_index("ratio")
    assert c.loc[0.5, "macs"] < 0.5 * c.loc[0.0, "macs"]
    assert c.loc[0.5, "nonzero_params"] < g.loc[0.5, "nonzero_params"]
    # latency: baked-in unstructured zeros run the dense graph (one cached measurement)
    assert g.loc[0.5, "latency_ms"] == g.loc[0.0, "latency_ms"] and g.loc[0.5, "latency_speedup"] == 1.0
    assert (df.latency_p90_ms >= df.latency_ms).all() and (df.size_mb > 0).all()
    for k, v in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(v, before[k]), k


def test_int8_doubles_points_and_latency_cache_is_shared(trained):
    model, splits = trained
    cache: dict = {}
    df = run_sweep(model, splits, quick(int8=True), TRAIN, latency_cache=cache, progress=False)
    assert len(df) == 4 and df.int8.sum() == 2
    assert df[df.int8].latency_ms.max() < df[~df.int8].latency_ms.min()
    n = len(cache)
    again = run_sweep(model, splits, quick(int8=True), TRAIN, latency_cache=cache, progress=False)
    assert len(cache) == n  # a second trial measures nothing new
    assert list(again.latency_ms) == list(df.latency_ms)


def test_a_pruned_point_alone_builds_no_dense_file_once_the_dense_latency_is_timed(trained, monkeypatch):
    """An early-stopping rung sweeps one pruned point; its latency_speedup needs the dense
    latency, which the search's cache holds after the first rung: no dense ONNX export for it."""
    from trainables import ort
    model, splits = trained
    cache: dict = {}
    one = quick(methods=["channel_l1"], ratios=[0.5], runtime="onnxruntime")
    first = run_sweep(model, splits, one, TRAIN, latency_cache=cache, progress=False)
    exports = []
    real = ort.export_core
    monkeypatch.setattr(ort, "export_core", lambda m, name: exports.append(name) or real(m, name))
    again = run_sweep(model, splits, one, TRAIN, latency_cache=cache, progress=False)
    assert exports == ["channel_l1 at ratio 0.5"]  # the point's own file only
    assert list(again.latency_speedup) == list(first.latency_speedup) and (first.latency_speedup > 1).all()


def test_finetune_keeps_pruned_weights_zero(trained):
    model, splits = trained
    pruned = compress.prune(model, "global_l1", 0.6)
    masks = {n: b.clone() for n, b in pruned.named_buffers() if n.endswith("weight_mask")}
    tuned = finetune(pruned, splits.train, TRAIN, epochs=1, lr=0.01)
    changed = False
    for name, module in tuned.named_modules():
        if hasattr(module, "weight_mask"):
            mask = masks[f"{name}.weight_mask"]
            assert torch.equal(module.weight_mask, mask)
            assert (module.weight[mask == 0] == 0).all()
            changed |= not torch.equal(module.weight_orig[mask == 1], dict(pruned.named_modules())[name].weight_orig[mask == 1])
    assert changed  # it did train
    assert sparsity(compress.make_permanent(tuned)) == pytest.approx(0.6, abs=1e-3)


def test_distillation_finetune_keeps_zeros_and_channel_counts(trained):
    model, splits = trained
    cfg = quick()
    teacher = model.eval()
    pruned = compress.prune(model, "layer_l1", 0.5)
    tuned = finetune(pruned, splits.train, TRAIN, 1, 0.01, distillation_loss(teacher, cfg))
    assert sparsity(compress.make_permanent(tuned)) == pytest.approx(0.5, abs=1e-3)
    assert not torch.equal(tuned.fc.weight_orig, pruned.fc.weight_orig)  # it trained
    narrow = compress.prune(model, "channel_l1", 0.3)
    tuned = finetune(narrow, splits.train, TRAIN, 1, 0.01, distillation_loss(teacher, cfg))
    assert _channels(tuned) == _channels(narrow)


def _channels(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("round_to", [1, 8, 16])
def test_channel_counts_are_multiples_of_round_to(trained, round_to):
    model, _ = trained
    for ratio in (0.1, 0.3, 0.45):
        kept = _channels(compress.prune(model, "channel_l1", ratio, round_to=round_to))
        assert all(c % round_to == 0 for c in kept), (ratio, kept)
        assert all(c <= full * (1 - ratio) + round_to for c, full in zip(kept, _channels(model)))


def test_distillation_loss_pulls_towards_the_teacher():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    loss = distillation_loss(teacher, quick(distill_weight=1.0))
    assert loss(teacher(x), x, y).item() == pytest.approx(0.0, abs=1e-5)  # KL to itself
    assert loss(torch.zeros(8, 10), x, y).item() > 0.0
    hard = distillation_loss(teacher, quick(distill_weight=0.0))
    assert hard(teacher(x), x, y).item() == pytest.approx(torch.nn.functional.cross_entropy(teacher(x), y).item())


@pytest.mark.slow
def test_finetuning_gives_the_dense_point_equal_compute(trained):
    model, splits = trained
    cfg = quick(methods=["global_l1", "channel_l1"], ratios=[0.0, 0.7], finetune_epochs=1)
    df = run_sweep(model, splits, cfg, TRAIN, progress=False)
    assert (df.finetune_epochs == 1).all() and df.accuracy_no_finetune.notna().all()
    dense = df[df.ratio == 0.0]
    assert len(dense) == 2 and dense.accuracy.nunique() == 1  # fine-tuned once, the same for every method
    # the row's "before" is the trained model; its accuracy is the model after the same epochs as the pruned points
    assert dense.accuracy_no_finetune.iloc[0] == evaluate(model, splits.val.head(30))
    plain = run_sweep(model, splits, quick(ratios=[0.0, 0.7]), TRAIN, progress=False)
    assert (plain.finetune_epochs == 0).all() and plain.accuracy_no_finetune.isna().all()


@pytest.mark.slow
def test_qat_int8_rows_keep_the_mask(trained):
    model, splits = trained
    cfg = quick(methods=["global_l1"], ratios=[0.5], int8=True, int8_mode="qat", finetune_epochs=1)
    df = run_sweep(model, splits, cfg, TRAIN, progress=False)
    q = df[df.int8].iloc[0]
    assert q.sparsity >= 0.5 - 1e-3  # QAT did not revive pruned weights
    assert 0 <= q.accuracy <= 1 and q.size_mb < 0.5 * df[~df.int8].iloc[0].size_mb  # INT8 weights


@pytest.mark.parametrize("kw, msg", [({"methods": ["magic"]}, "unknown method 'magic'"),
                                     ({"ratios": [1.0]}, r"outside \[0, 1\)")])
def test_bad_input(trained, kw, msg):
    model, splits = trained
    with pytest.raises(ValueError, match=msg):
        run_sweep(model, splits, quick(**kw), TRAIN, progress=False)
