"""A search as a Ray Job: ``prunetune submit`` runs ``prunetune search FILE`` on the head node.

The driver then lives on the cluster, so the search survives the submitting machine going to
sleep or losing its connection. The job's working directory is the experiment file alone,
and Ray deletes it when the job ends, so **nothing of the search is written there**: before
submitting, :func:`submit_search` fixes where the results go on the cluster and prints it.

- ``[search] storage_path`` given in the file or with ``--set``: it must be absolute (a path on
  the cluster) and is used as it is.
- Else a **probe job** (a one-line shell command through the same Jobs API, a few seconds)
  asks the head for ``$PRUNETUNE_STORAGE_PATH``, else the durable default
  ``$HOME/prunetune/ray_results`` of the user running Ray there (:data:`DURABLE_DEFAULT`:
  outside Ray's temp directory, kept across jobs and restarts); a relative or unwritable path
  is refused before anything is submitted. On several nodes the search's storage check then
  insists that every node sees it (a home directory rarely is: set ``PRUNETUNE_STORAGE_PATH``
  to a shared filesystem on every node).

The experiment directory ``<storage>/<name>-<time>`` is fixed here and handed to the job
(``--set search.storage_path`` and :data:`EXPERIMENT_DIR_ENV`); submit prints it with the
``prunetune resume DIR --address JOBS_API`` command, which submits the resume as a job too
(:func:`submit_resume`).

MLflow credentials (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` or ``_TOKEN``) travel in a file
of the uploaded working directory, which the job reads into its own environment and deletes
(:func:`leave_job_dir`): not as runtime-env variables, because Ray's runtime-env agent writes
those into its log and the job list shows them. Nothing here prints them.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from trainables.errors import SubmitError
from tuning.names import CREDENTIALS_FILE
from tuning import runs, storage
from tuning.spec import Spec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"  # the Ray head's dashboard / Jobs API
SUBMITTED_ENV = "PRUNETUNE_SUBMITTED"  # set in a submitted job's environment
EXPERIMENT_DIR_ENV = "PRUNETUNE_EXPERIMENT_DIR"  # the experiment directory's name submit chose
DURABLE_DEFAULT = "$HOME/prunetune/ray_results"  # on the head, when PRUNETUNE_STORAGE_PATH is unset there
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray sets it in every job's entrypoint
_PROBE_TIMEOUT_S = 120
# the probe: the head's storage path, or why there is none (one line, read back from the job's logs)
_PROBE = f"""p="${{PRUNETUNE_STORAGE_PATH:-}}"; src=PRUNETUNE_STORAGE_PATH
if [ -z "$p" ]; then
  [ -n "${{HOME:-}}" ] || {{ echo "prunetune-storage-error: HOME is not set on the head"; exit 0; }}
  p="{DURABLE_DEFAULT}"; src=default
fi
case "$p" in /*) ;; *) echo "prunetune-storage-error: PRUNETUNE_STORAGE_PATH=$p on the head is relative"; exit 0;; esac
if mkdir -p "$p" 2>/dev/null && [ -w "$p" ]; then echo "prunetune-storage: $src $p"
else echo "prunetune-storage-error: $p on the head is not writable"; fi"""


def jobs_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_API_SERVER_ADDRESS``, else the local head's Jobs API."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_JOBS_ADDRESS


def is_jobs_address(address: str | None) -> bool:
    """A Jobs API URL (``http(s)://HEAD:8265``), as opposed to a Ray address."""
    return bool(address) and address.startswith(("http://", "https://"))


@dataclass
class Job:
    id: str
    address: str  # the Jobs API it was submitted to
    command: str  # what it runs on the head
    results: str  # the experiment directory on the cluster
    storage_from: str  # where its storage path came from

    def ray(self, verb: str) -> str:
        """The ``ray job`` command that does ``verb`` (logs, status, stop) to this job."""
        return f"ray job {verb} {self.id} --address {self.address}"

    def how_to(self) -> str:
        return (f"results on the cluster: {self.results} ({self.storage_from})\n"
                f"resume it:  prunetune resume {shlex.quote(self.results)} --address {self.address} [--follow]\n"
                f"follow it:  {self.ray('logs')} --follow\nstatus:     {self.ray('status')}\n"
                f"stop it:    {self.ray('stop')}")


def submit_search(file: str | Path, overrides: list[str], spec: Spec, address: str | None = None,
                  tracking_uri: str | None = None) -> Job:
    """Submit ``prunetune search FILE [--set ...]`` to the Jobs API at ``address`` (see
    :func:`jobs_address`), with the file as the job's working directory and the results in
    a directory on the cluster fixed here (see the module docstring)."""
    uri = _tracking_uri(tracking_uri)
    _check_paths(spec)
    address = jobs_address(address)
    client = _client(address)
    storage, source = ((spec.search.storage_path, "[search] storage_path") if "search.storage_path" in spec.given
                       else _probe_storage(client, address))
    results = str(PurePosixPath(storage) / spec.run_name())
    entry = ["prunetune", "search", Path(file).name, "--tracking-uri", uri]
    for override in [*overrides, f"search.storage_path={storage}"]:
        entry += ["--set", override]
    env = {"MLFLOW_TRACKING_URI": uri, EXPERIMENT_DIR_ENV: PurePosixPath(results).name}
    return _submit(client, Job("", address, shlex.join(entry), results, source), env, file)


def submit_resume(path: str, address: str) -> Job:
    """Submit ``prunetune resume PATH`` (a directory on the cluster, as submit printed it)."""
    if not PurePosixPath(path).is_absolute():
        raise SubmitError(f"resume through the Jobs API needs the absolute directory on the cluster that submit "
                          f"printed, got {path!r}")
    address = jobs_address(address)
    entry = shlex.join(["prunetune", "resume", path])
    return _submit(_client(address), Job("", address, entry, path, "resumed"), {}, None)


def _submit(client: JobSubmissionClient, job: Job, env: dict[str, str], file: str | Path | None) -> Job:
    """Submit ``job.command`` with ``env``; its working directory holds ``file`` and the MLflow
    credentials of this environment (each job's own, a nonce makes its package unique)."""
    env = {**env, "PYTHONUNBUFFERED": "1", SUBMITTED_ENV: "1"}
    if os.environ.get("PRUNETUNE_DEBUG"):  # tracebacks from the job too
        env["PRUNETUNE_DEBUG"] = os.environ["PRUNETUNE_DEBUG"]
    credentials = {k: os.environ[k] for k in runs.CREDENTIAL_ENV if os.environ.get(k)}
    staging = Path(tempfile.mkdtemp(prefix="prunetune-submit-"))  # the job's working dir
    try:
        if file is not None:
            shutil.copy(file, staging / Path(file).name)
        if credentials:
            secret = staging / CREDENTIALS_FILE
            secret.write_text(json.dumps({"env": credentials, "nonce": secrets.token_hex(8)}))
            secret.chmod(0o600)
        runtime_env = {"env_vars": env, **({"working_dir": str(staging)} if any(staging.iterdir()) else {})}
        job.id = client.submit_job(entrypoint=job.command, runtime_env=runtime_env)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return job


def announce(job: Job, follow_logs: bool) -> int:
    """Print the job, where its results go and the commands for it; with ``follow_logs``
    stream its logs. The exit code: 0 submitted (or followed to success), 1 failed, 130 Ctrl-C."""
    print(f"submitted Ray job {job.id} to {job.address}: {job.command}\n{job.how_to()}", flush=True)
    if not follow_logs:
        return 0
    try:
        return 0 if follow(job) else 1
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job.id} goes on ({job.ray('stop')} stops it)", flush=True)
        return 130


def follow(job: Job) -> bool:
    """Stream the job's logs to stdout until it ends; True if it succeeded."""
    from ray.job_submission import JobStatus

    client = _client(job.address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job.id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job.id)
    print(f"Ray job {job.id}: {status.value}", flush=True)
    return status == JobStatus.SUCCEEDED


def _tracking_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SubmitError("submit needs --tracking-uri (or MLFLOW_TRACKING_URI): an MLflow server the cluster can "
                          "reach, e.g. http://mlflow:5000; a default sqlite file would stay inside the job's "
                          "directory on the head node")
    return runs.tracking_uri(uri)  # refuses a user or password in it


# the path keys a submitted search reads on the cluster (by dataset for the data), with an example
_CLUSTER_PATHS = {"search.storage_path": "/shared/ray_results", "data.path": "/shared/data/mine.npz",
                  "data.root": "/shared/data/cifar10"}


def _check_paths(spec: Spec) -> None:
    """Refuse a relative path the submitted search would read or write on the cluster: the job runs
    in its working directory, which Ray deletes when the job ends (a dataset downloaded there
    would be lost, and its path recorded in every checkpoint)."""
    used = {"search.storage_path", {"npz": "data.path", "cifar10": "data.root"}.get(spec.data.dataset, "")}
    for key in sorted(used & spec.relative):
        if key == "search.storage_path" and key not in spec.given:
            continue  # not stated: the head's PRUNETUNE_STORAGE_PATH or the durable default (_probe_storage)
        section, name = key.split(".")
        raise SubmitError(f"{key} is a relative path ({'a default' if key not in spec.given else 'as given'}): in a "
                          "submitted job it would be inside the job's working directory, which Ray deletes when the "
                          f"job ends. Give the absolute path on the cluster (--set {key}={_CLUSTER_PATHS[key]})"
                          + (f", or leave it out to use PRUNETUNE_STORAGE_PATH on the head, else {DURABLE_DEFAULT} there"
                             if section == "search" else ""))


def _probe_storage(client: JobSubmissionClient, address: str) -> tuple[str, str]:
    """Run :data:`_PROBE` as a job on the head: its storage path and where it came from."""
    job_id = client.submit_job(entrypoint=_PROBE, metadata={"prunetune": "storage probe"})
    deadline = time.time() + _PROBE_TIMEOUT_S
    while not client.get_job_status(job_id).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    with_fix = ("set PRUNETUNE_STORAGE_PATH on the cluster's nodes (a shared filesystem) or pass "
                "--set search.storage_path=/absolute/path/on/the/cluster")
    for line in logs.splitlines():
        if line.startswith("prunetune-storage-error: "):
            raise SubmitError(f"no place for the results on the cluster: {line.split(': ', 1)[1]}; {with_fix}")
        if line.startswith("prunetune-storage: "):
            source, path = line.split(": ", 1)[1].split(" ", 1)
            _quietly(client.delete_job, job_id)
            return path, ("PRUNETUNE_STORAGE_PATH on the head" if source == "PRUNETUNE_STORAGE_PATH" else
                          f"the durable default {DURABLE_DEFAULT} on the head; PRUNETUNE_STORAGE_PATH overrides it")
    raise SubmitError(f"the storage probe job {job_id} at {address} did not answer within {_PROBE_TIMEOUT_S} s "
                      f"({client.get_job_status(job_id).value}; {logs.strip()[-300:]!r}); {with_fix}")


def _quietly(fn, *args) -> None:
    """``fn(*args)``, whatever it raises (housekeeping that must not fail a submission)."""
    try:
        fn(*args)
    except Exception:
        pass


def _client(address: str) -> JobSubmissionClient:
    """A Jobs API client for ``address``; a clear error when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # refused, not a Ray dashboard, bad token, ...
        raise SubmitError(f"cannot reach the Ray Jobs API at {address!r} ({runs.first_line(e)[:300]}). Start the "
                          "head with `ray start --head --dashboard-host 0.0.0.0` (port 8265) or fix --address / "
                          "RAY_API_SERVER_ADDRESS") from None


def leave_job_dir(storage_path: str) -> None:
    """In a Ray job: take the MLflow credentials submit sent (deleting their file), refuse a
    ``storage_path`` inside Ray's temp directory, where Ray unpacks the job's working directory
    and deletes it (the study, the checkpoints and the tables would go too), and move to
    ``storage_path``: Tune needs a current directory at the end and the job's can be
    garbage-collected once the trials' workers exit (Ray issue #52343). Outside a job, nothing."""
    if not (os.environ.get(SUBMITTED_ENV) or os.environ.get(_RAY_JOB_ENV)):
        return
    job_dir = Path.cwd().resolve()
    secret = job_dir / CREDENTIALS_FILE
    if secret.is_file():
        os.environ.update(json.loads(secret.read_text())["env"])
        secret.unlink()
    _keep_working_dir_from_trials()
    if storage.is_remote(storage_path):  # an object store: nothing of the search stays in the job's directory
        os.chdir(Path.home())
        return
    results, scratch = Path(storage_path).resolve(), _ray_temp_dir(job_dir)
    if scratch is not None and (results == scratch or scratch in results.parents):
        raise SubmitError(f"search.storage_path {results} is inside {scratch}, the job's scratch space, which Ray "
                          "deletes: the Optuna study, the checkpoints and the tables would go with it. Set "
                          "PRUNETUNE_STORAGE_PATH on the cluster (a filesystem every node shares) or pass "
                          "--set search.storage_path=/absolute/path")
    results.mkdir(parents=True, exist_ok=True)
    print(f"job working directory {job_dir}{' (Ray deletes it with the job)' if scratch else ''}; results under "
          f"{results}", flush=True)
    os.chdir(results)


def _keep_working_dir_from_trials() -> None:
    """Take the uploaded working directory out of the runtime env this driver's tasks and actors
    inherit (Ray hands the job's one to ``ray.init`` in :data:`_RAY_JOB_ENV`): trials need nothing
    of it (the spec reaches them as objects), and every node that ran a trial would otherwise
    unpack its own copy of the package that carried the MLflow credentials."""
    raw = os.environ.get(_RAY_JOB_ENV)
    if not raw:
        return
    config = json.loads(raw)
    if (config.get("runtime_env") or {}).pop("working_dir", None) is not None:
        os.environ[_RAY_JOB_ENV] = json.dumps(config)


def _ray_temp_dir(job_dir: Path) -> Path | None:
    """Ray's temp directory when ``job_dir`` is Ray's copy of an uploaded working directory
    (``TEMP/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), else None."""
    parts = job_dir.parts
    return Path(*parts[:parts.index("runtime_resources") - 1]) if "runtime_resources" in parts else None


def chosen_dir_name() -> str | None:
    """In a job ``prunetune submit`` started, the experiment directory name it chose and printed; else None."""
    return os.environ.get(EXPERIMENT_DIR_ENV)
