"""The search service on a real local Ray: GPU slots, Optuna study contents, kill + resume."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import FOLDER_CLASSES, FOLDER_LABELS, REPO, prunetune, prunetune_here, three_digits, tiny_spec
from tuning.names import STUDY_FILE
from tuning import driver, front as front_mod, space
from tuning.spec import from_dict


def study_trials(exp_dir: Path) -> list:
    storage = f"sqlite:///{exp_dir / STUDY_FILE}"
    return optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_fractional_gpu_slots(gpu_search):
    res, _ = gpu_search
    t = res.trials
    assert len(t) == 4 and (t.status == "done").all(), t.to_string()
    # four trials at once: every trial started before any finished
    assert t.trial_start.max() < t.trial_end.min(), t.to_string()
    # each saw the GPU Ray assigned it; two trials per logical GPU
    assert sorted(t.cuda_visible_devices.astype(str)) == ["0", "0", "1", "1"], t.to_string()
    # a latency objective: every trial's own point removes work (channel pruning), never a mask (global_l1)
    assert set(t.method) == {"channel_l1"}, t.to_string()


@pytest.mark.slow
def test_study_holds_every_trial_and_sweep_point(gpu_search):
    res, _ = gpu_search
    trials = study_trials(res.path)
    trained = [s for s in trials if s.user_attrs.get("source") != "sweep"]
    assert len(trained) == 4
    # evidence: the points fine-tuned like each trial's own one (its equal-compute dense point), never the
    # no-retrain curve, which measures something else
    tuned = res.points[res.points.finetune_epochs == 1]
    assert len(tuned) == 2 * 4 and len(trials) == len(tuned), (len(trials), res.points.to_string())
    evidence = [s for s in trials if s.user_attrs.get("source") == "sweep"]
    assert {round(s.params["prune_ratio"], 4) for s in evidence} == {0.0}


@pytest.mark.slow
def test_points_front_and_shared_latency(gpu_search):
    res, _ = gpu_search
    assert (res.path / "all_points.csv").is_file() and len(res.front) >= 1
    pts = pd.read_csv(res.path / "all_points.csv", dtype={"trial_id": str})
    assert len(pts) == 4 * (4 + 2) and set(pts.method) == {"global_l1", "channel_l1"}  # curve + deployable points
    assert (res.front.rows.finetune_epochs == 1).all()  # the front holds fine-tuned (deployable) points only
    # same architecture, same latency, in every trial (one shared measurement, then one quiet one)
    assert (pts.groupby("arch").latency_ms.nunique() == 1).all(), pts.to_string()
    assert pts.trial_id.nunique() == 4 and pts.groupby("arch").trial_id.nunique().max() == 4
    # the front's latencies were re-measured quietly (>= 100 runs) and replaced the trials' ones
    assert (res.front.rows.latency_source == "quiet").all(), res.front.rows.to_string()
    quiet = pts[pts.latency_source == "quiet"]
    assert set(quiet.arch) >= set(res.front.rows.arch) and len(quiet) > len(res.front)


@pytest.mark.slow
def test_mlflow_runs_metrics_artifacts_and_registry(gpu_search):
    from mlflow import MlflowClient

    res, uri = gpu_search
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get("prunetune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["prunetune.trial_id"] for c in children} == set(res.trials.trial_id)
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["prunetune.status"] == "done"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1]
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "sweep_accuracy/global_l1")]
    assert steps == [0, 50]  # the no-retrain curve: the grid's ratios
    assert "method" not in child.data.params  # one method to draw from: not a sampled parameter
    method = res.trials.set_index("trial_id").loc[child.data.tags["prunetune.trial_id"], "method"]
    assert 0 in [m.step for m in client.get_metric_history(child.info.run_id, f"sweep_accuracy/{method}_ft1")]
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
    assert "sweep.csv" in {a.path for a in client.list_artifacts(child.info.run_id)}
    # keep_checkpoints = "front" (default): a checkpoint, on disk and in MLflow, for the front's trials only
    on_front = set(res.front.rows.trial_id)
    assert {c.data.tags["prunetune.trial_id"] for c in children
            if "checkpoint" in {a.path for a in client.list_artifacts(c.info.run_id)}} == on_front
    assert {d.parent.name for d in res.path.glob("*/checkpoint_*")} == {
        Path(x).name for x in res.trials.set_index("trial_id").loc[sorted(on_front), "trial_dir"]}
    assert {"all_points.csv", "pareto.csv", "pareto.png", "trials.csv", "experiment.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.params["search.num_samples"] == "4"
    assert client.get_run(parent.info.run_id).data.metrics["pareto_hypervolume"] > 0
    for alias in ("best-accuracy", "fastest", "knee", "pick"):
        v = client.get_model_version_by_alias("tiny", alias)
        assert {"method", "ratio", "int8", "lr", "accuracy", "latency_ms", "trial_run_id"} <= set(v.tags)
        assert v.tags["latency_source"] == "quiet" and "latency" in v.description
    best = client.get_model_version_by_alias("tiny", "best-accuracy").tags
    fastest = client.get_model_version_by_alias("tiny", "fastest").tags
    assert float(best["accuracy"]) == res.front.rows.accuracy.max()
    assert float(fastest["latency_ms"]) == res.front.rows.latency_ms.min()


def cli(*args: str, uri: str) -> subprocess.CompletedProcess:
    """``prunetune ARGS --tracking-uri URI`` in this process (test_cli runs the command line in a child)."""
    return prunetune_here(*args, "--tracking-uri", uri)


@pytest.mark.slow
def test_pareto_json_equals_front_of_all_points(gpu_search):
    from tuning import pareto

    res, uri = gpu_search
    r = cli("pareto", "--experiment", "tiny", "--json", uri=uri)
    assert r.returncode == 0, r.stderr
    got = pd.DataFrame(json.loads(r.stdout.strip().splitlines()[-1]))
    pts = pd.read_csv(res.path / "all_points.csv", dtype={"trial_id": str})
    want = pareto.front(pts[pts.artifact.notna()], [pareto.Objective("accuracy", "max"), pareto.Objective("latency_ms", "min")])
    key = ["trial_id", "method", "ratio", "int8"]
    assert sorted(map(tuple, got[key].values.tolist())) == sorted(map(tuple, want[key].values.tolist()))
    assert got.run_id.notna().all() and got.version.notna().sum() == min(len(got), 6) and got.picked.sum() == 1
    assert "pick" in got[got.picked].aliases.iloc[0]  # no budgets: the fastest, which the search registered as pick
    # budgets asked for now: the fastest point within them, by brute force over the same points
    slowest = float(pts[pts.artifact.notna()].latency_ms.max())
    r = cli("pareto", "--experiment", "tiny", "--max-latency-ms", str(slowest), "--max-accuracy-drop", "1", "--json",
            uri=uri)
    assert r.returncode == 0 and "pick: trial" in r.stdout, r.stdout + r.stderr
    got = pd.DataFrame(json.loads(r.stdout.strip().splitlines()[-1]))
    assert got[got.picked].latency_ms.iloc[0] == pytest.approx(want.latency_ms.min(), rel=1e-9)
    r = cli("pareto", "--experiment", "tiny", "--max-latency-ms", "0.001", uri=uri)
    assert r.returncode == 3 and "no point meets the budgets" in r.stdout and "most accurate" not in r.stdout
    r = cli("pareto", "--experiment", "nope", uri=uri)
    assert r.returncode == 2 and "no MLflow experiment 'nope'" in r.stderr


@pytest.mark.slow
def test_export_knee_to_onnx_checked_by_onnxruntime(gpu_search, tmp_path):
    import onnxruntime as ort

    _, uri = gpu_search
    out = tmp_path / "knee.onnx"
    r = cli("export", "models:/tiny@knee", "--format", "onnx", "-o", str(out), uri=uri)
    assert r.returncode == 0, r.stderr
    assert "verified on " in r.stdout and "the same bytes" in r.stdout and "the same labels as recorded" in r.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    label, probs, names = session.run(["label", "probabilities", "class"], {"images": np.zeros((3, 48, 48, 3), np.uint8)})
    assert label.shape == (3,) and probs.shape == (3, 3) and list(names) == [FOLDER_LABELS[i] for i in label]


@pytest.mark.slow
def test_export_unswept_ratio_int8_torchscript_and_bad_refs(gpu_search, tmp_path):
    import torch

    res, uri = gpu_search
    run_id = json.loads(cli("pareto", "--json", uri=uri).stdout.strip().splitlines()[-1])[0]["run_id"]
    out = tmp_path / "m.pt"
    r = cli("export", run_id, "--method", "channel_l1", "--ratio", "0.37", "--int8", "--format", "torchscript",
            "-o", str(out), uri=uri)
    assert r.returncode == 0, r.stderr
    assert "channel_l1 ratio 0.37 + int8" in r.stdout and "TorchScript (and torch's INT8) are deprecated" in r.stdout
    assert "no fine-tuned weights for this point" in r.stdout and "never measured by the search" in r.stdout
    assert torch.jit.load(str(out))(torch.zeros(1, 48, 48, 3, dtype=torch.uint8)).shape == (1, 3)
    r = cli("export", run_id, "--int8", "--format", "onnx", "-o", str(tmp_path / "x.onnx"), uri=uri)
    assert r.returncode == 0 and "never measured by the search" in r.stdout, r.stderr  # no INT8 was built: re-derived
    r = cli("export", "0123456789abcdef", "--format", "onnx", "-o", str(tmp_path / "x.onnx"), uri=uri)
    assert r.returncode == 2 and "0123456789abcdef not found" in r.stderr
    r = cli("export", "models:/tiny@nosuch", "--format", "onnx", "-o", str(tmp_path / "x.onnx"), uri=uri)
    assert r.returncode == 2 and "models:/tiny@nosuch not found" in r.stderr


@pytest.mark.slow
def test_resume_of_a_finished_search_changes_no_version_and_no_alias(gpu_search):
    """The documented recovery after a Ctrl-C in the end phase, run on a search that had finished:
    nothing re-timed (the quiet figures are kept), nothing registered twice, no alias moved."""
    import ray
    from mlflow import MlflowClient

    res, uri = gpu_search
    client = MlflowClient(uri)

    def registry() -> tuple[list, dict]:
        versions = sorted((int(v.version), v.tags["artifact_sha256"]) for v in client.search_model_versions("name='tiny'"))
        return versions, dict(client.get_registered_model("tiny").aliases)

    before, quiet = registry(), json.loads((res.path / "quiet.json").read_text())
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    try:
        again = driver.resume(res.path)
    finally:
        ray.shutdown()
    assert registry() == before and len(before[0]) >= 1
    assert json.loads((res.path / "quiet.json").read_text()) == quiet  # nothing timed again
    assert (again.front.rows.latency_source == "quiet").all()
    assert sorted(again.front.rows.artifact_sha256) == sorted(res.front.rows.artifact_sha256)


def _done_trials(exp_dir: Path) -> int:
    n = 0
    for f in exp_dir.glob("*/result.json"):
        n += any(json.loads(line).get("phase") == "done" for line in f.read_text().splitlines() if line.strip())
    return n


@pytest.mark.slow
def test_killed_search_resumes_without_loss_or_duplicates(tmp_path):
    spec_file = tmp_path / "s.toml"
    d = tiny_spec(tmp_path, num_samples=2, max_concurrent_trials=1, cpus_per_trial=2.0, register_models=0,
                  finetune_epochs=0)
    d["sweep"]["methods"] = ["global_l1"]
    lines = [f'name = "{d["name"]}"']
    for sec in ("data", "train", "sweep", "search"):
        lines.append(f"[{sec}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in d[sec].items()]
    spec_file.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "search", str(spec_file)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    scratch = set(Path(tempfile.gettempdir()).glob("prunetune-trial-*"))
    exp_dir = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if exp_dir is None:
                line = proc.stdout.readline()
                if "experiment dir" in line:
                    exp_dir = Path(line.split("experiment dir ")[1].split(" ")[0])
            elif _done_trials(exp_dir) >= 1 and set(Path(tempfile.gettempdir()).glob("prunetune-trial-*")) - scratch:
                break  # a trial done, and one holding its scratch checkpoints (the next, or the done one returning)
            else:
                time.sleep(0.5)
        else:
            pytest.fail("the search did not finish a trial in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-search
        proc.wait()
    done_before = _done_trials(exp_dir)
    assert done_before == 1
    killed = set(Path(tempfile.gettempdir()).glob("prunetune-trial-*")) - scratch  # the killed trials'
    assert killed
    r = prunetune("resume", str(exp_dir), env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [d for d in killed if d.exists()] == []  # the resumed trial removed their checkpoints
    assert "Pareto front" in r.stdout
    trials = pd.read_csv(exp_dir / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and trials.trial_id.is_unique and (trials.status == "done").all()
    trained = [s for s in study_trials(exp_dir) if s.user_attrs.get("source") != "sweep"
               and s.state == optuna.trial.TrialState.COMPLETE]
    assert len(trained) == 2
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
    # a trial Tune had recorded re-used its run; one the driver started but Tune never recorded (killed in
    # between) ended FAILED as lost, in MLflow and in the study, instead of staying RUNNING
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["prunetune.trial_id"] for r in finished) == sorted(trials.trial_id)
    lost = [r for r in children if r.info.status != "FINISHED"]
    assert all(r.info.status == "FAILED" and r.data.tags["prunetune.status"] == "lost" for r in lost) and len(lost) <= 1
    assert not [s for s in study_trials(exp_dir) if s.state == optuna.trial.TrialState.RUNNING]
    assert len([r for r in runs if r.data.tags.get("prunetune.kind") == "search"]) == 1


def test_unreachable_ray_address_is_clear(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('[data]\ntrain_size = 60\n')
    r = prunetune_here("search", str(spec_file), "--address", "127.0.0.1:1")
    assert r.returncode == 2 and "cannot reach the Ray cluster at '127.0.0.1:1'" in r.stderr


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(f'[data]\ntrain_size = 60\n[search]\nstorage_path = "{tmp_path}/rr"\n')
    t0 = time.time()
    r = prunetune_here("search", str(spec_file), "--tracking-uri", "http://127.0.0.1:1")
    assert r.returncode == 2 and "cannot use the MLflow tracking store 'http://127.0.0.1:1'" in r.stderr
    assert "epoch" not in r.stdout and not (tmp_path / "rr").exists() and time.time() - t0 < 120


def test_resume_of_a_non_search_dir(tmp_path):
    r = prunetune_here("resume", str(tmp_path))
    assert r.returncode == 2 and "not a prunetune search directory" in r.stderr


def test_searcher_tells_optuna_a_trial_without_objectives_as_pruned(tmp_path):
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    searcher = space.make_searcher(from_dict(tiny_spec(tmp_path)), exp_dir)
    config = searcher.suggest("t1")
    assert {"lr", "prune_ratio"} <= set(config)
    # what a diverged trial reports last: no accuracy, no latency
    searcher.on_trial_complete("t1", {"phase": "diverged", "epoch": 1, "lr": config["lr"]})
    (trial,) = study_trials(exp_dir)
    assert trial.state == optuna.trial.TrialState.PRUNED


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_labels_pytorch_predicts(gpu_search, tmp_path):
    """`mlflow models serve` of the registered knee as a real process: raw uint8 test images in,
    the labels its PyTorch model predicts out; a wrong shape is refused naming the expected one."""
    import urllib.request

    import mlflow
    import torch

    from servers import free_port, wait_for
    from trainables import data
    from tuning import models

    res, uri = gpu_search
    port = free_port()
    bin_dir = Path(sys.executable).parent  # uvicorn and mlflow live beside this python (README says so)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/tiny@knee", "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def post(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=3).status == 200
        except OSError:
            return False

    try:
        wait_for(up, "mlflow models serve", 180, log)
        spec = from_dict(json.loads((res.path / driver.SPEC_FILE).read_text()))
        test = data.load(spec.data).test
        images = test.x[:8].permute(0, 2, 3, 1).contiguous().numpy()  # uint8, 8 x 48 x 48 x 3, as decoded
        status, out = post({"inputs": images.tolist()})
        assert status == 200, out
        got = out["predictions"]["label"]
        assert set(got) <= {0, 1, 2} and out["predictions"]["class"] == [FOLDER_LABELS[i] for i in got]
        # the same point through PyTorch: its fine-tuned weights, re-derived from the trial's files
        version = mlflow.MlflowClient(uri).get_model_version_by_alias("tiny", "knee").tags
        row = res.front.rows[(res.front.rows.trial_id == version["trial_id"]) & (res.front.rows.method == version["method"])
                        & (res.front.rows.ratio == float(version["ratio"]))].iloc[0]
        point = models.Point("", row.method, float(row.ratio), bool(row.int8))
        ckpt = res.checkpoints()[row.trial_id]
        dense, _ = models.dense_from_checkpoint(ckpt)
        model = models.derive(dense, spec, point, weights=models.fine_tuned_weights(ckpt, point))
        with torch.inference_mode():
            assert got == model(test.normalized(8)).argmax(1).tolist()
        status, out = post({"inputs": test.x[:2].numpy().tolist()})  # channels first (N x 3 x 48 x 48)
        assert status == 400 and "expected shape (-1, 48, 48, 3)" in out["message"], out
        # floats in [-1, 1] (pixels / 127.5 - 1, a usual preprocessing), not pixels: MLflow refuses
        # floats it cannot cast to uint8 (it truncates those in 0..255 silently)
        scaled = test.x[:2].permute(0, 2, 3, 1).numpy() / 127.5 - 1
        status, out = post({"inputs": scaled.tolist()})
        assert status == 400 and "uint8" in out["message"], out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_an_onnxruntime_search_ships_onnx_models_and_goes_on_past_a_diverged_trial(tmp_path):
    """runtime = "onnxruntime": every point measured in an ORT session (INT8 by ORT's own
    quantization), the front re-measured there, the registry holding ONNX-flavoured models that
    take uint8 images and answer labels and probabilities. The grid's second lr blows up: that
    trial ends diverged (FAILED in MLflow) and has no point anywhere; the search goes on."""
    import mlflow
    import ray
    from mlflow import MlflowClient

    from trainables import data

    d = tiny_spec(tmp_path, sampler="grid", grid_lrs=[0.002, 1e12], cpus_per_trial=1.0, register_models=2)
    x_tr, y_tr, x_te, y_te = three_digits(48)  # your own images: an npz of 3 classes at 48 x 48
    np.savez(tmp_path / "three.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             class_names=np.array(FOLDER_CLASSES))
    d["data"].update(dataset="npz", path=str(tmp_path / "three.npz"))
    d["train"].update(optimizer="sgd", schedule="constant", batch_size=10)  # several steps per epoch
    d["sweep"].update(runtime="onnxruntime", int8=True, methods=["channel_l1"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        res = driver.search(from_dict(d), tracking_uri=uri)
    finally:
        ray.shutdown()
    t = res.trials.set_index("lr")
    assert t.loc[1e12, "status"] == "diverged" and t.loc[0.002, "status"] == "done", res.trials.to_string()
    assert "diverged at epoch 1" in t.loc[1e12, "error"]
    nan_trial, good_trial = t.loc[1e12, "trial_id"], t.loc[0.002, "trial_id"]
    # the front and every point come from the good trial only
    assert len(res.front) >= 1 and set(res.front.rows.trial_id) == {good_trial} == set(res.points.trial_id)
    assert nan_trial not in set(pd.read_csv(res.path / "pareto.csv", dtype={"trial_id": str}).trial_id)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = {r.data.tags["prunetune.trial_id"]: r for r in runs if r.data.tags.get("prunetune.kind") == "trial"}
    assert (children[nan_trial].info.status, children[nan_trial].data.tags["prunetune.status"]) == ("FAILED", "diverged")
    assert (children[good_trial].info.status, children[good_trial].data.tags["prunetune.status"]) == ("FINISHED", "done")
    parent = next(r for r in runs if r.data.tags.get("prunetune.kind") == "search")
    front = pd.read_csv(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path)), dtype={"trial_id": str})
    assert set(front.trial_id) == {good_trial}
    # ONNX Runtime all the way: the points, the quiet front, the registered models
    assert (res.points.runtime == "onnxruntime").all() and res.points.error.isna().all()
    assert (res.front.rows.latency_source == "quiet").all()
    assert res.points.arch.str.endswith(("/onnxruntime", "/onnxruntime-int8")).all()
    mlflow.set_tracking_uri(uri)
    assert "onnx" in mlflow.models.get_model_info("models:/tiny@pick").flavors
    images = data.load(from_dict(d).data).test.x[:4].permute(0, 2, 3, 1).contiguous().numpy()
    out = mlflow.pyfunc.load_model("models:/tiny@pick").predict(images)
    assert out["label"].shape == (4,) and out["probabilities"].shape == (4, 3)
    assert set(out["class"]) <= set(FOLDER_CLASSES) and images.shape[1:] == (48, 48, 3)
    assert abs(float(out["probabilities"].sum()) - 4.0) < 1e-3


PYTHON_API_SCRIPT = """
import json, os, sys
import mlflow
import tuning

import ray
ray.init(num_cpus=2, include_dashboard=False)  # a notebook's Ray (what ray.init sets is Ray's; a search's is ours)
import sklearn.datasets, tensorboardX, tuning.driver  # what importing them sets is theirs (KMP_*, CRC32C_SW_MODE)
before = dict(os.environ)
uri_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # the caller's, if any
spec = tuning.load("experiments/quickstart.toml", [
    "search.num_samples=2", "train.epochs=2", "search.finetune_epochs=1", "data.train_size=120", "search.early_stop=pareto",
    "data.test_size=40", "sweep.ratios=[0.0, 0.3]", "sweep.latency_runs=3", "search.min_accuracy=0.0",
    'search.objectives=["size_mb:min", "latency_ms:min", "accuracy:max"]', f"search.storage_path={sys.argv[1]}"])
result = tuning.search(spec, tracking_uri=sys.argv[2])
assert isinstance(result, tuning.SearchResult) and isinstance(result.front, tuning.Front)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
try:
    tuning.load("nope.toml")
except tuning.PrunetuneError as e:
    refused = str(e)
print(json.dumps({"rows": len(result.front), "aliases": sorted(result.front.aliases),
                  "plane": [str(o) for o in result.front.plane], "hypervolume": result.front.hypervolume,
                  "trials": len(result.grid), "study": len(result.study.trials), "changed": changed,
                  "uri_kept": (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None) == uri_before,
                  "refused": refused,
                  "rung": json.loads((result.path / "stopping.json").read_text())["rungs"]["1"]}))
"""


@pytest.mark.slow
def test_the_python_api_runs_the_quickstart_from_a_script(tmp_path):
    """``import tuning`` from a script: the quickstart (shrunk) with three objectives, written in an
    order that puts accuracy last, and early stopping, returns the front, Tune's results and the
    study, registers models with every alias, and leaves the caller's environment and MLflow URI
    as they were. Each trial predicted its deployable point at its first rung."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = tmp_path / "search.py"
    script.write_text(PYTHON_API_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "rr"), uri], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rows"] >= 1 and got["aliases"] == sorted(front_mod.ALIASES) and got["trials"] == 2
    assert got["plane"] == ["accuracy:max", "latency_ms:min"], got
    assert got["hypervolume"] > 0 and got["study"] >= 2, got
    assert got["changed"] == [], got["changed"]
    assert len(got["rung"]) == 2 and all(0 <= a <= 1 and ms > 0 for a, ms in got["rung"].values())  # predicted
    assert got["uri_kept"] and "experiment file nope.toml not found" in got["refused"]
    versions = MlflowClient(uri).search_model_versions("name='quickstart'")
    assert len(versions) >= 1 and "hypervolume" in r.stdout  # three objectives register models
