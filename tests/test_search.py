"""The search service on a real local Ray: GPU slots, Optuna study contents, kill + resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import REPO
from tuning import search
from tuning.spec import from_dict


def tiny_spec(tmp_path: Path, **search_kw) -> dict:
    return {
        "name": "tiny",
        "data": {"train_size": 60, "test_size": 30, "val_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 30, "optimizer": "adam", "lr": 0.002},
        "sweep": {"methods": ["global_l1", "channel_l1"], "ratios": [0.0, 0.5], "latency_runs": 3,
                  "latency_warmup": 1, "eval_size": 20},
        "search": {"num_samples": 4, "lr_min": 5e-4, "lr_max": 5e-3, "storage_path": str(tmp_path / "rr"),
                   **search_kw},
    }


def study_trials(exp_dir: Path) -> list:
    storage = f"sqlite:///{exp_dir / search.STUDY_FILE}"
    return optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)


def test_fractional_gpu_slots_and_sweep_feedback(tmp_path):
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)  # two logical GPUs
    try:
        spec = from_dict(tiny_spec(tmp_path, cpus_per_trial=0.5, gpus_per_trial=0.5))
        res = search.search(spec)
    finally:
        ray.shutdown()
    t = res.trials
    assert len(t) == 4 and (t.status == "done").all(), t
    # four trials at once: every trial started before any finished
    assert t.trial_start.max() < t.trial_end.min(), t.to_string()
    # each saw the GPU Ray assigned it; two trials per logical GPU
    assert sorted(t.cuda_visible_devices.astype(str)) == ["0", "0", "1", "1"], t.to_string()
    # Optuna study: one entry per trained trial plus one per (other) sweep point
    trials = study_trials(res.path)
    trained = [s for s in trials if s.user_attrs.get("source") != "sweep"]
    assert len(trained) == 4
    assert len(trials) == len(res.points), (len(trials), res.points.to_string())  # every point is evidence
    swept = {(round(s.params["prune_ratio"], 4), s.params["method"]) for s in trials}
    assert (0.5, "channel_l1") in swept and (0.0, "global_l1") in swept
    # results on disk, Pareto front non-empty and non-dominated
    assert (res.path / "all_points.csv").is_file() and len(res.front) >= 1
    pts = pd.read_csv(res.path / "all_points.csv")
    assert len(pts) == 4 * 6 and set(pts.method) == {"global_l1", "channel_l1"}
    # same architecture, same latency, in every trial (one shared measurement)
    assert (pts.groupby("arch").latency_ms.nunique() == 1).all(), pts.to_string()
    assert pts.trial_id.nunique() == 4 and pts.groupby("arch").trial_id.nunique().max() == 4


def _done_trials(exp_dir: Path) -> int:
    n = 0
    for f in exp_dir.glob("*/result.json"):
        n += any(json.loads(line).get("phase") == "done" for line in f.read_text().splitlines() if line.strip())
    return n


def test_killed_search_resumes_without_loss_or_duplicates(tmp_path):
    spec_file = tmp_path / "s.toml"
    d = tiny_spec(tmp_path, max_concurrent_trials=1, cpus_per_trial=2.0)
    d["sweep"]["methods"] = ["global_l1"]
    lines = [f'name = "{d["name"]}"']
    for sec in ("data", "train", "sweep", "search"):
        lines.append(f"[{sec}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in d[sec].items()]
    spec_file.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "search", str(spec_file)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    exp_dir = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if exp_dir is None:
                line = proc.stdout.readline()
                if "experiment dir" in line:
                    exp_dir = Path(line.split("experiment dir ")[1].split(" ")[0])
            elif _done_trials(exp_dir) >= 1:
                break
            else:
                time.sleep(0.5)
        else:
            pytest.fail("the search did not finish a trial in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-search
        proc.wait()
    done_before = _done_trials(exp_dir)
    assert 1 <= done_before < 4
    r = subprocess.run([sys.executable, "-m", "tuning.cli", "resume", str(exp_dir)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Pareto front" in r.stdout
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 4 and trials.trial_id.is_unique and (trials.status == "done").all()
    trained = [s for s in study_trials(exp_dir) if s.user_attrs.get("source") != "sweep"
               and s.state == optuna.trial.TrialState.COMPLETE]
    assert len(trained) == 4


def test_unreachable_ray_address_is_clear(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('[data]\ntrain_size = 60\n')
    r = subprocess.run([sys.executable, "-m", "tuning.cli", "search", str(spec_file), "--address", "127.0.0.1:1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot reach the Ray cluster at '127.0.0.1:1'" in r.stderr


def test_resume_of_a_non_search_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tuning.cli", "resume", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a prunetune search directory" in r.stderr
