"""The search on a real two-node Ray cluster on loopback (`ray start --head` with the dashboard
+ `ray start --address`), an `mlflow server` with a SQL backend, real processes killed:

- `prunetune submit` runs a search as a Ray Job on the head, trials on both nodes, its results in
  the durable default on the head (no storage path anywhere), its MLflow credentials from
  submit's environment only (an authenticated server), in no log line; the job's working
  directory deleted, the printed `prunetune resume` command (a job as well) finds the results;
- a worker node killed mid-trial of a search whose driver attached through Ray Client
  (`--address ray://...`): the trial continues from its epoch checkpoint on the other node, the
  search finishes every trial, MLflow has one child run per trial;
- the MLflow server down during a search: training goes on, `prunetune resume` back-fills.
"""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tuning.names import CREDENTIALS_FILE

from conftest import REPO, prunetune, write_spec
from servers import MlflowServer, RayCluster, wait_for

pytestmark = pytest.mark.slow  # a Ray cluster and an MLflow server per module, minutes per test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    c = RayCluster(workdir)
    # a home of its own on the head (where a submitted search's durable default is), no storage setting
    c.env["HOME"] = str(workdir / "home")
    (workdir / "home").mkdir()
    c.env.pop("PRUNETUNE_STORAGE_PATH", None)
    try:
        c.start(head_cpus=1)
        c.add_node(cpus=1, resources={"edge": 1})  # the node that stands for the deployment hardware
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def mlflow_runs(uri: str, experiment: str) -> tuple[list, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return ([r for r in runs if r.data.tags.get("prunetune.kind") == "search"],
            [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"])


def reports(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def test_submit_runs_the_search_as_a_ray_job_on_both_nodes(cluster, auth_mlflow, tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "submitted.toml", None, num_samples=2, epochs=1)
    env = {**cluster.env, **auth_mlflow.credentials}  # the credentials: submit's environment only
    r = prunetune("submit", str(spec), "--address", cluster.jobs_address, "--tracking-uri", auth_mlflow.url,
                  "--set", "search.latency_target=edge", "--follow", env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "submitted Ray job raysubmit_" in r.stdout and "ray job logs raysubmit_" in r.stdout
    assert ": SUCCEEDED" in r.stdout and "Pareto front" in r.stdout, out[-5000:]
    assert "is shared by all 2 nodes" in r.stdout  # the storage probe ran on the cluster
    # where the results go, printed at submission (before the job's own output): the durable default on the head
    results = Path(re.search(r"results on the cluster: (\S+) \(the durable default", r.stdout).group(1))
    assert results.parent == Path(cluster.env["HOME"]) / "prunetune" / "ray_results"
    assert results.name.startswith("submitted-") and r.stdout.index("results on the cluster") < r.stdout.index(
        "job working directory")
    job_dir = Path(re.search(r"job working directory (\S+) ", r.stdout).group(1))
    assert job_dir not in results.parents and "runtime_resources" in job_dir.parts
    trials = pd.read_csv(results / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and (trials.status == "done").all()
    assert set(trials.node_id) == set(cluster.nodes.values())  # one trial per node
    # the front was timed and its artifacts checked on the node with the latency_target resource
    edge = list(cluster.nodes.values())[1]
    points = pd.read_csv(results / "all_points.csv", dtype={"trial_id": str})
    assert set(points[points.latency_source == "quiet"].latency_node_id) == {edge}
    assert points.target_test_accuracy.notna().any()
    shutil.rmtree(job_dir, ignore_errors=True)  # what Ray does to it: the results stay
    assert {"optuna.db", "trials.csv", "pareto.csv", "prunetune_spec.json"} <= {f.name for f in results.iterdir()}
    # the printed resume command (a Ray job too) finds them
    resume = shlex.split(re.search(r"resume it:  (prunetune resume .+) \[--follow\]", r.stdout).group(1))
    assert resume[2] == str(results)
    again = prunetune(*resume[1:], "--follow", env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert f"resuming search submitted from {results}" in again.stdout and ": SUCCEEDED" in again.stdout
    for k, v in auth_mlflow.credentials.items():
        monkeypatch.setenv(k, v)
    parents, children = mlflow_runs(auth_mlflow.url, "submitted")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["prunetune.trial_id"] for c in children) == sorted(trials.trial_id)
    # the credentials are in no log line: submit's and resume's output, the MLflow server's log, every log of the
    # Ray session (the job drivers', the runtime-env agent's, the workers')
    password = auth_mlflow.credentials["MLFLOW_TRACKING_PASSWORD"]
    job_id = re.search(r"submitted Ray job (raysubmit_\w+)", r.stdout).group(1)
    (driver_log,) = Path("/tmp/ray").glob(f"session_2*/logs/job-driver-{job_id}.log")  # not session_latest
    logs = [f for f in driver_log.parent.rglob("*") if f.is_file()]
    assert len(logs) > 10
    for text in [out, again.stdout + again.stderr, auth_mlflow.log.read_text(),
                 *(f.read_text(errors="replace") for f in logs)]:
        assert password not in text
    # and in no file of the session: the driver deleted its copy, and its trials (on both nodes) were not
    # handed the uploaded working directory that carried them
    session = driver_log.parents[1]
    assert not [f for f in session.rglob(CREDENTIALS_FILE)], list(session.rglob(CREDENTIALS_FILE))


def test_a_latency_target_no_node_has_stops_the_search_before_training(cluster, mlflow, tmp_path):
    spec = write_spec(tmp_path / "target.toml", tmp_path / "rr", num_samples=1, epochs=1)
    r = prunetune("search", str(spec), "--address", cluster.address, "--tracking-uri", mlflow.url,
                  "--set", "search.latency_target=gpu-box", env=cluster.env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "latency_target = 'gpu-box': no node of the cluster has that resource" in r.stderr
    assert "custom resources here: edge" in r.stderr and "epoch" not in r.stdout


def test_lost_worker_node_trial_continues_from_its_checkpoint_driver_through_ray_client(cluster, mlflow, tmp_path):
    head = next(iter(cluster.nodes.values()))
    worker = cluster.nodes[list(cluster.nodes)[1]] if len(cluster.nodes) > 1 else cluster.add_node(cpus=1)
    spec = write_spec(tmp_path / "nodeloss.toml", tmp_path / "rr", num_samples=2, epochs=3, train_size=120)
    # the driver attaches through Ray Client (ray://), as from a laptop
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "search", str(spec), "--address",
                             cluster.client_address, "--tracking-uri", mlflow.url], cwd=REPO,
                            env={**cluster.env, "PYTHONUNBUFFERED": "1"},
                            stdout=open(tmp_path / "search.log", "w"), stderr=subprocess.STDOUT)
    try:
        def on_worker_after_epoch_1():
            if proc.poll() is not None:  # the search ended before the node could be killed: say why
                raise AssertionError((tmp_path / "search.log").read_text()[-5000:])
            for d in (tmp_path / "rr").glob("*/*/"):
                rs = reports(d)
                if any(x.get("node_id") == worker and x.get("epoch", 0) >= 1 and x.get("phase") == "train" for x in rs) \
                        and not any(x.get("phase") == "done" for x in rs):
                    return d
            return None

        victim = wait_for(on_worker_after_epoch_1, "a trial checkpointing on the worker node", 300,
                          tmp_path / "search.log")
        cluster.kill_node(worker)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "search.log").read_text()
    assert rc == 0, log[-5000:]
    exp_dir = victim.parent
    trials = pd.read_csv(exp_dir / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and (trials.status == "done").all(), trials.to_string()
    nodes_used = {x["node_id"] for d in exp_dir.glob("*/") for x in reports(d)}
    assert nodes_used == {head, worker}
    # the interrupted trial: trained on the worker, finished on the head, never from epoch 0 again
    rs = reports(victim)
    train = [(x["epoch"], x["node_id"]) for x in rs if x.get("phase") == "train"]
    before, after = [e for e, n in train if n == worker], [e for e, n in train if n == head]
    assert rs[-1]["phase"] == "done" and rs[-1]["node_id"] == head, train
    assert before and after and after[0] == before[-1] + 1, train
    assert [e for e, _ in train] == sorted(set(e for e, _ in train)), train  # no epoch trained twice
    parents, children = mlflow_runs(mlflow.url, "nodeloss")
    assert len(parents) == 1 and len(children) == 2  # the restarted trial kept its run
    assert sorted(c.data.tags["prunetune.trial_id"] for c in children) == sorted(trials.trial_id)
    assert all(c.info.status == "FINISHED" for c in children)


def test_mlflow_outage_mid_search_is_backfilled_on_resume(cluster, tmp_path):
    server = MlflowServer(tmp_path).start()
    spec = write_spec(tmp_path / "outage.toml", tmp_path / "rr", num_samples=2, epochs=2, register_models=3)
    env = {**cluster.env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "search", str(spec), "--address", cluster.address,
                             "--tracking-uri", server.url], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(reports(d) for d in (tmp_path / "rr").glob("*/*/")), "a first trial result", 300)
        server.stop()  # the tracking server goes away mid-search
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]  # training went on
    assert "MLflow logging failed" in err and "prunetune resume" in err
    assert err.count("MLflow logging failed in") == 1  # one warning per outage, not one per result
    (exp_dir,) = (tmp_path / "rr").iterdir()
    assert len(pd.read_csv(exp_dir / "trials.csv")) == 2

    server.start()  # back, same port and database
    try:
        r = prunetune("resume", str(exp_dir), "--address", cluster.address, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "back-filled 2 trial run(s)" in r.stdout
        from mlflow import MlflowClient

        parents, children = mlflow_runs(server.url, "outage")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        client = MlflowClient(server.url)
        for c in children:
            assert c.data.tags["prunetune.status"] == "done" and "accuracy" in c.data.metrics
            assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "val_accuracy")) == [1, 2]
            assert "sweep.csv" in {a.path for a in client.list_artifacts(c.info.run_id)}
        assert client.get_model_version_by_alias("outage", "knee").tags["trial_run_id"] in {
            c.info.run_id for c in children}
        assert 1 <= len(client.search_model_versions("name='outage'")) <= 3  # register_models = 3
    finally:
        server.stop()


def test_storage_path_one_node_cannot_see_is_refused_before_training(cluster, mlflow, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to give a node its own view of the filesystem")
    storage = tmp_path / "rr"
    storage.mkdir()
    try:
        blind = cluster.add_node(cpus=1, private_dir=storage)  # this node sees an empty tmpfs there
    except RuntimeError as e:
        pytest.skip(f"cannot create a mount namespace here: {e}")
    try:
        spec = write_spec(tmp_path / "blind.toml", storage, num_samples=1, epochs=1)
        r = prunetune("search", str(spec), "--address", cluster.address, "--tracking-uri", mlflow.url,
                      env=cluster.env, timeout=300)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        assert f"search.storage_path {storage} is not shared: 1 of" in r.stderr and blind[:8] in r.stderr
        assert "--set search.storage_path=" in r.stderr  # names the fix
        assert list(storage.iterdir()) == []  # nothing started, no marker left behind
    finally:
        cluster.kill_node(blind)
