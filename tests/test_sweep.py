import pytest
import torch

from trainables import compress, data
from trainables.data import DataConfig
from trainables.measure import sparsity
from trainables.sweep import COLUMNS, SweepConfig, finetune, run_sweep
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
    assert g.loc[0.0, "accuracy"] == evaluate(model, splits.val.__class__(splits.val.x[:30], splits.val.y[:30]))
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


def test_finetune_columns(trained):
    model, splits = trained
    df = run_sweep(model, splits, quick(ratios=[0.0, 0.7], finetune_epochs=1, finetune_lr=0.01), TRAIN, progress=False)
    row = df.set_index("ratio").loc[0.7]
    assert 0 <= row.accuracy_no_finetune <= 1 and 0 <= row.accuracy <= 1
    assert df.set_index("ratio").loc[0.0].isna()["accuracy_no_finetune"]  # nothing to fine-tune at 0


@pytest.mark.parametrize("kw, msg", [({"methods": ["magic"]}, "unknown method 'magic'"),
                                     ({"ratios": [1.0]}, r"outside \[0, 1\)")])
def test_bad_input(trained, kw, msg):
    model, splits = trained
    with pytest.raises(ValueError, match=msg):
        run_sweep(model, splits, quick(**kw), TRAIN, progress=False)
