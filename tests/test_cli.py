import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SUBSET


def prunetune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuning.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


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
    r = prunetune("train", str(tiny_spec_file), "--set", override)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_dataset_path(tiny_spec_file, tmp_path):
    r = prunetune("train", str(tiny_spec_file), "--set", "data.dataset=npz", "--set", f"data.path={tmp_path}/none.npz")
    assert r.returncode == 2 and "none.npz not found" in r.stderr and "Traceback" not in r.stderr


def test_diverging_lr(tiny_spec_file):
    r = prunetune("train", str(tiny_spec_file), "--set", "train.lr=1e12", "--set", "train.optimizer=sgd",
                  "--set", "train.schedule=constant")
    assert r.returncode == 2 and "diverged at epoch 1" in r.stderr and "lr=1e+12" in r.stderr


@pytest.mark.skipif(not SUBSET.is_file(), reason="shared CIFAR-10 subset not present")
def test_train_on_real_cifar_subset(tmp_path):
    r = prunetune(
        "train", "experiments/cifar10_subset.toml", "--set", "train.epochs=1", "--set", "data.train_size=200",
        "--set", "data.test_size=100", "--set", f"train.output_dir={tmp_path}", "--json",
    )
    assert r.returncode == 0, r.stderr
    assert "npz train 180 / val 20 / test 100" in r.stdout
    assert json.loads(r.stdout.splitlines()[-1])["epochs"] == 1


def test_cifar_subset_absent_is_clear(tmp_path):
    # the experiment file's relative path, resolved from a directory where it does not exist
    r = prunetune("train", str(REPO / "experiments/cifar10_subset.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "cifar10-subset.npz not found" in r.stderr
