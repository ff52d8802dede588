"""The MLflow UI in a real headless Chromium: a tracking server process with a SQL backend, a
tiny search against it, and the experiment page listing the parent and child runs.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; `.ci/run` installs
both and sets PRUNETUNE_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("PRUNETUNE_REQUIRE_BROWSER") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=3).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_mlflow_ui_lists_parent_and_child_runs(mlflow_server, tmp_path):
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    spec = tmp_path / "ui.toml"
    spec.write_text(f"""
name = "uitest"
[data]
train_size = 60
test_size = 30
val_fraction = 0.25
[train]
epochs = 1
batch_size = 30
optimizer = "adam"
[sweep]
methods = ["global_l1"]
ratios = [0.0, 0.5]
latency_runs = 3
latency_warmup = 1
eval_size = 20
[search]
num_samples = 2
cpus_per_trial = 1.0
storage_path = "{tmp_path / 'rr'}"
""")
    r = subprocess.run([sys.executable, "-m", "tuning.cli", "search", str(spec), "--tracking-uri", mlflow_server],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("uitest")
    runs = client.search_runs([exp.experiment_id])
    parent = next(x for x in runs if x.data.tags.get("prunetune.kind") == "search")
    children = [x for x in runs if x.data.tags.get("prunetune.kind") == "trial"]
    assert len(children) == 2

    shot = tmp_path / "experiment.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # the experiment's "Training runs" tab (MLflow 3 opens on an overview otherwise)
        page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs", wait_until="load", timeout=90_000)
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        # child runs are nested under the parent, collapsed: expand it from its run-name cell
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        for child in children:
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.is_file() and shot.stat().st_size > 10_000
