"""tuning.jobs without a cluster: where a submitted search's results go (the storage probe, run
by a real shell as the head runs it), what submit refuses before it contacts the cluster, and
what a submitted job does first (credentials, a storage path inside its scratch space). The
same on a real two-node cluster, with a real submission: tests/test_cluster.py."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import prunetune_here
from tuning.names import CREDENTIALS_FILE
from tuning import jobs


def probe(env: dict[str, str]) -> str:
    """The probe job's entrypoint, run by /bin/sh with only ``env`` (as the head's job would)."""
    return subprocess.run(["sh", "-c", jobs._PROBE], env=env, capture_output=True, text=True, timeout=30).stdout.strip()


def test_probe_finds_the_storage_path_or_says_why_not(tmp_path):
    assert probe({"HOME": str(tmp_path)}) == f"prunetune-storage: default {tmp_path}/prunetune/ray_results"
    assert (tmp_path / "prunetune" / "ray_results").is_dir()  # created there, writable
    shared = tmp_path / "shared"
    assert probe({"HOME": str(tmp_path), "PRUNETUNE_STORAGE_PATH": str(shared)}) == \
        f"prunetune-storage: PRUNETUNE_STORAGE_PATH {shared}"
    assert probe({"HOME": str(tmp_path), "PRUNETUNE_STORAGE_PATH": "ray_results"}) == \
        "prunetune-storage-error: PRUNETUNE_STORAGE_PATH=ray_results on the head is relative"
    assert probe({}) == "prunetune-storage-error: HOME is not set on the head"
    (tmp_path / "file").write_text("")
    assert probe({"HOME": str(tmp_path / "file")}).endswith("/file/prunetune/ray_results on the head is not writable")


@pytest.mark.parametrize("where, args", [
    ("file", []),
    ("--set", ["--set", "search.storage_path=ray_results"]),
])
def test_submit_refuses_a_relative_storage_path_before_contacting_the_cluster(tmp_path, where, args):
    spec = tmp_path / "s.toml"
    spec.write_text('[data]\ntrain_size = 60\n' + ('[search]\nstorage_path = "rr"\n' if where == "file" else ""))
    # nothing listens at this address: the refusal comes first
    r = prunetune_here("submit", str(spec), *args, "--address", "http://127.0.0.1:1", "--tracking-uri",
                       "http://mlflow:5000")
    assert r.returncode == 2, r.stderr
    assert "search.storage_path is a relative path (as given)" in r.stderr and "Ray deletes" in r.stderr
    assert "--set search.storage_path=/shared/ray_results" in r.stderr and "PRUNETUNE_STORAGE_PATH" in r.stderr


@pytest.mark.parametrize("data, key", [
    ('dataset = "cifar10"', "data.root"),  # the default root, data/cifar10, is relative
    ('dataset = "npz"\npath = "mine.npz"', "data.path"),
])
def test_submit_refuses_a_relative_data_path_before_contacting_the_cluster(tmp_path, data, key):
    spec = tmp_path / "s.toml"
    spec.write_text(f'[data]\n{data}\n')
    r = prunetune_here("submit", str(spec), "--address", "http://127.0.0.1:1", "--tracking-uri", "http://mlflow:5000")
    assert r.returncode == 2, r.stderr
    assert f"{key} is a relative path" in r.stderr and "Ray deletes" in r.stderr and f"--set {key}=/shared/" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_submit_refuses_credentials_in_the_tracking_uri(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[data]\ntrain_size = 60\n')
    r = prunetune_here("submit", str(spec), "--address", "http://127.0.0.1:1", "--tracking-uri",
                       "http://admin:hunter2hunter2@mlflow:5000")
    assert r.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in r.stderr and "hunter2" not in r.stderr


def test_a_job_refuses_storage_inside_its_working_directory_before_training(tmp_path):
    job_dir = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    spec = job_dir / "s.toml"
    spec.write_text('[data]\ntrain_size = 60\n')  # storage_path: ./ray_results, here, in Ray's temp dir
    env = {k: v for k, v in os.environ.items() if k != "PRUNETUNE_STORAGE_PATH"}
    r = prunetune_here("search", "s.toml", "--tracking-uri", "http://127.0.0.1:1", cwd=job_dir,
                       env={**env, jobs.SUBMITTED_ENV: "1"})
    assert r.returncode == 2, r.stderr
    assert f"is inside {tmp_path / 'ray'}, the job's scratch space, which Ray deletes" in r.stderr
    assert "PRUNETUNE_STORAGE_PATH" in r.stderr and "epoch" not in r.stdout
    assert not (job_dir / "ray_results").exists()


def test_a_job_takes_its_credentials_and_leaves_its_working_directory(tmp_path, monkeypatch):
    job_dir, storage = tmp_path / "job", tmp_path / "results"
    job_dir.mkdir()
    (job_dir / CREDENTIALS_FILE).write_text(json.dumps({"env": {"MLFLOW_TRACKING_USERNAME": "u",
                                                                "MLFLOW_TRACKING_PASSWORD": "p" * 12}, "nonce": "1"}))
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv(jobs.SUBMITTED_ENV, "1")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "before")  # restored by monkeypatch afterwards
    jobs.leave_job_dir(str(storage))
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "u" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p" * 12
    assert not (job_dir / CREDENTIALS_FILE).exists()  # read once, then gone
    assert Path.cwd() == storage.resolve()
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    jobs.leave_job_dir(str(storage / "sub"))  # a job without an uploaded directory: its cwd is not Ray's to delete
    assert Path.cwd() == storage / "sub"


def test_outside_a_job_nothing_happens(tmp_path, monkeypatch):
    monkeypatch.delenv(jobs.SUBMITTED_ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    jobs.leave_job_dir("ray_results")
    assert Path.cwd() == tmp_path and not (tmp_path / "ray_results").exists()


def test_the_experiment_directory_submit_chose(tmp_path, monkeypatch):
    monkeypatch.delenv(jobs.EXPERIMENT_DIR_ENV, raising=False)
    assert jobs.chosen_dir_name() is None  # not submitted: search names it
    monkeypatch.setenv(jobs.EXPERIMENT_DIR_ENV, "q-20261125-101010-ab12")
    assert jobs.chosen_dir_name() == "q-20261125-101010-ab12"


def test_trials_of_a_job_do_not_inherit_its_working_directory(tmp_path, monkeypatch):
    """The working directory submit uploaded held the MLflow credentials: the runtime env the
    driver hands its trials (Ray's job config, read by ray.init) no longer names it."""
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"A": "1"}}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    monkeypatch.chdir(tmp_path)
    jobs.leave_job_dir(str(tmp_path / "results"))
    assert json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]) == {"runtime_env": {"env_vars": {"A": "1"}},
                                                                     "metadata": {}}
