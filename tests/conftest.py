from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset.npz"


def prunetune(*args: str, env: dict | None = None, cwd: Path = REPO,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the ``prunetune`` command line of this checkout in a child process."""
    return subprocess.run([sys.executable, "-m", "tuning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def prunetune_here(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``prunetune ARGS`` in this process: the real ``main`` and modules, where the child process
    is not what a test is about (a child spends seconds importing torch; test_cli runs the
    command line itself in children). ``env`` and ``cwd`` stand for the process environment and
    working directory during the call; an exception ``main`` does not turn into exit code 2
    fails the test."""
    from tuning import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse refusing an argument
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["prunetune", *args], code, out.getvalue(), err.getvalue())


def write_cifar_fixture(root: Path, n_per_batch: int = 20, n_test: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write a small CIFAR-10 in torchvision's python format (pickled batches); return the
    first training batch's images (NHWC) and labels, to check the loader against."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    first = None
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n) % 10]
        with open(base / name, "wb") as f:
            pickle.dump({"data": x, "labels": labels, "batch_label": name}, f)
        if first is None:
            first = (x.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return first


@pytest.fixture(scope="session", autouse=True)
def no_scratch_left():
    """The suite kills trials (lost nodes, killed searches, stopped clusters): remove their
    scratch checkpoints (~200 MB each) from the temp dir when it ends."""
    yield
    from trainables.checkpoint import reap_scratch

    reap_scratch()


@pytest.fixture(scope="session")
def auth_mlflow(tmp_path_factory):
    """One `mlflow server` with basic authentication for the session (its tests share it: a
    server start costs ~15 s): ``.url``, ``.credentials`` (the client's environment), ``.log``."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), auth=True).start()
    yield server
    server.stop()


def need_postgres() -> None:
    """Skip the test where PostgreSQL's server programs are not installed, unless
    PRUNETUNE_REQUIRE_POSTGRES=1 (`.ci/run` installs them and sets it): then fail it."""
    from servers import postgres_bin

    if postgres_bin() is None:
        message = "PostgreSQL's server programs (initdb, pg_ctl) are not installed (apt-get install postgresql)"
        if os.environ.get("PRUNETUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session (servers.PostgresServer: ``.url()`` with the
    password, ``.admin()``), with role and database ``optuna``; see :func:`need_postgres`."""
    from servers import PostgresServer

    need_postgres()
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_thread():
    """Run on one thread: avoids OpenMP oversubscription when other jobs share the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_spec_file(tmp_path: Path) -> Path:
    """An experiment file small enough to train in seconds on 2 CPU cores."""
    p = tmp_path / "tiny.toml"
    p.write_text(
        f"""
name = "tiny"
[data]
dataset = "digits"
train_size = 80
test_size = 40
val_fraction = 0.25
[train]
epochs = 2
batch_size = 30
lr = 0.002
optimizer = "adam"
threads = 2
output_dir = "{tmp_path / 'runs'}"
"""
    )
    return p


def write_spec(path: Path, storage: Path | None, num_samples: int, epochs: int, train_size: int = 60,
               register_models: int = 0) -> Path:
    """A tiny search experiment file (digits, global L1 at 0 and 0.5, no fine-tuning, no accuracy
    floor: a 1-epoch model on 45 images is near chance); its name is the file stem; ``storage``
    None leaves ``[search] storage_path`` out."""
    path.write_text(f"""name = "{path.stem}"
[data]
train_size = {train_size}
test_size = 30
val_fraction = 0.25
[train]
epochs = {epochs}
batch_size = 15
optimizer = "adam"
[sweep]
methods = ["global_l1"]
ratios = [0.0, 0.5]
latency_runs = 3
latency_warmup = 1
eval_size = 20
[search]
num_samples = {num_samples}
lr_min = 0.0005
lr_max = 0.005
cpus_per_trial = 1.0
register_models = {register_models}
finetune_epochs = 0
min_accuracy = 0.0
""" + (f'storage_path = "{storage}"\n' if storage is not None else ""))
    return path


def tiny_spec(tmp_path: Path, **search_kw) -> dict:
    return {
        "name": "tiny",
        "data": {"train_size": 60, "test_size": 30, "val_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 30, "optimizer": "adam", "lr": 0.002},
        "sweep": {"methods": ["global_l1", "channel_l1"], "ratios": [0.0, 0.5], "latency_runs": 3,
                  "latency_warmup": 1, "eval_size": 20},
        # no floor (a 1-epoch model on 45 images is near chance) and one fine-tuning epoch: the path, cheaply
        "search": {"num_samples": 4, "lr_min": 5e-4, "lr_max": 5e-3, "storage_path": str(tmp_path / "rr"),
                   "min_accuracy": 0.0, "finetune_epochs": 1, **search_kw},
    }


FOLDER_CLASSES = ("zero", "one", "two")  # the folders of the digits 0, 1, 2 in the image folder below
FOLDER_LABELS = sorted(FOLDER_CLASSES)  # its class names by label: sorted folder names, as torchvision's ImageFolder


def three_digits(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real images of 3 classes: scikit-learn's digits 0, 1 and 2 at ``size`` x ``size`` x 3,
    uint8; (x_train, y_train, x_test, y_test), a fifth of each class held out."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits(n_class=3)
    img = F.interpolate(torch.from_numpy(d.images).float().unsqueeze(1) / 16, size=(size, size), mode="bilinear")
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    test = np.random.default_rng(seed).permutation(len(x)) < len(x) // 5
    return x[~test], d.target[~test], x[test], d.target[test]


def write_imagefolder(root: Path, size: int = 48) -> Path:
    """An ImageFolder of PNGs: ``root/{train,test}/{zero,one,two}/*.png``, digits at ``size`` px."""
    from PIL import Image

    x_tr, y_tr, x_te, y_te = three_digits(size)
    for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / FOLDER_CLASSES[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def gpu_search(tmp_path_factory):
    """One real search, shared by the tests of the search, the registry, export, serving and the
    UI: local Ray with two logical GPUs, four trials at 0.5 GPU each, MLflow on a SQLite store, on
    an ImageFolder of 3 classes of PNGs at 48 x 48 (your own images: the path a user takes)."""
    import ray

    from tuning import driver
    from tuning.spec import from_dict

    tmp_path = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    d = tiny_spec(tmp_path, cpus_per_trial=0.5, gpus_per_trial=0.5)
    d["data"] = {"dataset": "imagefolder", "root": str(write_imagefolder(tmp_path / "images")), "image_size": 48,
                 "train_size": 60, "test_size": 30, "val_fraction": 0.25}
    d["train"]["device"] = "cpu"  # logical GPUs are scheduling slots here: torch has no CUDA to train on
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    try:
        res = driver.search(from_dict(d), tracking_uri=uri)
    finally:
        ray.shutdown()
    return res, uri
