"""A search as a Ray Job: ``prunetune submit`` runs ``prunetune search FILE`` on the head node.

The driver then lives on the cluster, so the search survives the submitting machine going to
sleep or losing its connection. The job's working directory is the experiment file alone;
its environment names the tracking server (which the cluster must reach) and marks the job as
submitted, so the search leaves that directory as soon as the file is read
(:func:`leave_job_dir`).
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuning import runs

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"  # the Ray head's dashboard / Jobs API
SUBMITTED_ENV = "PRUNETUNE_SUBMITTED"  # set in a submitted job's environment


class SubmitError(ValueError):
    """A submission that cannot go ahead; the message names the fix."""


def jobs_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_API_SERVER_ADDRESS``, else the local head's Jobs API."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_JOBS_ADDRESS


@dataclass
class Job:
    id: str
    address: str  # the Jobs API it was submitted to
    command: str  # what it runs on the head

    def ray(self, verb: str) -> str:
        """The ``ray job`` command that does ``verb`` (logs, status, stop) to this job."""
        return f"ray job {verb} {self.id} --address {self.address}"

    def how_to(self) -> str:
        return (f"follow it:  {self.ray('logs')} --follow\nstatus:     {self.ray('status')}\n"
                f"stop it:    {self.ray('stop')}")


def submit(file: str | Path, overrides: list[str], address: str | None = None,
           tracking_uri: str | None = None) -> Job:
    """Submit ``prunetune search FILE [--set ...]`` to the Jobs API at ``address`` (see
    :func:`jobs_address`), with the file as the job's working directory."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SubmitError("submit needs --tracking-uri (or MLFLOW_TRACKING_URI): an MLflow server the cluster can "
                          "reach, e.g. http://mlflow:5000; a default sqlite file would stay inside the job's "
                          "directory on the head node")
    address = jobs_address(address)
    client = _client(address)
    entry = ["prunetune", "search", Path(file).name, "--tracking-uri", uri]
    for override in overrides:
        entry += ["--set", override]
    env = {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", SUBMITTED_ENV: "1"}
    if os.environ.get("PRUNETUNE_DEBUG"):  # tracebacks from the job too
        env["PRUNETUNE_DEBUG"] = os.environ["PRUNETUNE_DEBUG"]
    staging = Path(tempfile.mkdtemp(prefix="prunetune-submit-"))  # the job's working dir: the file only
    try:
        shutil.copy(file, staging / Path(file).name)
        job_id = client.submit_job(entrypoint=shlex.join(entry),
                                   runtime_env={"working_dir": str(staging), "env_vars": env})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Job(job_id, address, shlex.join(entry))


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
    """In a submitted job, move to ``storage_path``: a Ray Job's working dir can be garbage-
    collected once the trials' workers exit (Ray issue #52343), and Tune needs a current
    directory at the end. Outside a job, nothing."""
    if os.environ.get(SUBMITTED_ENV):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        os.chdir(storage_path)
