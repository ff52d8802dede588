"""tuning.storage on a real pyarrow filesystem URI (``file://``, the same calls an ``s3://`` one
makes; tests/test_object_store.py runs them against an S3-compatible server): the driver's
local copy pushed and pulled, checkpoints downloaded and deleted, the stopping records of a
restored scheduler read back from the store."""
from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pytest

from trainables.errors import StorageError
from tuning import stopping, storage
from trainables.names import PHASE, TRAIN


def test_the_local_copy_goes_up_and_comes_back_top_level_only(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.WORK_DIR_ENV, str(tmp_path / "work"))
    uri = f"file://{tmp_path}/bucket/rr/run-1"
    assert storage.work_dir(uri) == tmp_path / "work" / "file" / str(tmp_path).lstrip("/") / "bucket/rr/run-1"
    local = storage.local_parent(f"file://{tmp_path}/bucket/rr") / "run-1"
    assert storage.location(f"file://{tmp_path}/bucket/rr", local) == uri
    local.mkdir(parents=True)
    (local / "prunetune_spec.json").write_text("{}")
    (local / "trials.csv").write_text("a\n1\n")
    (local / ".prunetune.lock").write_text("pid 1")  # this machine's, never shared
    (local / "checkpoints").mkdir()  # downloads, not the driver's files
    (tmp_path / "bucket/rr/run-1").mkdir(parents=True)
    storage.push(local, uri)
    assert sorted(p.name for p in (tmp_path / "bucket/rr/run-1").iterdir()) == ["prunetune_spec.json", "trials.csv"]
    (tmp_path / "bucket/rr/run-1/trial_0").mkdir()  # Tune's, stays in the store
    elsewhere = tmp_path / "other"
    storage.pull(uri, elsewhere)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["prunetune_spec.json", "trials.csv"]
    assert storage.read_text(f"{uri}/trials.csv") == "a\n1\n" and storage.read_text(f"{uri}/nothing") is None


def test_checkpoints_are_downloaded_for_the_wanted_trials_and_deleted_in_the_store(tmp_path):
    store = tmp_path / "bucket/rr/run-1"
    for t in ("a", "b"):
        ckpt = store / f"trial_{t}" / "checkpoint_000002"
        (ckpt / "points").mkdir(parents=True)
        (ckpt / "checkpoint.pt").write_bytes(b"w" * 100)
        (ckpt / "points" / "global_l1@0.onnx").write_bytes(b"o" * 10)
        (store / f"trial_{t}" / "result.json").write_text("{}")
    # as Ray's results name them: paths on the store's filesystem, without the scheme
    trials = pd.DataFrame({"trial_id": ["a", "b"], "checkpoint": [str(store / f"trial_{t}/checkpoint_000002") for t in "ab"],
                           "trial_dir": [str(store / f"trial_{t}") for t in "ab"]})
    local = tmp_path / "copy"
    out = storage.localize(trials, local, "file", {"a"})
    assert out.checkpoint[0] == str(local / "checkpoints" / "a") and out.checkpoint[1] == trials.checkpoint[1]
    assert (local / "checkpoints/a/points/global_l1@0.onnx").read_bytes() == b"o" * 10
    assert not (local / "checkpoints/b").exists() and out.trial_dir[1] == f"file://{trials.trial_dir[1]}"
    assert storage.remove_checkpoints(out.trial_dir[1]) == 110
    assert not (store / "trial_b/checkpoint_000002").exists() and (store / "trial_b/result.json").is_file()
    assert (store / "trial_a/checkpoint_000002").is_dir()  # only the one asked for


def test_a_restored_scheduler_reads_the_decisions_kept_in_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.WORK_DIR_ENV, str(tmp_path / "work"))
    uri = f"file://{tmp_path}/bucket/rr/run-1"
    (tmp_path / "bucket/rr/run-1").mkdir(parents=True)
    first = stopping.ParetoStopping(tmp_path / "driver1", (1, 2), eta=10, margin=0.02, remote=uri)
    pickled = pickle.dumps(first)  # as Tune saved it when the search began: no decisions yet
    report = {PHASE: TRAIN, "epoch": 1, "predicted_accuracy": 0.9, "predicted_latency_ms": 1.0}
    assert first.decide("t1", report) == "CONTINUE"
    assert first.decide("t2", {**report, "predicted_accuracy": 0.5}) == "STOP"
    restored = pickle.loads(pickled)  # another machine resumes: its own copy, the store's records
    assert restored.stopped.keys() == {"t2"} and restored.records["1"]["t1"] == (0.9, 1.0)
    assert restored.path == storage.work_dir(uri) / stopping.STOPPING_FILE


def test_a_storage_path_pyarrow_cannot_open_is_one_clear_error():
    with pytest.raises(StorageError, match="use a URI pyarrow's filesystems accept"):
        storage.filesystem("nosuchscheme://bucket/prefix")
    assert storage.is_remote("s3://b/p") and not storage.is_remote(Path("/shared/ray_results"))
