"""Where a search keeps its results: a directory every node sees, or an object store.

``[search] storage_path`` is a local or shared directory (NFS, a volume mounted on every node),
or an object-store URI Ray Tune's storage accepts through pyarrow (``s3://bucket/prefix``,
``gs://bucket/prefix``, ...). An S3-compatible store (MinIO, Ceph, a loopback test server) is
named by the standard ``AWS_ENDPOINT_URL``; credentials come from the store's standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) on every node, which the probe
checks before any training.

With an object store, Tune keeps the experiment and the trials' checkpoints there itself, and
the driver works in a **local copy** of the experiment directory (:func:`work_dir`), where the
modules that write the search's own files (the spec, the stopping records, the quiet latencies,
the tables, the plot) write them as they do for a local search; :func:`push` copies them up
when they change, :func:`pull` brings them back to a driver that resumes the search, and
:func:`localize` downloads the final checkpoints of the trials the driver reads (the re-measured,
registered and logged ones). Retention deletes in the store (:func:`remove_checkpoints`).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable

import pandas as pd

from trainables.errors import StorageError

WORK_DIR_ENV = "PRUNETUNE_WORK_DIR"  # where the local copies of object-store searches go
_ERRORS = (  # what pyarrow's S3 errors mean, and the fix
    (("NETWORK_CONNECTION", "Couldn't connect", "Could not resolve", "Timeout was reached"),
     "cannot reach the object store (endpoint {endpoint}): start it or set AWS_ENDPOINT_URL to its address"),
    (("NO_SUCH_BUCKET", "bucket does not exist"),
     "bucket {bucket!r} does not exist: create it (e.g. `aws s3 mb s3://{bucket}`) or point storage_path at one"),
    (("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId", "SignatureDoesNotMatch",
      "ACCESS_DENIED", "AccessDenied", "403"),
     "the object store refused the credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a key that "
     "may write to {bucket!r}"),
)


def is_remote(path: str | Path) -> bool:
    """An object-store URI (``scheme://...``), not a directory."""
    return "://" in str(path)


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *names])


def local_parent(storage_path: str) -> Path:
    """Where a new search's directory goes on this machine: ``storage_path`` itself, or the local
    copies' directory of an object store's (:func:`work_dir`)."""
    return work_dir(storage_path) if is_remote(storage_path) else Path(storage_path)


def location(storage_path: str, exp_dir: Path) -> str:
    """Where the search of ``exp_dir`` lives: the experiment's URI on an object store, else the
    directory itself (what ``prunetune resume`` takes, and MLflow's search run records)."""
    return join(storage_path, exp_dir.name) if is_remote(storage_path) else str(Path(exp_dir).resolve())


def read_text(uri: str) -> str | None:
    """The text of the object ``uri``, None when there is none."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def filesystem(uri: str):
    """(pyarrow filesystem, path on it) of an object-store URI, or of a local directory."""
    import pyarrow.fs

    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise StorageError(f"storage_path {uri}: {_first_line(e)}; use a URI pyarrow's filesystems accept, "
                           "e.g. s3://bucket/prefix (an S3-compatible store's address goes in AWS_ENDPOINT_URL)") from None


def work_dir(uri: str) -> Path:
    """The driver's local copy of the experiment ``uri``: ``$PRUNETUNE_WORK_DIR`` (default
    ``~/.cache/prunetune``) / scheme / bucket / prefix / run."""
    scheme, _, rest = uri.partition("://")
    base = Path(os.environ.get(WORK_DIR_ENV) or Path.home() / ".cache" / "prunetune").expanduser()
    return base / scheme / rest.strip("/")


def probe(uri: str) -> None:
    """Write, read back and delete a marker under ``uri`` from this process: one line naming
    what is wrong (the endpoint, the bucket, the credentials) before any training."""
    fs, path = filesystem(uri)
    marker = f"{path.rstrip('/')}/.prunetune-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(marker) as f:
            f.write(b"prunetune")
        with fs.open_input_stream(marker) as f:
            ok = f.read() == b"prunetune"
        fs.delete_file(marker)
    except OSError as e:
        raise StorageError(f"storage_path {uri}: {explain(e, uri)}") from None
    if not ok:
        raise StorageError(f"storage_path {uri}: a marker written there read back different; check the store")


def explain(e: BaseException, uri: str) -> str:
    """One line for an object-store error: what it means and the fix, else its first line."""
    text = str(e)
    bucket = uri.partition("://")[2].split("/")[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the provider's default"
    for needles, message in _ERRORS:
        if any(n in text for n in needles):
            return message.format(bucket=bucket, endpoint=endpoint)
    return _first_line(e)


def push(exp_dir: Path, uri: str, names: Iterable[str] | None = None) -> None:
    """Copy the driver's own files of ``exp_dir`` (top level only: Tune's trial directories are
    Tune's) to the experiment ``uri``; ``names``: only these."""
    fs, path = filesystem(uri)
    files = [exp_dir / n for n in names] if names is not None else [f for f in exp_dir.iterdir() if f.is_file()]
    for f in files:
        if f.is_file() and not f.name.startswith("."):
            with fs.open_output_stream(f"{path}/{f.name}") as out:
                out.write(f.read_bytes())


def pull(uri: str, exp_dir: Path) -> None:
    """Copy the top-level files of the experiment ``uri`` into ``exp_dir`` (a resumed search's
    local copy), replacing what is there."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    except OSError as e:
        raise StorageError(f"{uri}: {explain(e, uri)}") from None
    exp_dir.mkdir(parents=True, exist_ok=True)
    for info in infos:
        if info.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                (exp_dir / info.base_name).write_bytes(f.read())


def localize(trials: pd.DataFrame, exp_dir: Path, scheme: str, trial_ids: Iterable[str]) -> pd.DataFrame:
    """``trials`` with the final checkpoints of ``trial_ids`` downloaded into ``exp_dir /
    checkpoints / <trial id>`` (what the driver reads: the artifacts it re-measures, registers and
    logs) and the ``checkpoint`` column pointing there; ``trial_dir`` becomes the trial's URI
    (``scheme://...``), where retention deletes."""
    import pyarrow.fs

    trials = trials.copy()
    wanted = set(trial_ids)
    for i, r in trials.iterrows():
        if isinstance(r.trial_dir, str) and not is_remote(r.trial_dir):
            trials.loc[i, "trial_dir"] = f"{scheme}://{r.trial_dir}"
        if r.trial_id not in wanted or not isinstance(r.checkpoint, str):
            continue
        local = exp_dir / "checkpoints" / r.trial_id
        if not local.is_dir():
            fs, path = filesystem(f"{scheme}://{r.checkpoint}")
            tmp = local.with_name(f".{r.trial_id}.partial")
            pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            tmp.rename(local)
        trials.loc[i, "checkpoint"] = str(local)
    return trials


def remove_checkpoints(trial_dir: str) -> int:
    """Delete a trial's checkpoint directories (Tune's ``checkpoint_NNNNNN``), in the store or a
    local directory; the bytes freed."""
    import pyarrow.fs

    fs, path = filesystem(trial_dir)
    freed = 0
    for d in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
        if d.type == pyarrow.fs.FileType.Directory and d.base_name.startswith("checkpoint_"):
            freed += sum(f.size or 0 for f in fs.get_file_info(pyarrow.fs.FileSelector(d.path, recursive=True))
                         if f.type == pyarrow.fs.FileType.File)
            fs.delete_dir(d.path)
    return freed


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
