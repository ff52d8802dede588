"""A trial's report, decoded once: what Tune hands the driver -> one :class:`TrialReport`.

A trial reports plain metrics every epoch (``phase = train``) and ends with one report of its
own point's objectives and its whole sweep table (``phase = done``; the table travels in the
metrics as JSON, :data:`trainables.names.SWEEP_TABLE`) or of its divergence. Tune hands those
dicts to the searcher and to the tracking callback while the search runs, and keeps them in
``Result`` s after it. Every driver module reads a trial through this object, made by
:func:`of` (a result dict), :func:`last` (a finished trial) or :func:`history` (every report Tune
kept): the sweep table is decoded here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from trainables.names import ERROR, PHASE, SWEEP_TABLE, TRAIN
from trainables.sweep import table_from_report

UNKNOWN = "unknown"  # a result without a phase (Tune's own, e.g. a trial that never reported)


@dataclass(frozen=True)
class TrialReport:
    """One report of one trial."""

    trial_id: str
    config: dict[str, Any]  # the values the search sampled for it
    phase: str  # trainables.names: train | diverged | done (or unknown)
    metrics: dict[str, Any] = field(default_factory=dict)  # every plain value it reported (NaN left out)
    points: pd.DataFrame | None = None  # a done report's sweep table, one row per point
    error: str | None = None  # why it ended without objectives: a divergence, an exception

    @property
    def epoch(self) -> int | None:
        e = self.metrics.get("epoch")
        return None if e is None else int(e)

    @property
    def timestamp_ms(self) -> int:
        return int(self.metrics.get("timestamp", 0) * 1000)

    @property
    def status(self) -> str:
        """trials.csv's status: error, stopped (ended while training: early-stopped), or the phase."""
        if self.error and self.phase != "diverged":
            return "error"
        return "stopped" if self.phase == TRAIN else self.phase

    def values(self, metrics: Sequence[str]) -> list[float] | None:
        """The objectives' values in ``metrics`` order, or None when one is missing (a diverged or
        early-stopped trial has none)."""
        found = [self.metrics.get(m) for m in metrics]
        return None if any(v is None for v in found) else [float(v) for v in found]


def of(result: Mapping[str, Any], config: Mapping[str, Any] | None = None, error: str | None = None) -> TrialReport:
    """The report in one result dict as Tune passes it (``config``: the trial's, when the dict
    lacks it; a searcher's dict holds it flattened, as ``config/<key>``)."""
    if config is None and "config" not in result:
        config = {k.removeprefix("config/"): v for k, v in result.items() if k.startswith("config/")}
    metrics = {k: v for k, v in result.items()
               if k not in ("config", SWEEP_TABLE) and not (v is None or isinstance(v, float) and math.isnan(v))}
    phase = str(metrics.pop(PHASE, UNKNOWN))
    return TrialReport(trial_id=str(result.get("trial_id", "?")), config=dict(config or result.get("config") or {}),
                       phase=phase, metrics=metrics, points=table_from_report(result),
                       error=error or (str(metrics[ERROR]) if ERROR in metrics else None))


def last(result: Any) -> TrialReport:
    """A finished trial's last report (a ``ray.tune.Result``); an errored trial says why."""
    report = of(result.metrics or {}, result.config, error=str(result.error) if result.error else None)
    if report.trial_id == "?" and result.path:  # a trial that never reported: its directory names it
        report = dataclasses.replace(report, trial_id=Path(result.path).name)
    return report


def history(result: Any) -> list[TrialReport]:
    """Every report of a trial, in order, as Tune kept them (``Result.metrics_dataframe``, read from
    the trial's ``result.json``)."""
    df = result.metrics_dataframe
    if df is None or df.empty:
        return []
    return [of(row, result.config) for row in df.to_dict("records")]
