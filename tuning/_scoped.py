"""Settings a search needs for its own duration, put back when it ends.

A search run from a notebook or a script must leave the caller's process as it found it:
the environment variables Tune and MLflow's client read, and MLflow's tracking URI, are set
for the block and restored after it, however it ends.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def environment(values: Mapping[str, str], override: Mapping[str, str] | None = None) -> Iterator[None]:
    """``values`` set where the caller has not set them, ``override`` set whatever the caller has,
    for the block; then every variable as it was."""
    names = [*values, *(override or {})]
    before = {k: os.environ.get(k) for k in names}
    os.environ.update({k: v for k, v in values.items() if k not in os.environ})
    os.environ.update(override or {})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``log_model``) on ``uri`` for the block; the
    caller's tracking URI (or none) after it."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
