"""Experiment files (TOML) -> a validated :class:`Spec`.

An experiment file has a top-level ``name`` and one table per section (``[data]``,
``[train]``, ``[sweep]``). Every key has a default, so a file only states what it changes.
Unknown keys, wrong types and values outside a fixed set are :class:`SpecError` s that name
the file, the key, what was found and what is allowed.

``--set section.key=value`` overrides are applied to the raw TOML before validation, so
they get exactly the same checks; ``value`` is parsed as a TOML value (``0.1``, ``true``,
``["a", "b"]``) and taken as a plain string when it is not one (``--set data.dataset=npz``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from trainables.data import DataConfig
from trainables.model import ModelConfig, is_weights_file
from trainables.errors import SpecError
from trainables.sweep import SweepConfig
from trainables.train import TrainConfig
from tuning import _checks, storage, studies
from tuning.front import Limit
from tuning.pareto import Objective

__all__ = ["Spec", "SpecError", "load", "from_dict", "replace", "parse_override", "parse_ratios"]


@dataclass
class SearchConfig:
    """The ``[search]`` section: what Optuna searches, how Ray runs the trials."""

    num_samples: int = 4  # trained trials
    lr_min: float = 1e-3  # lr is searched log-uniformly in [lr_min, lr_max]
    lr_max: float = 1e-1
    ratio_min: float = 0.0  # prune_ratio is searched uniformly in [ratio_min, ratio_max]
    ratio_max: float = 0.8
    search_method: bool = True  # search the method among [sweep] methods (else always the first)
    # written ["accuracy:max", "latency_ms:min"] in a file; parsed on load
    objectives: list[Objective] = field(default_factory=lambda: [Objective("accuracy", "max"),
                                                                 Objective("latency_ms", "min")])
    sampler: Literal["gp", "tpe", "nsga2", "random", "grid"] = "gp"  # gp by measurement; grid: grid_lrs x ratios
    grid_lrs: list[float] = field(default_factory=list)
    seed: int = 0
    finetune_epochs: int = 2  # the trial's own point: pruned, then fine-tuned (distilled) this many epochs; 0 = off
    sweep_feedback: bool = True  # sweep points a trial measured like its objective become completed Optuna trials
    feedback_curve: bool = False  # also the no-retrain curve, told as if fine-tuned (more evidence early, biased)
    asha: bool = False  # early-stop trials on val_accuracy during training
    # early-stop trials by their predicted deployable point at rungs 1, eta, eta^2... (tuning/stopping.py)
    early_stop: Literal["none", "pareto"] = "none"
    early_stop_eta: int = 2
    early_stop_margin: float = 0.02  # accuracy another trial's point at the rung must lead by, at no more latency
    # the stop rule (0: none): wall-clock minutes, trial-epochs, or no hypervolume gain above
    # stop_tolerance (relative) over the last stop_patience completed trials
    stop_after_minutes: float = 0.0
    stop_after_epochs: int = 0
    stop_patience: int = 0
    stop_tolerance: float = 0.01
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractional: 0.25 -> four trials share a GPU
    max_concurrent_trials: int = 0  # 0 = as many as resources allow
    max_failures: int = 2  # retries of a trial whose worker died
    # what may be shipped and which to pick (tuning/front.py): a floor on validation accuracy
    # (< 0: twice chance, 2 / classes) and two budgets (inf: none); the drop is against the best
    # equal-compute dense point of the search, 0-1 (0.01 = one point)
    min_accuracy: float = -1.0
    max_latency_ms: float = math.inf
    max_accuracy_drop: float = math.inf
    # budgets on any point metric: "size_mb<=5" (at most), "throughput_ips>=1000" (at least)
    limits: list[Limit] = field(default_factory=list)
    register_models: int = 6  # Pareto models registered in MLflow (the aliased ones at least); 0 = none
    # Ray results, checkpoints and the Optuna study; on a cluster of several machines a path
    # every node sees (a shared filesystem). Default: $PRUNETUNE_STORAGE_PATH (the containers
    # set it), else ./ray_results.
    storage_path: str = field(default_factory=lambda: os.environ.get("PRUNETUNE_STORAGE_PATH") or "ray_results")
    # the Optuna study's database, an Optuna storage URL (postgresql://optuna@db:5432/optuna); needed when
    # storage_path is an object store. Default: $PRUNETUNE_STUDY_STORAGE, else "": optuna.db in the
    # experiment directory. Recorded and printed without its password (tuning/studies.py)
    study_storage: str = field(default_factory=lambda: os.environ.get("PRUNETUNE_STUDY_STORAGE", ""))
    # once the front is final: "front" keeps (and logs to MLflow) only the checkpoints of trials with a
    # point on the front and deletes the others from storage_path; "all" keeps and logs every trial's
    keep_checkpoints: Literal["front", "all"] = "front"
    # a Ray custom resource naming the nodes that stand for the hardware you deploy on: the quiet
    # re-measurement and the artifact checks run on one of them ("": the node with the most CPUs)
    latency_target: str = ""
    # the hypervolume's reference point, one value per objective (a point worse than it adds nothing);
    # empty: 0 for a max objective, tuning.pareto.MIN_REFERENCE for a min one. Fixed by the file, so
    # the hypervolumes of two searches of one file compare
    hypervolume_reference: list[float] = field(default_factory=list)


@dataclass
class Spec:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    source: str = "<dict>"  # the file it came from, for messages
    # what the file and its overrides stated ("section.key"; the rest are defaults), and which of the
    # path keys were relative before they were resolved against the working directory: a submitted
    # job resolves them elsewhere (prunetune submit refuses them)
    given: frozenset[str] = frozenset()
    relative: frozenset[str] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (TOML/JSON-able), the inverse of :func:`from_dict` but for one secret: what records
        a spec writes this (the search's directory, MLflow, checkpoints), so ``study_storage`` loses
        its password here (a resumed search takes it from the environment: :mod:`tuning.studies`)."""
        d = dataclasses.asdict(self)
        for key in ("source", "given", "relative"):
            d.pop(key)
        d["search"]["study_storage"] = studies.public(self.search.study_storage)
        d["search"]["objectives"] = [str(o) for o in self.search.objectives]
        d["search"]["limits"] = [str(limit) for limit in self.search.limits]
        return d

    def run_name(self) -> str:
        """The directory name of one search of this spec: ``<name>-<run_stamp()>``."""
        return f"{self.name}-{run_stamp()}"


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sweep": SweepConfig,
                              "search": SearchConfig}
_ROOT_KEYS = {"name"}
# Number keys where inf means "none" (a budget); every other number must be finite, and no number NaN.
_INF_ALLOWED = {"max_latency_ms", "max_accuracy_drop"}
# Keys holding filesystem paths: relative ones are resolved against the working directory
# at load time, so Ray workers (which run elsewhere) get absolute paths.
_PATH_KEYS = {("data", "path"), ("data", "root"), ("train", "output_dir"), ("search", "storage_path")}


# Values written as strings in a file and parsed on load (``parse``; ``str()`` writes them back).
_PARSED = {Objective: "'METRIC:max|min'", Limit: "'METRIC<=NUMBER' or 'METRIC>=NUMBER'"}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        item = get_args(tp)[0]
        return "a list of " + (f"{_PARSED[item]} strings" if item in _PARSED else item.__name__)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp) or \
        f"a {_PARSED[tp]} string"


def _check_value(where: str, tp: Any, value: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise a SpecError naming ``where``."""
    ok: bool
    if get_origin(tp) is Literal:
        ok = value in get_args(tp)
    elif get_origin(tp) is list:
        (item,) = get_args(tp)
        if isinstance(value, list):
            return [_check_value(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
        ok = False
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value) and not (value == math.inf and where.rsplit(" ", 1)[-1] in _INF_ALLOWED):
            raise SpecError(f"{where} must be a finite number, got {value}" +
                            (" (inf is allowed for the budgets only: max_latency_ms, max_accuracy_drop)"
                             if value == math.inf else ""))
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in _PARSED:
        ok = isinstance(value, str)
        if ok:
            try:
                return tp.parse(value)
            except ValueError as e:
                raise SpecError(f"{where}: {e}") from None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise SpecError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build_section(source: str, section: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: [{section}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise SpecError(
                f"{source}: unknown key '{key}' in [{section}]; allowed keys: {', '.join(allowed)}"
            )
        values[key] = _check_value(f"{source}: [{section}] {key}", hints[key], value)
    return cls(**values)


def run_stamp() -> str:
    """A name for one run's directory, unique even for runs started in the same second:
    ``YYYYmmdd-HHMMSS-xxxxxx`` (6 random hex digits)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def new_run_dir(parent: str | Path, name: str) -> Path:
    """Create ``parent/name`` and return it; refuses one that exists (another run's)."""
    path = Path(parent) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise SpecError(f"{path} already exists: another run started there; start again") from None
    return path


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Spec:
    """Validate a raw (parsed TOML) dict into a Spec."""
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _build_section(source, key, _SECTIONS[key], value)
        elif key in _ROOT_KEYS:
            kwargs[key] = _check_value(f"{source}: {key}", str, value)
        else:
            allowed = sorted(_ROOT_KEYS) + [f"[{s}]" for s in _SECTIONS]
            raise SpecError(f"{source}: unknown top-level key '{key}'; allowed: {', '.join(allowed)}")
    given = frozenset(f"{s}.{k}" for s, table in raw.items() if s in _SECTIONS and isinstance(table, dict)
                      for k in table)
    spec = Spec(source=source, given=given, **kwargs)
    relative = set()
    for section, key in _PATH_KEYS | ({("model", "weights")} if is_weights_file(spec.model.weights) else set()):
        sec, value = getattr(spec, section), getattr(getattr(spec, section), key)
        if value and not storage.is_remote(value):  # URIs (s3://...) stay as they are
            if not Path(value).expanduser().is_absolute():
                relative.add(f"{section}.{key}")
            setattr(sec, key, str(Path(value).expanduser().resolve()))
    spec.relative = frozenset(relative)
    spec.search.study_storage = studies.absolute(spec.search.study_storage)
    _checks.validate(spec)
    return spec


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set expects section.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip().split("."), parsed


def parse_ratios(text: str) -> list[float]:
    """``"0:0.8:0.05"`` (start:stop:step, stop included) or ``"0,0.3,0.5"`` -> sorted floats
    (``prunetune sweep --ratios``); the values are checked with the rest of the spec."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step))
            values = [round(start + i * step, 6) for i in range(n + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"--ratios {text!r}: use start:stop:step (e.g. 0:0.8:0.05) or a list (0,0.3,0.5)") from None
    return sorted(set(values))


def _set(raw: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{where}: '{part}' is not a section")
    node[path[-1]] = value


def replace(spec: Spec, values: dict[str, Any], source: str) -> Spec:
    """``spec`` with ``{"section.key": value}`` set, validated exactly like a file; ``source``
    names where the values came from (e.g. a command's options) in errors."""
    raw = spec.to_dict()
    raw["search"]["study_storage"] = spec.search.study_storage  # with its password, unlike a record
    for key, value in values.items():
        _set(raw, key.split("."), value, source)
    return from_dict(raw, source=source)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read an experiment file, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"experiment file {path} not found; see experiments/*.toml for examples")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    raw.setdefault("name", path.stem)
    for text in overrides:
        _set(raw, *parse_override(text), where=f"--set {text}")
    return from_dict(raw, source=str(path))
