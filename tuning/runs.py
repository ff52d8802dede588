"""A search's runs in MLflow: the tracking store, and the runs found again by their tags.

:mod:`tuning.tracking` writes one parent run per search (tags ``prunetune.kind = search``,
``prunetune.search_dir``) and one child run per trial (``mlflow.parentRunId``,
``prunetune.kind = trial``, ``prunetune.trial_id``). Whatever reads that layout back (a resumed
search, the back-fill, ``prunetune pareto``) finds its runs here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from trainables.errors import NotFound, TrackingError
from trainables.names import DONE
from tuning.names import (ACCURACY_FLOOR, EXPERIMENT_JSON, FRONT_CSV, KIND_TAG, PARENT_TAG, POINTS_CSV, SEARCH,
                          SEARCH_DIR_TAG, STATUS_TAG, SWEEP_CSV, TRIAL_ID_TAG)
from tuning.spec import Spec, from_dict

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's client, while a search runs (unless the caller set them): a server that went away is
# a warning and a back-fill later (tuning.tracking), not minutes of retries that stall the trials
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# every command's MLflow client (unless the caller set it): artifacts stream through the tracking
# server. With its artifacts on an object store, MLflow 3's client otherwise downloads them from the
# store itself by presigned URL, and a store the server reaches at an address this machine cannot
# (http://minio:9000 inside a cluster) stalls the download in retries for minutes
ARTIFACT_ENV = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
# what MLflow's client sends to a server with authentication (basic auth, or a bearer token);
# read from the environment, never from a URI, never printed
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

    A relative SQLite path is made absolute here, once: the URI is stored with the search
    (``prunetune resume`` from another directory must reach the same store). A URI that carries
    a user or password is refused: prunetune prints the URI and stores it in the search's
    directory, where the password would be readable."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        raise TrackingError("the tracking URI carries a user or password, which prunetune would print and store "
                            "with the search: pass the URI without them and set MLFLOW_TRACKING_USERNAME / "
                            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri:
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def check_reachable(uri: str) -> MlflowClient:
    """Return an MlflowClient for ``uri`` after one real request; fail fast and clearly."""
    from mlflow import MlflowClient

    from tuning import _scoped

    client = MlflowClient(tracking_uri=uri)
    try:
        with _scoped.environment(CLIENT_ENV):
            client.search_experiments(max_results=1)
    except Exception as e:  # connection refused, bad scheme, unreadable database, ...
        if _http_status(e) in (401, 403):
            raise TrackingError(_refused(uri, _http_status(e))) from None
        raise TrackingError(
            f"cannot use the MLflow tracking store {uri!r}: {first_line(e)[:300]}. Start the server (e.g. "
            "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`), "
            "fix --tracking-uri / MLFLOW_TRACKING_URI, or leave both unset for sqlite:///mlflow.db"
        ) from None
    return client


def _http_status(e: BaseException) -> int | None:
    status = getattr(e, "get_http_status_code", None)
    return status() if callable(status) else None


def _refused(uri: str, status: int) -> str:
    """What to do when the server wants credentials (401) or the user lacks a permission (403)."""
    given = [k for k in CREDENTIAL_ENV if os.environ.get(k)]
    if status == 403:
        return (f"the MLflow tracking server {uri!r} refused the request (403): the user in "
                "MLFLOW_TRACKING_USERNAME lacks a permission; an admin grants it (MLflow's auth API) or use another user")
    if given:
        return (f"the MLflow tracking server {uri!r} refused the credentials in {' / '.join(given)} (401): check "
                "the user and password (or token)")
    return (f"the MLflow tracking server {uri!r} requires authentication (401): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in this command's environment; `prunetune submit` "
            "hands them to the job")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (MLflow's can run to pages), else its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def search_run(client: MlflowClient, experiment_id: str, search_dir: str) -> Run | None:
    """The parent run of the search in ``search_dir``, if it has one."""
    found = client.search_runs([experiment_id], f"tags.`{SEARCH_DIR_TAG}` = '{search_dir}'")
    return found[0] if found else None


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, Run]:
    """Trial id -> the trial's child run, for every child of the parent run ``parent_id``."""
    children = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return {r.data.tags[TRIAL_ID_TAG]: r for r in children if TRIAL_ID_TAG in r.data.tags}


def latest_search(client: MlflowClient, experiment: str | None = None) -> Run:
    """The parent run of the search that finished last, in ``experiment`` or in any. A search
    ends (FINISHED) once its models are registered and their aliases set, so this is the search
    that set the aliases last: ``prunetune pareto`` and ``models:/NAME@ALIAS`` name the same one."""
    ids = _experiment_ids(client, experiment)
    found = client.search_runs(ids, f"tags.`{KIND_TAG}` = '{SEARCH}' and attributes.status = 'FINISHED'",
                               order_by=["attributes.end_time DESC"], max_results=1) if ids else []
    if not found:
        where = f"experiment {experiment!r}" if experiment else "the tracking store"
        raise NotFound(f"no finished prunetune search in {where}; run `prunetune search FILE` first")
    return found[0]


def running_search(client: MlflowClient, experiment: str | None = None) -> Run | None:
    """The parent run of the search started last that has not finished (running, or its driver
    died before the end: `prunetune resume` finishes it), if it started after the last finished one."""
    ids = _experiment_ids(client, experiment)
    found = client.search_runs(ids, f"tags.`{KIND_TAG}` = '{SEARCH}'", order_by=["attributes.start_time DESC"],
                               max_results=1) if ids else []
    return found[0] if found and found[0].info.status == "RUNNING" else None


def trial_points(client: MlflowClient, parent: Run) -> pd.DataFrame:
    """Every sweep point of the trials of ``parent`` that completed so far (their ``sweep.csv``),
    each row with its ``trial_id``, ``lr`` and ``run_id``."""
    tables = []
    for trial_id, run in child_runs(client, parent.info.experiment_id, parent.info.run_id).items():
        if run.data.tags.get(STATUS_TAG) != DONE:
            continue
        with tempfile.TemporaryDirectory(prefix="prunetune-") as where:
            table = pd.read_csv(client.download_artifacts(run.info.run_id, SWEEP_CSV, where), dtype={"arch": str})
        tables.append(table.assign(trial_id=trial_id, lr=float(run.data.params.get("lr", "nan")), run_id=run.info.run_id))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def logged_spec(client: MlflowClient, parent: Run) -> Spec:
    """The experiment a search ran, as its parent run logged it (``experiment.json``)."""
    with tempfile.TemporaryDirectory(prefix="prunetune-") as where:
        logged = client.download_artifacts(parent.info.run_id, EXPERIMENT_JSON, where)
        return from_dict(json.loads(Path(logged).read_text()), source=f"run {parent.info.run_id}: {EXPERIMENT_JSON}")


def _experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    if not experiment:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise NotFound(f"no MLflow experiment {experiment!r}; experiments: {', '.join(names) or 'none'}")
    return [exp.experiment_id]


@dataclass
class FinishedSearch:
    parent: Run  # the search's parent run (params, metrics)
    name: str  # its experiment, and the registered model's name
    points: pd.DataFrame  # all_points.csv: every point of every trial
    front: pd.DataFrame  # pareto.csv
    spec: Spec  # the experiment it ran, as logged (experiment.json)
    floor: float  # the accuracy floor its front obeys, as resolved for its classes


def load_search(uri: str, experiment: str | None = None) -> FinishedSearch:
    """The latest finished search: its parent run, every point and the front, each row with the
    ``run_id`` of its trial's run (what ``prunetune export`` takes)."""
    client = check_reachable(uri)
    parent = latest_search(client, experiment)
    run_of = _run_ids(client, parent)
    points, front = (_table(client, parent, name, run_of) for name in (POINTS_CSV, FRONT_CSV))
    return FinishedSearch(parent, client.get_experiment(parent.info.experiment_id).name, points, front,
                          logged_spec(client, parent), parent.data.metrics.get(ACCURACY_FLOOR, 0.0))


def _run_ids(client: MlflowClient, parent: Run) -> dict[str, str]:
    """Trial id -> the run id of its child run under ``parent``."""
    children = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    return {tid: r.info.run_id for tid, r in children.items()}


def _table(client: MlflowClient, parent: Run, name: str, run_of: dict[str, str]) -> pd.DataFrame:
    """A table the search logged on its parent run, each row with its trial's ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="prunetune-") as where:
        local = client.download_artifacts(parent.info.run_id, name, where)
        table = pd.read_csv(local, dtype={"trial_id": str})  # ids like "08088346" are not numbers
    table.insert(0, "run_id", table.trial_id.map(run_of))
    return table


def ui_address(base: str, experiment_id: str) -> str:
    """The UI page listing an experiment's runs. MLflow 3 opens an experiment on its GenAI
    overview unless the address asks for the model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def where_to_look(uri: str, experiment_id: str) -> str:
    """Where a user browses a search's runs: the server's page, or the command that serves a store."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {ui_address(uri, experiment_id)}"
    return f"MLflow UI: `prunetune ui --tracking-uri {uri}`, then {ui_address('http://127.0.0.1:5000', experiment_id)}"


def serve_ui(uri: str, host: str, port: int) -> int:
    """Run the MLflow UI on the store ``uri`` at ``host:port`` until Ctrl-C; returns its exit
    code. A tracking server serves its own UI: then this only says where."""
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is a tracking server: its UI is at {uri}", flush=True)
        return 0
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow_bin is None:
        raise NotFound("the `mlflow` command is not installed in this environment; `pip install mlflow`")
    print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it); a search's runs: "
          f"{ui_address(f'http://{host}:{port}', '<experiment id>')}", flush=True)
    return subprocess.call([mlflow_bin, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)])


def provenance() -> dict[str, str]:
    """What a search ran with, as its parent run's tags: the git commit of this checkout and the
    versions of the packages that decide its numbers."""
    from importlib import metadata

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        commit = out.stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    tags = {"git_commit": commit}
    for package in ("torch", "ray", "optuna", "mlflow", "torch-pruning"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "absent"
    return tags
