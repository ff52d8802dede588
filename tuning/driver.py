"""The search driver, top to bottom: connect -> check -> run -> collect -> register -> summary.

``prunetune search`` and ``prunetune resume`` are :func:`search` and :func:`resume`. Each step is
one call into the module that owns it:

- connect and check: :mod:`tuning.cluster` (Ray address, connection, shared storage) and
  :mod:`tuning.runs` (the MLflow store), before anything is trained;
- run: :mod:`tuning.tuner` (Ray Tune: one trial trains, sweeps and reports; the searcher of
  :mod:`tuning.space` samples the next), with :mod:`tuning.tracking` mirroring every trial
  into MLflow as it goes;
- collect: :mod:`tuning.results` (every sweep point, the Pareto front, the CSV tables, the plot);
- register: back-fill what an MLflow outage missed, the tables on the parent run, the front's
  models and their aliases (:mod:`tuning.models`);
- summary: the table printed at the end.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from trainables import data, measure
from trainables.model import check_weights_file
from tuning.names import ACCURACY_FLOOR, DENSE_ACCURACY, LOCK_FILE, SPEC_FILE, TRACKING_FILE
from tuning import cluster, jobs, quiet, registry, results, retention, runs, selection, space, tracking, tuner
from tuning.results import SearchResult
from trainables.errors import NotFound, SearchLocked, SpecError
from tuning.spec import Spec, from_dict, new_run_dir

__all__ = ["SearchResult", "search", "resume"]


def search(spec: Spec, address: str | None = None, tracking_uri: str | None = None) -> SearchResult:
    """Run a new search; its directory is ``storage_path/<name>-<time>``."""
    if spec.sweep.int8 and spec.sweep.int8_mode == "qat" and spec.search.finetune_epochs:
        raise SpecError(f"{spec.source}: [sweep] int8_mode = 'qat' is for `prunetune sweep`: a search keeps its "
                        "fine-tuned points' fp32 weights and re-derives their INT8 by calibration (ptq) when it "
                        "registers or exports them; use int8_mode = 'ptq'")
    check_weights_file(spec.model)  # before anything is created
    cluster.check_address(address)
    uri = runs.tracking_uri(tracking_uri)
    runs.check_reachable(uri)  # before any training starts
    cluster.connect(address)
    cluster.check_storage(spec.search.storage_path)
    quiet.check_target(spec.search)
    exp_dir = _new_experiment_dir(spec, uri)
    with _locked(exp_dir):
        return _run(spec, exp_dir, uri, restore=False)


def resume(path: str | Path, address: str | None = None) -> tuple[SearchResult, Spec]:
    """Continue an interrupted search: finished trials stay, unfinished and errored ones
    resume from their checkpoints, the searcher keeps its Optuna study, the runs their MLflow runs."""
    exp_dir, spec, uri = _open_experiment_dir(path)
    check_weights_file(spec.model)  # the trials not started yet begin from it
    with _locked(exp_dir):
        if uri:
            runs.check_reachable(uri)
        cluster.connect(address)
        cluster.check_storage(str(exp_dir.parent))
        quiet.check_target(spec.search)
        print(f"resuming search {spec.name} from {exp_dir}", flush=True)
        return _run(spec, exp_dir, uri, restore=True), spec


def _run(spec: Spec, exp_dir: Path, uri: str, restore: bool) -> SearchResult:
    splits = data.load(spec.data)  # once: the trials get it through the object store, registering reuses it
    # a restored Tuner brings back its own copy of the tracker, which logs the trials it resumes;
    # this one finds the same runs by tag and does the after-search part
    tracker = tracking.MlflowTracking(uri, spec.to_dict(), exp_dir) if uri else None
    with tuner.latency_cache():
        if restore:
            grid = tuner.restore(exp_dir, spec, splits).fit()
        else:
            grid = tuner.create(spec, exp_dir, splits, callbacks=[tracker] if tracker else []).fit()
    space.fail_orphans(spec, exp_dir)
    rules = selection.rules_for(spec, splits.num_classes)
    res = results.collect(spec, exp_dir, grid, rules)
    if len(res.front):  # the trials' latencies are provisional: time the front quietly, recompute it
        res = quiet.remeasure(res, spec, _held_out(spec, splits))
        print(quiet.summary(res), flush=True)
    results.plot_front(res, spec.search.objectives)
    if tracker is not None:
        _register(tracker, res, grid, spec, splits)
    retention.apply(spec, res, tracker)  # the front is final: [search] keep_checkpoints
    results.print_summary(res, spec)
    if rules.budgeted and len(res.front) and "pick" not in res.aliases:
        print(selection.closest(selection.candidates(res.points, rules), rules, res.dense_accuracy), flush=True)
    return res


def _held_out(spec: Spec, splits: data.Splits) -> data.Split:
    """The test images every deployable point was measured on (the sweep's ``eval_size`` first ones)."""
    n = spec.sweep.eval_size or len(splits.test)
    return splits.test.head(n)


def _register(tracker: tracking.MlflowTracking, res: SearchResult, grid, spec: Spec, splits: data.Splits) -> bool:
    """MLflow after the search: back-fill the trial runs an outage missed, the tables on the
    parent run, the front's models with their aliases. If MLflow still fails, warn and return
    False: every result stays on disk and ``prunetune resume`` logs it later."""
    try:
        filled = tracker.backfill(grid)
        if filled:
            print(f"MLflow: back-filled {len(filled)} trial run(s) missed while the server was away: "
                  f"{', '.join(filled)}", flush=True)
        tracker.log_search(res.files(), res.hypervolume, {ACCURACY_FLOOR: res.rules.floor,
                                                           DENSE_ACCURACY: res.dense_accuracy})
        if len(res.front) and spec.search.register_models:  # any number of objectives
            aliases = registry.register_front(tracker.uri, tracker.parent_id, res.front, res.aliases,
                                              res.checkpoints(), tracker.runs, spec, splits)
            print(f"registered model {spec.name!r}: " + ", ".join(f"{a} -> version {v}" for a, v in aliases.items()),
                  flush=True)
        tracker.end()
        print(runs.where_to_look(tracker.uri, tracker.experiment_id), flush=True)
        return True
    except Exception as e:
        print(f"prunetune: warning: MLflow logging after the search failed ({type(e).__name__}: "
              f"{runs.first_line(e)[:200]}); every result is in {res.path}. When {tracker.uri} answers again, "
              f"`prunetune resume {res.path}` logs the missing runs, the tables and the registered models",
              file=sys.stderr, flush=True)
        return False


def _new_experiment_dir(spec: Spec, uri: str) -> Path:
    """``storage_path/<name>-<time>`` with the spec and the tracking URI that resume reads back."""
    name = jobs.chosen_dir_name() or spec.run_name()
    exp_dir = new_run_dir(spec.search.storage_path, name)
    (exp_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    (exp_dir / TRACKING_FILE).write_text(uri)
    q = spec.search
    trials = f"grid over lr {q.grid_lrs}" if q.sampler == "grid" else f"{q.num_samples} trials, sampler {q.sampler}"
    print(f"search {spec.name}: {trials}, objectives {', '.join(map(str, q.objectives))}, own points drawn from "
          f"{', '.join(space.own_methods(spec))}{' (+ INT8)' if spec.sweep.int8 else ''}; experiment dir "
          f"{exp_dir} (resume with `prunetune resume {exp_dir}`)", flush=True)
    print(f"tracking: MLflow at {uri} (experiment {spec.name!r}); this machine: {measure.cpu_name()} "
          f"[{measure.cpu_flags() or 'no avx2'}]", flush=True)
    return exp_dir


@contextlib.contextmanager
def _locked(exp_dir: Path) -> Iterator[None]:
    """Hold the search directory for this process. A second search or resume of it while this
    one lives is refused, naming this one's pid and host; the lock goes with this process
    however it ends (``flock``), so a killed search leaves none behind."""
    fd = os.open(exp_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SearchLocked(f"{exp_dir} is in use by a live search ({owner}); let it finish or stop it, then "
                           f"`prunetune resume {exp_dir}`") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    try:
        yield
    finally:
        os.close(fd)


def _open_experiment_dir(path: str | Path) -> tuple[Path, Spec, str]:
    """The directory of an earlier search: its spec and its tracking URI ("" if it had none)."""
    exp_dir = Path(path).resolve()
    spec_file = exp_dir / SPEC_FILE
    if not spec_file.is_file():
        raise NotFound(f"{exp_dir} is not a prunetune search directory (no {SPEC_FILE}); "
                                "pass the directory `prunetune search` printed")
    spec = from_dict(json.loads(spec_file.read_text()), source=str(spec_file))
    uri = (exp_dir / TRACKING_FILE).read_text().strip() if (exp_dir / TRACKING_FILE).is_file() else ""
    return exp_dir, spec, uri
