"""Bad input, tried as a user would give it: each case is one line on stderr naming the problem
and the fix, the exit code of the error family (2: bad input), no traceback, and nothing computed
before it lost. README's "Bad input" table lists these cases; `BAD_INPUTS` counts them.

Every case runs the real command line in this process (``prunetune_here``); none trains."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, prunetune_here

BAD_INPUTS: list[str] = []  # the ids of every case below, for the count README states


def one_clear_line(r: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def experiment(tmp_path: Path, extra: str = "", name: str = "bad") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(textwrap.dedent(f"""\
        name = "{name}"
        [data]
        train_size = 60
        test_size = 20
        val_fraction = 0.25
        [train]
        epochs = 1
        output_dir = "{tmp_path / 'runs'}"
        [search]
        storage_path = "{tmp_path / 'rr'}"
        """) + extra)
    return p


# ------------------------------------------------------------------- experiment values

SPEC_CASES = {
    "name with a slash": ("name=team/quick", "name 'team/quick' must be 1-64 letters"),
    "name with a quote": ("name=it's", "name \"it's\" must be 1-64 letters"),
    "name escaping storage_path": ("name=../x", "name '../x' must be 1-64 letters"),
    "negative momentum": ("train.momentum=-0.9", "momentum and weight_decay must be >= 0"),
    "negative weight_decay": ("train.weight_decay=-1e-4", "momentum and weight_decay must be >= 0"),
    "max_failures = -1": ("search.max_failures=-1", "max_failures must be >= 0"),
    "lr_max = inf": ("search.lr_max=inf", "lr_max must be a finite number, got inf"),
    "a NaN anywhere": ("search.max_latency_ms=nan", "max_latency_ms must be a finite number, got nan"),
    "negative calibration_size": ("sweep.calibration_size=-8", "calibration_size must be >= 1"),
    "negative eval_size": ("sweep.eval_size=-5", "eval_size must be >= 0"),
    "an arch that names no network": ("model.arch=resnet_18", "[model] arch = 'resnet_18' names no network"),
    "a weights file that is not there": ("model.weights=nowhere/w.pt", "w.pt': no such file"),
    "weights torchvision does not have": ("model.weights=IMAGENET9K", "not a file, nor torchvision weights of resnet18"),
    "an image folder without a size": ("data.dataset=imagefolder", "'imagefolder' needs image_size"),
    "test_accuracy as an objective": ('search.objectives=["test_accuracy:max", "latency_ms:min"]',
                                      "test_accuracy is reported, never tuned on"),
}
BAD_INPUTS += SPEC_CASES


@pytest.mark.parametrize("case", SPEC_CASES)
def test_a_bad_value_stops_a_search_before_anything_is_created(tmp_path, case):
    override, message = SPEC_CASES[case]
    r = prunetune_here("search", str(experiment(tmp_path)), "--set", override,
                       "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    one_clear_line(r, 2, message)
    assert not (tmp_path / "rr").exists() and not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------- datasets

def npz(tmp_path: Path, **change) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), "y_train": np.arange(40) % 4,
              "x_test": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(12) % 4,
              "class_names": np.array(["a", "b", "c", "d"])}
    arrays.update(change)
    path = tmp_path / "data.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


DATA_CASES = {
    "a label outside the named classes": (dict(y_train=np.arange(40) % 5), "y_train holds label 4, outside 0..3"),
    "a negative label": (dict(y_test=np.arange(12) % 4 - 1), "y_test holds label -1, outside 0..3"),
    "fewer labels than images": (dict(y_train=np.arange(39) % 4), "x_train has 40 images but y_train 39 labels"),
    "splits of two image sizes": (dict(x_test=np.zeros((12, 28, 28, 3), np.uint8)),
                                  "x_train images are (32, 32, 3) but x_test (28, 28, 3)"),
    "four channels": (dict(x_train=np.zeros((40, 32, 32, 4), np.uint8)), "x_train must be uint8 N x H x W x C"),
    "float images": (dict(x_train=np.zeros((40, 32, 32, 3), np.float32)), "x_train must be uint8"),
    "an empty split": (dict(x_test=np.zeros((0, 32, 32, 3), np.uint8), y_test=np.zeros(0, np.int64)),
                       "x_test is empty"),
    "float labels": (dict(y_train=(np.arange(40) % 4).astype(np.float32)), "y_train must be a 1-D array of integer"),
    "an object array (pickled)": (dict(class_names=np.array([object()], dtype=object)), "is not an .npz of plain arrays"),
}
BAD_INPUTS += DATA_CASES


@pytest.mark.parametrize("case", DATA_CASES)
def test_a_malformed_npz_is_named_before_training(tmp_path, case):
    change, message = DATA_CASES[case]
    path = npz(tmp_path, **change)
    r = prunetune_here("train", str(experiment(tmp_path)), "--set", "data.dataset=npz", "--set", f"data.path={path}")
    one_clear_line(r, 2, message, str(path))
    assert not (tmp_path / "runs").exists()


def test_a_dataset_of_four_classes_trains_a_four_class_model(tmp_path):
    """Not a bad input: the class count comes from the data (it was fixed at 10)."""
    from trainables import data
    from trainables.checkpoint import load_checkpoint, model_from_checkpoint
    from trainables.train import TrainConfig, fit

    splits = data.load(data.DataConfig(dataset="npz", path=str(npz(tmp_path)), val_fraction=0.25))
    assert splits.classes == ["a", "b", "c", "d"]
    result = fit(splits, TrainConfig(epochs=1, batch_size=10, threads=1), checkpoint_path=tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["num_classes"] == 4 and result.model.fc.out_features == 4
    assert model_from_checkpoint(ckpt)(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


# ------------------------------------------------------------------- files that could run code

class Planted:
    """What a tampered file would carry: an object whose unpickling runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"arch": "cifar_resnet18", "epoch": 1, "model": {}, "meta": {}, "x": Planted(marker)},
               tmp_path / "evil.pt")
    r = prunetune_here("sweep", str(tmp_path / "evil.pt"))
    one_clear_line(r, 2, "holds Python objects other than tensors and plain data", "evil.pt")
    assert not marker.exists()


def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    import pickle

    from conftest import write_cifar_fixture

    write_cifar_fixture(tmp_path / "c10")
    marker = tmp_path / "ran"
    with open(tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Planted(marker), "labels": [0]}, f)
    r = prunetune_here("train", str(experiment(tmp_path)), "--set", "data.dataset=cifar10",
                       "--set", f"data.root={tmp_path / 'c10'}")
    one_clear_line(r, 2, "a CIFAR batch holds lists and arrays only", "posix.system")
    assert not marker.exists()


def test_a_checkpoint_without_its_experiment(tmp_path):
    from trainables.model import cifar_resnet18

    torch.save({"arch": "cifar_resnet18", "epoch": 1, "model": cifar_resnet18().state_dict(), "meta": {}},
               tmp_path / "bare.pt")
    one_clear_line(prunetune_here("sweep", str(tmp_path / "bare.pt")), 2, "records no experiment spec")
    torch.save({"arch": "cifar_resnet18", "model": {}}, tmp_path / "nometa.pt")
    one_clear_line(prunetune_here("sweep", str(tmp_path / "nometa.pt")), 2, "not a complete prunetune checkpoint",
                   "meta (missing)")


BAD_INPUTS += ["a checkpoint that would run code", "a CIFAR batch that would run code",
               "a checkpoint without its experiment", "a checkpoint without meta"]


# ------------------------------------------------------------------- runs, stores, directories

def test_train_resume_refuses_another_dataset(tmp_path):
    spec = experiment(tmp_path)
    r = prunetune_here("train", str(spec), "--set", "train.batch_size=15")
    assert r.returncode == 0, r.stderr
    ckpt = next((tmp_path / "runs" / "bad").glob("*/checkpoint.pt"))
    before = ckpt.read_bytes()
    r = prunetune_here("train", str(spec), "--set", "train.batch_size=15",
                       "--set", "data.test_size=30", "--set", "train.epochs=2", "--resume", str(ckpt))
    one_clear_line(r, 2, "data.test_size=20 (now 30)", "use the same experiment file")
    assert ckpt.read_bytes() == before  # the checkpoint is the one training wrote


def test_every_run_gets_its_own_directory(tmp_path):
    from tuning.spec import SpecError, from_dict, new_run_dir, run_stamp

    names = {from_dict({"name": "q"}).run_name() for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("q-") for n in names)
    first = new_run_dir(tmp_path, "same")
    with pytest.raises(SpecError, match="already exists"):
        new_run_dir(tmp_path, "same")
    assert first.is_dir() and len({run_stamp() for _ in range(20)}) == 20


def test_a_second_live_search_on_a_directory_is_refused_naming_the_first(tmp_path):
    import json

    from tuning.spec import from_dict

    exp_dir = tmp_path / "rr" / "s-1"
    exp_dir.mkdir(parents=True)
    (exp_dir / "prunetune_spec.json").write_text(json.dumps(from_dict({"name": "s"}).to_dict()))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tuning.driver import _locked
        with _locked(Path({str(exp_dir)!r})):
            print("locked", flush=True)
            time.sleep(60)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = prunetune_here("resume", str(exp_dir))
        one_clear_line(r, 2, f"is in use by a live search (pid {holder.pid} on ", "prunetune resume")
    finally:
        holder.kill()
        holder.wait()
    from tuning.driver import _locked

    with _locked(exp_dir):  # the holder is gone: its lock went with it
        pass


def test_credentials_in_a_tracking_uri_are_refused_by_every_command(tmp_path):
    uri = "http://admin:hunter2hunter2@127.0.0.1:1"
    for args in (["search", str(experiment(tmp_path))], ["pareto"], ["export", "abc", "--format", "onnx", "-o", "x"],
                 ["ui"]):
        r = prunetune_here(*args, "--tracking-uri", uri)
        one_clear_line(r, 2, "carries a user or password", "MLFLOW_TRACKING_USERNAME")
        assert "hunter2" not in r.stdout + r.stderr
    assert not (tmp_path / "rr").exists()


def test_the_default_tracking_store_is_absolute(tmp_path, monkeypatch):
    from tuning import runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runs.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runs.tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    assert runs.tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_pareto_budgets_must_be_numbers_it_can_compare(tmp_path):
    for args, message in ((["--max-latency-ms", "nan"], "'nan': give a number > 0"),
                          (["--max-accuracy-drop", "-0.1"], "'-0.1': give a number >= 0")):
        r = prunetune_here("pareto", *args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_model_version_prunetune_did_not_register(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    client.create_registered_model("foreign")
    version = client.create_model_version("foreign", source=str(tmp_path))
    client.set_registered_model_alias("foreign", "pick", version.version)
    r = prunetune_here("export", "models:/foreign@pick", "--format", "onnx", "-o", str(tmp_path / "x.onnx"),
                       "--tracking-uri", uri)
    one_clear_line(r, 2, "models:/foreign@pick is not a version prunetune registered", "trial_run_id")


def test_pareto_and_the_aliases_name_the_same_search_or_say_so(tmp_path):
    """Two searches of one experiment that overlap: the one that started first ended last (it set
    the aliases last). `pareto` reads that one, and names an alias another search set."""
    from mlflow import MlflowClient

    from tuning import registry, runs

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=str(tmp_path / "art"))
    first = client.create_run(exp, start_time=1_000, tags={"prunetune.kind": "search"}).info.run_id
    second = client.create_run(exp, start_time=2_000, tags={"prunetune.kind": "search"}).info.run_id
    client.set_terminated(second, "FINISHED", end_time=3_000)
    client.set_terminated(first, "FINISHED", end_time=4_000)
    assert runs.latest_search(client, "x").info.run_id == first
    client.create_registered_model("x")
    mine = client.create_model_version("x", source=str(tmp_path), run_id=first).version
    theirs = client.create_model_version("x", source=str(tmp_path), run_id=second).version
    client.set_registered_model_alias("x", "knee", mine)
    client.set_registered_model_alias("x", "pick", theirs)
    assert registry.elsewhere(uri, "x", first) == [
        f"note: models:/x@pick is version {theirs} of another search (parent run {second}), not of this one"]
    assert registry.elsewhere(uri, "x", second)[0].startswith(f"note: models:/x@knee is version {mine}")


BAD_INPUTS += ["train --resume with another [data]", "two runs in the same second", "a second live search",
               "credentials in a tracking URI", "a relative sqlite store", "pareto --max-latency-ms nan",
               "a model version prunetune did not register"]


def test_the_suite_keeps_only_failed_tests_files(pytestconfig):
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"


def test_make_clean_leaves_the_users_results():
    out = subprocess.run(["make", "-n", "clean"], cwd=REPO, capture_output=True, text=True).stdout
    assert ".venv" in out and not any(r in out for r in ("runs", "ray_results", "mlflow.db", "mlruns", "mlartifacts"))


def test_readme_counts_the_bad_inputs_tried_here():
    readme = (REPO / "README.md").read_text()
    assert f"`tests/test_bad_input.py` tries {len(BAD_INPUTS)} bad inputs" in readme
