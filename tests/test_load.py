"""A search of 6 short trials, all running at once (experiments/bench_load.py, which runs 100) against the MLflow
server with basic authentication, credentials from the environment: nothing lost (every trial
done, exactly one child run each, the Optuna study holds every trial and its sweep evidence),
the credentials in no log line, and the default checkpoint retention (only the front's trials
keep a checkpoint; `export` of another trial says which setting keeps it)."""
import importlib.util
import time
from pathlib import Path

import pytest

from conftest import REPO, prunetune_here

pytestmark = pytest.mark.slow  # a 6-trial search, ~1.5 min on 2 cores

TRIALS = 6


def bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "experiments" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concurrent_trials_nothing_lost_no_credential_logged_front_checkpoints_only(auth_mlflow, tmp_path,
                                                                                     monkeypatch, capfd):
    for k, v in auth_mlflow.credentials.items():
        monkeypatch.setenv(k, v)
    started = time.time()
    bench = bench_load()
    res, figures = bench.run(TRIALS, tmp_path, auth_mlflow.url, slots=8)
    counts = bench.check(res, auth_mlflow.url, TRIALS)  # raises, naming what is missing
    out, err = capfd.readouterr()
    removed = TRIALS - counts["front_trials"]
    assert removed > 0 and f"{removed} removed from storage" in out, out[-3000:]
    # the credentials are in no log line: the driver's and the trials' output (Ray forwards it), the
    # MLflow server's log, the logs of the Ray session this search started
    password = auth_mlflow.credentials["MLFLOW_TRACKING_PASSWORD"]
    sessions = [s for s in Path("/tmp/ray").glob("session_2*") if s.stat().st_mtime >= started - 5]
    logs = [f for s in sessions for f in (s / "logs").rglob("*") if f.is_file()]
    assert logs
    for text in [out, err, auth_mlflow.log.read_text(), *(f.read_text(errors="replace") for f in logs)]:
        assert password not in text
    # export of a trial whose checkpoint retention removed
    from mlflow import MlflowClient

    client = MlflowClient(auth_mlflow.url)
    trial = sorted(set(res.trials.trial_id) - set(res.front.rows.trial_id))[0]
    (run,) = client.search_runs([client.get_experiment_by_name("load").experiment_id],
                                f"tags.`prunetune.trial_id` = '{trial}'")
    r = prunetune_here("export", run.info.run_id, "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                       "--tracking-uri", auth_mlflow.url)
    assert r.returncode == 2 and "its checkpoint was not kept" in r.stderr, r.stderr
    assert "--set search.keep_checkpoints=all" in r.stderr and not (tmp_path / "m.onnx").exists()
    print(f"load, {TRIALS} trials: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in {**figures, **counts}.items()))
