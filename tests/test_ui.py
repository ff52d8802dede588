"""The MLflow UI in a real headless Chromium: `prunetune ui` serving the SQL store a real search
wrote (the session's shared search), at the address the search printed, listing the search's
parent run and its trial runs; and the experiment's Models view, where every registered front
point is a logged model named after it, with its accuracy and latency.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; `.ci/run` installs
both and sets PRUNETUNE_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from servers import free_port, wait_for
from tuning.runs import ui_address

pytestmark = pytest.mark.slow  # an MLflow server, a search and a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("PRUNETUNE_REQUIRE_BROWSER") == "1"


def test_mlflow_ui_lists_parent_and_child_runs(gpu_search, tmp_path):
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    res, uri = gpu_search
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = next(x for x in runs if x.data.tags.get("prunetune.kind") == "search")
    children = [x for x in runs if x.data.tags.get("prunetune.kind") == "trial"]
    assert len(children) == len(res.trials) == 4

    import mlflow

    from tuning.registry import point_name

    mlflow.set_tracking_uri(uri)
    logged = [mlflow.get_logged_model(v.model_id or v.source.removeprefix("models:/"))
              for v in client.search_model_versions("name='tiny'")]
    names = {m.name for m in logged}
    latencies = {m.name: next(x.value for x in m.metrics if x.key == "latency_ms") for m in logged}
    assert names and names <= {point_name(r) for r in res.front.rows.itertuples()}  # every version: a front point
    port = free_port()  # `prunetune ui` on the search's store, as a user runs it
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    shot = tmp_path / "experiment.png"
    try:
        assert base in proc.stdout.readline()
        wait_for(lambda: _answers(f"{base}/health"), "the MLflow UI", 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 2600, "height": 900})  # wide: every metric column shows
            # the address a search prints: the experiment's runs (MLflow 3 opens on a GenAI overview otherwise)
            page.goto(ui_address(base, exp.experiment_id), wait_until="load", timeout=90_000)
            try:
                page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
                # child runs are nested under the parent, collapsed: expand it from its run-name cell
                page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
                for child in children:
                    page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
                # the Models view: each registered point under its name, with the metrics to compare them by
                page.goto(f"{base}/#/experiments/{exp.experiment_id}/models?workflowType=machine_learning",
                          wait_until="load", timeout=90_000)
                for name in names:
                    page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
                text = page.inner_text("body")
                assert "accuracy" in text and "latency_ms" in text, text[:3000]  # the metric columns
                # each point's row holds its own latency (the table renders its pinned name column and its
                # other columns as two rows each, in the same order)
                rows = [t for t in (r.inner_text() for r in page.locator("[role=row]").all()) if t.strip()]
                named = [next(n for n in names if n in t) for t in rows if any(n in t for n in names)]
                values = [t for t in rows if not any(n in t for n in names)][-len(named):]
                for name, shown in zip(named, values):
                    want = repr(latencies[name]).removesuffix(".0")  # as JavaScript prints a number
                    assert want in shown.split("\n"), (name, want, shown)
            except Exception:  # keep what the browser showed: the page's text and a screenshot
                page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
                print(f"UI at {page.url} (screenshot {tmp_path / 'failed.png'}):\n{page.inner_text('body')[:3000]}")
                raise
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert shot.is_file() and shot.stat().st_size > 10_000


def _answers(url: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False
