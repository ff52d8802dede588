"""tuning.retention against a real MLflow SQLite store and real checkpoint directories: after the
front is final only front trials keep (and log) their checkpoints, errored trials keep theirs,
nothing goes while MLflow lacks the front, `export` of a removed trial says why. The same on a
real search: tests/test_search.py and tests/test_load.py."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import prunetune_here
from trainables.names import DONE, PHASE, TRAIN
from tuning.names import CHECKPOINT_TAG
from tuning import report, retention, runs
from tuning.front import Front, Rules
from tuning.results import SearchResult
from tuning.spec import from_dict
from tuning.tracking import MlflowTracking

STATUS = {"t1": "done", "t2": "done", "t3": "error", "t4": "diverged"}  # t1 alone is on the front


def search_dir(exp_dir: Path) -> SearchResult:
    """A finished search's result as results.collect builds it, with Tune's trial directories."""
    rows = []
    for trial_id, status in STATUS.items():
        ckpt = exp_dir / f"trial_{trial_id}" / "checkpoint_000001"
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint.pt").write_bytes(b"w" * 1000)
        (ckpt / "beside.pt").write_bytes(b"w" * 10)  # what a trial saves beside its weights goes along
        (ckpt.parent / "result.json").write_text("{}\n")
        rows.append({"trial_id": trial_id, "status": status, "checkpoint": str(ckpt), "trial_dir": str(ckpt.parent)})
    points = pd.DataFrame([{"trial_id": "t1", "method": "global_l1", "ratio": 0.5, "int8": False}])
    return SearchResult(exp_dir, pd.DataFrame(rows), Front(points, points, Rules(), ()))


@pytest.fixture
def finished(tmp_path):
    """A search whose trials are mirrored in MLflow; ``end()`` marks its front final."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("unit", artifact_location=str(tmp_path / "artifacts"))
    exp_dir = tmp_path / "rr" / "unit-1"
    res = search_dir(exp_dir)

    def tracker(keep: str = "front") -> tuple[MlflowTracking, object]:
        spec = from_dict({"name": "unit", "search": {"storage_path": str(exp_dir.parent), "keep_checkpoints": keep}})
        t = MlflowTracking(uri, spec.to_dict(), exp_dir)
        for trial_id, status in STATUS.items():
            t.log_result(report.of({"trial_id": trial_id, PHASE: TRAIN, "epoch": 1, "val_accuracy": 0.5}))
            t.client.set_tag(t.runs[trial_id], "prunetune.status", status)
        return t, spec

    return uri, res, tracker


def kept(res: SearchResult) -> set[str]:
    return {d.parent.name.removeprefix("trial_") for d in res.path.glob("trial_*/checkpoint_*")}


def test_plan_keeps_the_front_and_what_may_still_run():
    trials = pd.DataFrame([{"trial_id": t, "status": s, "checkpoint": "c"} for t, s in STATUS.items()]
                          + [{"trial_id": "t5", "status": "stopped", "checkpoint": None}])
    front = pd.DataFrame({"trial_id": ["t1", "t1"]})
    p = retention.plan(trials, front, "front")
    assert (p.log, p.remove) == (["t1"], ["t2", "t4"])  # t3 errored: resume retries it; t5 has none
    p = retention.plan(trials, front, "all")
    assert (p.log, p.remove) == (["t1", "t2"], [])  # a diverged trial's checkpoint is no model
    assert retention.plan(trials, front.iloc[:0], "front").remove == ["t1", "t2", "t4"]


def test_front_keeps_only_front_checkpoints_once_mlflow_has_the_front(finished, capsys):
    uri, res, tracker = finished
    t, spec = tracker()
    assert retention.apply(spec, res, t) is None  # the parent run is still RUNNING: the front is not final
    assert kept(res) == set(STATUS) and "kept until MLflow holds the search's front" in capsys.readouterr().out
    t.end()
    for _ in range(2):  # a resumed search applies it again: same result, nothing logged twice
        done = retention.apply(spec, res, t)
        assert (done.log, done.remove) == (["t1"], ["t2", "t4"])
        assert kept(res) == {"t1", "t3"}
        assert all((res.path / f"trial_{x}" / "result.json").is_file() for x in STATUS)  # only checkpoints go
    assert "2 removed from storage" in capsys.readouterr().out
    client = MlflowClient(uri)
    found = runs.child_runs(client, t.experiment_id, t.parent_id)
    assert {x: r.data.tags.get(CHECKPOINT_TAG) for x, r in found.items()} == {
        "t1": "kept", "t2": "removed", "t3": None, "t4": "removed"}
    assert sorted(a.path for a in client.list_artifacts(found["t1"].info.run_id, "checkpoint")) == [
        "checkpoint/beside.pt", "checkpoint/checkpoint.pt"]
    assert all(client.list_artifacts(found[x].info.run_id) == [] for x in ("t2", "t3", "t4"))


def test_all_keeps_and_logs_every_finished_trial(finished):
    uri, res, tracker = finished
    t, spec = tracker("all")
    t.end()
    retention.apply(spec, res, t)
    assert kept(res) == set(STATUS)
    found = runs.child_runs(MlflowClient(uri), t.experiment_id, t.parent_id)
    assert {x for x, r in found.items() if r.data.tags.get(CHECKPOINT_TAG) == "kept"} == {"t1", "t2"}


def test_export_of_a_removed_trial_says_which_setting_keeps_it(finished, tmp_path):
    uri, res, tracker = finished
    t, spec = tracker()
    t.end()
    retention.apply(spec, res, t)
    r = prunetune_here("export", t.runs["t2"], "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                       "--tracking-uri", uri)
    assert r.returncode == 2, r.stderr
    assert "its checkpoint was not kept" in r.stderr and "keep_checkpoints = \"all\"" in r.stderr
    assert "--set search.keep_checkpoints=all" in r.stderr
    t.client.set_tag(t.runs["t3"], "prunetune.status", DONE)  # a done trial not yet through retention
    r = prunetune_here("export", t.runs["t3"], "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                       "--tracking-uri", uri)
    assert r.returncode == 2 and "logged once the search's front is final" in r.stderr
