"""The MLflow UI in a real headless Chromium: a tracking server process with a SQL backend, a
tiny search against it, and the experiment page listing the parent and child runs.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; `.ci/run` installs
both and sets PRUNETUNE_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping.
"""
import os
import shutil

import pytest

from conftest import prunetune, write_spec
from servers import MlflowServer

pytestmark = pytest.mark.slow  # an MLflow server, a search and a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("PRUNETUNE_REQUIRE_BROWSER") == "1"


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server.url
    server.stop()


def test_mlflow_ui_lists_parent_and_child_runs(mlflow_server, tmp_path):
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    spec = write_spec(tmp_path / "uitest.toml", tmp_path / "rr", num_samples=2, epochs=1)
    r = prunetune("search", str(spec), "--tracking-uri", mlflow_server, timeout=600)
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
        # the experiment's own address: tagged as model development, it opens on its runs (MLflow 3
        # shows a GenAI overview otherwise), so the search's parent run is there without a click
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}", wait_until="load", timeout=90_000)
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        # child runs are nested under the parent, collapsed: expand it from its run-name cell
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        for child in children:
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.is_file() and shot.stat().st_size > 10_000
