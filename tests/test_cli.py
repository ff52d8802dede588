import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SUBSET, prunetune, prunetune_here


@pytest.mark.slow
def test_train_json_contract(tiny_spec_file):
    r = prunetune("train", str(tiny_spec_file), "--set", "train.epochs=1", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert any(l.startswith("epoch 1/1") and "img/s" in l for l in lines)
    out = json.loads(lines[-1])
    for k in ("test_accuracy", "val_accuracy", "epochs", "train_seconds", "images_per_second", "checkpoint"):
        assert k in out, k
    assert out["epochs"] == 1 and 0 <= out["test_accuracy"] <= 1
    assert Path(out["checkpoint"]).is_file()


@pytest.mark.slow
def test_killed_train_resumes_from_its_checkpoint(tiny_spec_file):
    cmd = [sys.executable, "-m", "tuning.cli", "train", str(tiny_spec_file), "--set", "train.epochs=3"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    ckpt = None
    for line in proc.stdout:
        if line.startswith("checkpoint (written every epoch):"):
            ckpt = line.split(":", 1)[1].strip()
        if line.startswith("epoch 1/3"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert ckpt and Path(ckpt).is_file()
    r = prunetune("train", str(tiny_spec_file), "--set", "train.epochs=3", "--resume", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    assert "after epoch 1" in r.stdout and "epoch 1/3" not in r.stdout and "epoch 3/3" in r.stdout
    assert json.loads(r.stdout.splitlines()[-1])["epochs"] == 3
    # a different recipe is not the same run: refused, with the reason
    r = prunetune("train", str(tiny_spec_file), "--set", "train.epochs=5", "--resume", ckpt)
    assert r.returncode == 2 and "epochs=3 (now 5)" in r.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "unknown key 'lrr' in [train]"),
        ("train.epochs=ten", "epochs must be an integer"),
        ("data.dataset=imagenet", "dataset must be one of 'digits', 'npz', 'cifar10'"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_spec_file, override, message):
    r = prunetune_here("train", str(tiny_spec_file), "--set", override)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_path(tiny_spec_file, tmp_path):
    r = prunetune_here("train", str(tiny_spec_file), "--set", "data.dataset=npz", "--set", f"data.path={tmp_path}/none.npz")
    assert r.returncode == 2 and "none.npz not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_diverging_lr(tiny_spec_file):
    r = prunetune_here("train", str(tiny_spec_file), "--set", "train.lr=1e12", "--set", "train.optimizer=sgd",
                       "--set", "train.schedule=constant")
    assert r.returncode == 2 and "diverged at epoch 1" in r.stderr and "lr=1e+12" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SUBSET.is_file(), reason="shared CIFAR-10 subset not present")
def test_train_on_real_cifar_subset(tmp_path):
    r = prunetune_here(
        "train", "experiments/cifar10_subset.toml", "--set", "train.epochs=1", "--set", "data.train_size=200",
        "--set", "data.test_size=100", "--set", f"train.output_dir={tmp_path}", "--json",
    )
    assert r.returncode == 0, r.stderr
    assert "npz train 180 / val 20 / test 100" in r.stdout
    assert json.loads(r.stdout.splitlines()[-1])["epochs"] == 1


def test_cifar_subset_absent_is_clear(tmp_path):
    # the experiment file's relative path, resolved from a directory where it does not exist
    r = prunetune_here("train", str(REPO / "experiments/cifar10_subset.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "cifar10-subset.npz not found" in r.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepcli")
    spec = d / "tiny.toml"
    spec.write_text(f"""
[data]
train_size = 100
test_size = 40
val_fraction = 0.3
[train]
epochs = 1
batch_size = 35
lr = 0.002
optimizer = "adam"
output_dir = "{d}"
[sweep]
latency_runs = 5
latency_warmup = 1
eval_size = 30
""")
    r = prunetune_here("train", str(spec), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])["checkpoint"]


@pytest.mark.slow
def test_sweep_json_contract(tiny_checkpoint, tmp_path):
    r = prunetune("sweep", tiny_checkpoint, "--methods", "global_l1,layer_l1", "--ratios", "0:0.6:0.6", "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(p["method"], p["ratio"]) for p in points] == [
        ("global_l1", 0.0), ("global_l1", 0.6), ("layer_l1", 0.0), ("layer_l1", 0.6)]
    for p in points:
        for k in ("int8", "accuracy", "test_accuracy", "latency_ms", "latency_p90_ms", "sparsity", "nonzero_params", "size_mb", "macs"):
            assert k in p, k
        assert p["sparsity"] == pytest.approx(p["ratio"], abs=1e-3)
    assert "latency_ms" in r.stdout.splitlines()[1] or "latency_ms" in r.stdout  # the printed table


@pytest.mark.slow
def test_sweep_csv(tiny_checkpoint, tmp_path):
    out = tmp_path / "s.csv"
    r = prunetune_here("sweep", tiny_checkpoint, "--methods", "channel_l1", "--ratios", "0.5", "--int8", "--csv",
                       str(out))
    assert r.returncode == 0, r.stderr
    import pandas as pd
    df = pd.read_csv(out)
    assert list(df.int8) == [False, True] and (df.method == "channel_l1").all()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--ratios", "0,1.2"], "[sweep] ratio 1.2 is outside [0, 1)"),
    (["--ratios", "a:b"], "use start:stop:step"),
    (["--methods", "magic"], "unknown method 'magic'"),
])
def test_sweep_bad_options(tiny_checkpoint, args, message):
    r = prunetune_here("sweep", tiny_checkpoint, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_sweep_bad_checkpoints(tmp_path):
    import torch
    r = prunetune_here("sweep", str(tmp_path / "none.pt"))
    assert r.returncode == 2 and "not found" in r.stderr
    torch.save({"arch": "vit_b_16", "model": {}}, tmp_path / "vit.pt")
    r = prunetune_here("sweep", str(tmp_path / "vit.pt"))
    assert r.returncode == 2 and "vit.pt is not a complete prunetune checkpoint: epoch (missing)" in r.stderr and "Traceback" not in r.stderr


def test_submit_and_search_address_errors(tiny_spec_file):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS")}
    r = prunetune_here("submit", str(tiny_spec_file), env=env)
    assert r.returncode == 2 and "submit needs --tracking-uri" in r.stderr
    r = prunetune_here("submit", str(tiny_spec_file), "--address", "http://127.0.0.1:1", "--tracking-uri",
                       "http://mlflow:5000", env=env)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API at 'http://127.0.0.1:1'" in r.stderr
    r = prunetune_here("submit", str(tiny_spec_file), "--set", "train.lr=-1", "--tracking-uri",
                       "http://mlflow:5000", env=env)
    assert r.returncode == 2 and "lr must be > 0" in r.stderr  # checked here, before anything is submitted
    r = prunetune_here("search", str(tiny_spec_file), "--address", "http://127.0.0.1:8265", env=env)
    assert r.returncode == 2 and "prunetune submit FILE --address http://127.0.0.1:8265" in r.stderr
