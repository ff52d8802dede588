"""Searches where teams run them (issue 21): results and checkpoints on an object store, the
Optuna study in a database server, MLflow's artifacts in the same store. Real parts on loopback:
an S3-compatible server that checks credentials (moto_server: ``servers.S3Server``), a
PostgreSQL server (``servers.PostgresServer``), a two-node Ray cluster, an ``mlflow server`` whose
artifacts go to the bucket.

- bad input, each one line before any training: an unreachable endpoint, a missing bucket,
  refused credentials, an object-store ``storage_path`` with the study in SQLite;
- a search on both nodes: the worker node dies mid-trial and its trial continues from its
  checkpoint in the bucket; the driver is killed and ``prunetune resume s3://...``, from another
  working directory (another machine), finishes the search from the bucket and the database;
  retention removes the off-front trials' checkpoints from the bucket; ``prunetune export`` of a
  front trial reads its checkpoint from MLflow's artifacts in the bucket, and of the registered
  model its file there.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, prunetune, prunetune_here, write_spec
from servers import MlflowServer, RayCluster, S3Server, free_port, wait_for

pytestmark = pytest.mark.slow  # servers and a cluster per module
ROOT = "s3://prunetune/rr"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    c = RayCluster(tmp_path_factory.mktemp("cluster"))
    c.env.update(s3.env)  # every node writes checkpoints to the bucket with its own credentials
    c.env.pop("PRUNETUNE_STORAGE_PATH", None)
    try:
        c.start(head_cpus=1)
        c.add_node(cpus=1)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory, s3):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), artifacts="s3://prunetune/mlartifacts",
                          env={**s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.url}).start()
    yield server
    server.stop()


def read(s3: S3Server, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def reports(s3: S3Server, trial_prefix: str) -> list[dict]:
    key = f"{trial_prefix}result.json"
    if key not in s3.keys(trial_prefix):
        return []
    return [json.loads(line) for line in read(s3, key).decode().splitlines() if line.strip()]


def trial_prefixes(s3: S3Server, exp_prefix: str) -> list[str]:
    return sorted({k[:k.index("/", len(exp_prefix)) + 1] for k in s3.keys(exp_prefix)
                   if "/train_and_sweep" in k[len(exp_prefix) - 1:]})


def saved_epochs(s3: S3Server, exp_prefix: str) -> dict[str, int]:
    """The epoch of each trial's last checkpoint in the experiment state Tune saved in the bucket: where a
    resume goes on from. Tune saves the state at every checkpoint and uploads it in the background with the
    reports, so a driver killed mid-upload leaves it up to one epoch behind the reports."""
    keys = sorted(k for k in s3.keys(exp_prefix) if k[len(exp_prefix):].startswith("experiment_state-"))
    state = json.loads(read(s3, keys[-1]))
    last = [json.loads(meta).get("last_result") or {} for _, meta in state["trial_data"]]
    return {r["trial_id"]: r.get("epoch", 0) for r in last if "trial_id" in r}


def test_bad_object_store_input_is_one_line_before_training(s3, postgres, tmp_path):
    spec = write_spec(tmp_path / "badstore.toml", ROOT, num_samples=2, epochs=1)
    env = {**os.environ, **s3.env, "PRUNETUNE_WORK_DIR": str(tmp_path / "work")}
    study = f"search.study_storage={postgres.url()}"
    cases = {
        "unreachable endpoint": ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, [study],
                                 "cannot reach the object store"),
        "missing bucket": ({}, [study, "search.storage_path=s3://no-such-bucket/rr"],
                           "bucket 'no-such-bucket' does not exist"),
        "wrong credentials": ({"AWS_SECRET_ACCESS_KEY": "not-the-key"}, [study], "refused the credentials"),
        "a SQLite study": ({}, [], "study_storage"),
    }
    for what, (extra_env, sets, fragment) in cases.items():
        args = [a for s in sets for a in ("--set", s)]
        r = prunetune_here("search", str(spec), *args, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                           env={**env, **extra_env})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], (what, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and postgres.password not in r.stderr + r.stdout, what
    assert not (tmp_path / "work").exists() and s3.keys("rr/badstore") == []  # nothing was started


def test_search_on_the_bucket_survives_a_lost_node_and_a_killed_driver(cluster, s3, postgres, mlflow, tmp_path):
    head, worker = list(cluster.nodes.values())[:2]
    spec = write_spec(tmp_path / "bucketed.toml", ROOT, num_samples=2, epochs=4, train_size=120, register_models=1)
    env = {**cluster.env, "PRUNETUNE_STUDY_STORAGE": postgres.url(), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "search.log"
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "search", str(spec), "--address", cluster.address,
                             "--tracking-uri", mlflow.url], cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**env, "PRUNETUNE_WORK_DIR": str(tmp_path / "driver1")})
    try:
        def alive() -> None:
            if proc.poll() is not None:
                raise AssertionError(log.read_text()[-5000:])

        def exp_prefix() -> str | None:
            alive()
            found = {k.split("/")[1] for k in s3.keys("rr/bucketed-")}
            return f"rr/{found.pop()}/" if found else None

        prefix = wait_for(exp_prefix, "the experiment in the bucket", 120, log)

        def a_trial_checkpointed_on_the_worker() -> str | None:
            alive()
            for t in trial_prefixes(s3, prefix):
                rs = reports(s3, t)
                if any(x.get("node_id") == worker and x.get("phase") == "train" for x in rs) \
                        and not any(x.get("phase") == "done" for x in rs):
                    return t
            return None

        victim = wait_for(a_trial_checkpointed_on_the_worker, "a trial checkpointing on the worker node", 300, log)
        cluster.kill_node(worker)

        def continued_on_the_head() -> list | None:
            alive()
            train = [(x["epoch"], x["node_id"]) for x in reports(s3, victim) if x.get("phase") == "train"]
            return train if any(n == head for _, n in train) else None

        # the search goes on without the node: the trial it ran goes on from its checkpoint in the bucket
        moved = wait_for(continued_on_the_head, "the lost node's trial going on on the head node", 600, log)
        on_worker = [e for e, n in moved if n == worker]
        after = [e for e, n in moved if n == head]
        assert on_worker and after[0] == on_worker[-1] + 1, moved  # not from scratch: from the worker's checkpoint
        proc.kill()  # then its driver dies too
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "trials.csv" not in " ".join(s3.keys(prefix))  # it had not finished
    before = {t: reports(s3, t) for t in trial_prefixes(s3, prefix)}
    saved = saved_epochs(s3, prefix)
    uri = f"s3://prunetune/{prefix.rstrip('/')}"
    assert uri in log.read_text()  # where to resume from, as printed
    # another machine resumes it: its own working directory, the password from its environment
    r = prunetune("resume", uri, "--address", cluster.address, env={**env, "PRUNETUNE_WORK_DIR": str(tmp_path / "driver2")},
                  timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert f"results: {uri} (local copy: " in r.stdout, r.stdout[-3000:]  # the tables are in the bucket
    trials = pd.read_csv(io.BytesIO(read(s3, f"{prefix}trials.csv")), dtype={"trial_id": str})
    assert len(trials) == 2 and (trials.status == "done").all(), trials.to_string()
    for t, old in before.items():  # each trial goes on from the checkpoint the saved state names, none from scratch
        rs = reports(s3, t)
        again = [x["epoch"] for x in rs[len(old):] if x.get("phase") == "train"]
        trial_id = old[0]["trial_id"]
        assert rs[:len(old)] == old and rs[-1]["phase"] == "done", (t, len(old), len(rs))
        assert not again or again[0] == saved.get(trial_id, 0) + 1, (t, saved, again)
    assert saved[before[victim][0]["trial_id"]] >= on_worker[-1], saved  # the dead node's checkpoint, in the bucket
    # retention: only the front's trials keep checkpoints in the bucket
    front = set(pd.read_csv(io.BytesIO(read(s3, f"{prefix}pareto.csv")), dtype={"trial_id": str}).trial_id)
    assert trials.trial_dir.str.startswith(f"s3://prunetune/{prefix}").all(), trials.trial_dir  # where they live
    kept = {r.trial_id for r in trials.itertuples()
            if any("/checkpoint_" in k for k in s3.keys(r.trial_dir.removeprefix("s3://prunetune/") + "/"))}
    # the front's trials keep theirs, the other's were removed (both trials are on it only when their best
    # points tie: the same architecture has one quiet latency, and accuracy on 20 images ties at times)
    assert kept == front, (kept, front)
    # export a front trial's model: its checkpoint comes from MLflow's artifacts, which live in the bucket
    points = json.loads(prunetune("pareto", "--experiment", "bucketed", "--json", "--tracking-uri", mlflow.url,
                                  env=env).stdout.strip().splitlines()[-1])
    out = tmp_path / "front.onnx"
    clean = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # the client needs no store credentials
    r = prunetune("export", points[0]["run_id"], "--ratio", "0.3", "-o", str(out), "--tracking-uri", mlflow.url,
                  env=clean)
    assert r.returncode == 0 and out.stat().st_size > 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert any(k.endswith("checkpoint/checkpoint.pt") for k in s3.keys("mlartifacts/")), s3.keys("mlartifacts/")
    # the registered model of the front's best point, its file in the bucket too, exported as registered
    r = prunetune("export", "models:/bucketed@best-accuracy", "-o", str(tmp_path / "best.onnx"), "--tracking-uri",
                  mlflow.url, env=clean)
    assert r.returncode == 0 and "the same bytes" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert any(k.endswith(".onnx") and "/models/" in k for k in s3.keys("mlartifacts/")), s3.keys("mlartifacts/")
