import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from trainables import data
from trainables.data import DataConfig
from trainables.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, reap_scratch, scratch_dir
from trainables.train import Diverged, TrainConfig, fit


@pytest.fixture(scope="module")
def tiny():
    return data.load(DataConfig(train_size=80, test_size=40, val_fraction=0.25))


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=20, lr=0.002, optimizer="adam", threads=2, schedule="onecycle")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow  # three 3-epoch runs
def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    full = fit(tiny, cfg(), checkpoint_path=tmp_path / "full.pt")
    # interrupted after epoch 2: a 3-epoch run whose process dies after its 2nd checkpoint
    seen = []

    def die_after_two(m):
        seen.append(m["epoch"])
        if m["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny, cfg(), checkpoint_path=tmp_path / "part.pt", on_epoch=die_after_two)
    ckpt = load_checkpoint(tmp_path / "part.pt")
    assert ckpt["epoch"] == 2 and seen == [1, 2]
    resumed = fit(tiny, cfg(), checkpoint_path=tmp_path / "part.pt", resume=ckpt)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # and the saved final checkpoint reloads to the same model
    reloaded = model_from_checkpoint(load_checkpoint(tmp_path / "part.pt"))
    torch.testing.assert_close(reloaded.state_dict()["fc.weight"], resumed.model.state_dict()["fc.weight"])


def test_different_seed_gives_different_run(tiny):
    a = fit(tiny, cfg(epochs=1, seed=0))
    b = fit(tiny, cfg(epochs=1, seed=1))
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]


def test_fit_reports_metrics_and_learns(tiny):
    r = fit(tiny, cfg(epochs=3))
    h = r.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.val_accuracy <= 1.0
    assert r.images_per_second > 0 and r.train_seconds > 0
    assert all(k in h[0] for k in ("train_loss", "train_accuracy", "val_accuracy", "images_per_second", "elapsed"))


def test_nan_lr_raises_diverged_with_epoch_and_lr(tiny, tmp_path):
    with pytest.raises(Diverged) as e:
        fit(tiny, cfg(lr=1e12, optimizer="sgd", schedule="constant", epochs=2), checkpoint_path=tmp_path / "c.pt")
    assert e.value.epoch == 1 and "lr=1e+12" in str(e.value) and "epoch 1" in str(e.value)
    assert not math.isfinite(e.value.loss)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a prunetune checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by prunetune"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"arch": "resnet50"}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="not a complete prunetune checkpoint: epoch"):
        load_checkpoint(tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="does not say what network"):  # no stem, classes, input shape
        model_from_checkpoint({"arch": "resnet50", "model": {}})


def test_a_trial_scratch_dir_reaps_those_of_killed_trials(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_dir, live_dir = tmp_path / f"prunetune-trial-{killed.pid}-x1", tmp_path / f"prunetune-trial-{live.pid}-x2"
        other = tmp_path / "prunetune-trial-notapid"
        for d in (dead_dir, live_dir, other):
            d.mkdir()
            (d / "checkpoint.pt").write_bytes(b"x" * 1000)
        scratch = scratch_dir()
        assert not dead_dir.exists() and live_dir.exists() and other.exists()
        mine = Path(scratch.name)
        assert mine.parent == tmp_path and mine.name.startswith(f"prunetune-trial-{os.getpid()}-")
        assert reap_scratch() == []  # this process is alive: its scratch stays
        scratch.cleanup()
        assert not mine.exists()
    finally:
        live.kill()
        live.wait()
    assert reap_scratch() == [live_dir] and not live_dir.exists()
