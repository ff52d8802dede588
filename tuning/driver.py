"""The search driver, top to bottom: connect -> check -> run -> the front -> register -> summary.

``prunetune search`` and ``prunetune resume`` are :func:`search` and :func:`resume` (also
``tuning.search`` / ``tuning.resume`` from Python). Each step is one call into the module that
owns it:

- connect and check: :mod:`tuning.cluster` (Ray address, connection, shared storage) and
  :mod:`tuning.runs` (the MLflow store), before anything is trained;
- run: :mod:`tuning.tuner` (Ray Tune: one trial trains, sweeps and reports; the searcher of
  :mod:`tuning.space` samples the next), with :mod:`tuning.tracking` mirroring every trial
  into MLflow as it goes;
- the front: :mod:`tuning.results` collects every sweep point, :mod:`tuning.front` computes the
  front once, :mod:`tuning.quiet` times its artifacts quietly (a new front from those figures),
  and the tables and the plot are written from the final one;
- register: back-fill what an MLflow outage missed, the tables on the parent run, the front's
  models and their aliases (:mod:`tuning.registry`); keep the checkpoints it needs
  (:mod:`tuning.retention`);
- summary: the table printed at the end.

The caller's environment is left as it was (:mod:`tuning._scoped`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from trainables import data, measure
from trainables.errors import NotFound, SearchLocked, SpecError
from trainables.model import check_weights_file
from tuning import _scoped, cluster, jobs, quiet, results, retention, runs, space, storage, studies, tracking, tuner
from tuning import front as front_mod
from tuning.names import LOCK_FILE, SPEC_FILE, TRACKING_FILE
from tuning.results import SearchResult
from tuning.spec import Spec, from_dict, new_run_dir

__all__ = ["SearchResult", "search", "resume"]


def search(spec: Spec, address: str | None = None, tracking_uri: str | None = None) -> SearchResult:
    """Run a new search; its directory is ``storage_path/<name>-<time>``."""
    if spec.sweep.int8 and spec.sweep.int8_mode == "qat" and spec.search.finetune_epochs:
        raise SpecError(f"{spec.source}: [sweep] int8_mode = 'qat' is for `prunetune sweep`: a search keeps its "
                        "fine-tuned points' fp32 weights and re-derives their INT8 by calibration (ptq) when it "
                        "registers or exports them; use int8_mode = 'ptq'")
    check_weights_file(spec.model)  # before anything is created
    uri = runs.tracking_uri(tracking_uri)
    with _scoped.environment({**cluster.TUNE_ENV, **runs.CLIENT_ENV}):
        studies.check(spec)  # before any training starts
        if storage.is_remote(spec.search.storage_path):  # the endpoint, the bucket, the credentials, before Ray
            storage.probe(spec.search.storage_path)
        runs.check_reachable(uri)
        cluster.check_address(address)
        cluster.connect(address)
        cluster.check_storage(spec.search.storage_path)
        cluster.check_target(spec.search)
        slots = cluster.slots(spec.search)
        # storage_path/<name>-<time>, with the spec and the tracking URI that resume reads back
        exp_dir = new_run_dir(storage.local_parent(spec.search.storage_path), jobs.chosen_dir_name() or spec.run_name())
        (exp_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
        (exp_dir / TRACKING_FILE).write_text(uri)
        where = storage.location(spec.search.storage_path, exp_dir)
        if storage.is_remote(where):
            storage.push(exp_dir, where)
        q = spec.search
        trials = f"grid over lr {q.grid_lrs}" if q.sampler == "grid" else f"{q.num_samples} trials, sampler {q.sampler}"
        print(f"search {spec.name}: {trials}, objectives {', '.join(map(str, q.objectives))}; experiment dir "
              f"{where} (resume with `prunetune resume {where}`)\ntracking: MLflow at {uri} (experiment "
              f"{spec.name!r}); this machine: {measure.cpu_name()} [{measure.cpu_flags() or 'no avx2'}]", flush=True)
        if q.study_storage and q.sampler != "grid":
            print(f"study: Optuna study {studies.name(spec, exp_dir)!r} in {studies.public(q.study_storage)}",
                  flush=True)
        with _locked(exp_dir):
            return _run(spec, exp_dir, uri, slots, restore=False)


def resume(path: str | Path, address: str | None = None) -> SearchResult:
    """Continue an interrupted search: finished trials stay, unfinished and errored ones
    resume from their checkpoints, the searcher keeps its Optuna study, the runs their MLflow runs."""
    exp_dir, spec, uri = _open_experiment_dir(path)
    check_weights_file(spec.model)  # the trials not started yet begin from it
    with _scoped.environment({**cluster.TUNE_ENV, **runs.CLIENT_ENV}), _locked(exp_dir):
        studies.check(spec)
        if uri:
            runs.check_reachable(uri)
        cluster.connect(address)
        cluster.check_storage(spec.search.storage_path if storage.is_remote(spec.search.storage_path)
                              else str(exp_dir.parent))
        cluster.check_target(spec.search)
        slots = cluster.slots(spec.search)
        print(f"resuming search {spec.name} from {storage.location(spec.search.storage_path, exp_dir)}", flush=True)
        return _run(spec, exp_dir, uri, slots, restore=True)


def _run(spec: Spec, exp_dir: Path, uri: str, slots: int, restore: bool) -> SearchResult:
    splits = data.load(spec.data)  # once: the trials get it through the object store, registering reuses it
    held_out = splits.test.head(spec.sweep.eval_size or len(splits.test))  # what every point was measured on
    # a restored Tuner brings back its own copy of the tracker, which logs the trials it resumes;
    # this one finds the same runs by tag and does the after-search part
    where = storage.location(spec.search.storage_path, exp_dir)
    tracker = tracking.MlflowTracking(uri, spec.to_dict(), where) if uri else None
    # with a searcher Tune keeps one trial pending at a time, so trials start one worker start-up
    # after another; let as many wait as can run at once (more would be sampled blind)
    pending = {"TUNE_MAX_PENDING_TRIALS_PG": str(slots)}
    sampling = space.sampling(spec, exp_dir, restore)
    print(f"search {spec.name}: own points drawn from {', '.join(sampling.methods)}"
          f"{' (+ INT8)' if spec.sweep.int8 else ''}", flush=True)
    with _scoped.environment({}, override=pending), tuner.latency_cache():
        grid = (tuner.restore(exp_dir, spec, splits, sampling) if restore else
                tuner.create(spec, exp_dir, splits, sampling, callbacks=[tracker] if tracker else [])).fit()
    study = space.end_study(spec, exp_dir)
    trials, points = results.collect(grid)
    front = front_mod.for_search(points, spec.search, splits.num_classes)
    if storage.is_remote(where):  # the checkpoints the driver reads, from the object store
        wanted = set(front.shippable.trial_id) if len(front) else set()
        if spec.search.keep_checkpoints == "all":
            wanted |= set(trials.trial_id)
        trials = storage.localize(trials, exp_dir, where.partition("://")[0], wanted)
    if len(front):  # the trials' latencies are provisional: time the front quietly, the front of those figures
        points = quiet.remeasure(front.points, front.shippable.index, front.with_points, exp_dir,
                                 results.checkpoints(trials), spec, held_out)
        front = front.with_points(points)
        print(quiet.summary(front.rows), flush=True)
    res = SearchResult(exp_dir, trials, front, grid, study, spec)
    results.write(res)
    if tracker is not None:
        tracker.finish(res, splits)
    retention.apply(spec, res, tracker)  # the front is final: [search] keep_checkpoints
    remote = storage.is_remote(where)
    if remote:
        storage.push(exp_dir, where)  # the tables, the plot, the quiet latencies
    print(results.summary(res, where if remote else None), flush=True)
    if front.rules.budgeted and len(front) and not front.feasible:
        print(front_mod.closest(front.shippable, front.rules, front.dense_accuracy), flush=True)
    return res


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
    """The directory of an earlier search: its spec and its tracking URI ("" if it had none). An
    object-store search's (its URI, or this machine's copy of it) is brought up to date from the
    store first."""
    if storage.is_remote(str(path)):
        storage.probe(str(path).rstrip("/").rpartition("/")[0])
        exp_dir = storage.work_dir(str(path))
        storage.pull(str(path), exp_dir)
    else:
        exp_dir = Path(path).resolve()
    spec_file = exp_dir / SPEC_FILE
    if not spec_file.is_file():
        raise NotFound(f"{exp_dir} is not a prunetune search directory (no {SPEC_FILE}); "
                                "pass the directory `prunetune search` printed")
    raw = json.loads(spec_file.read_text())
    # the study where the search left it (a spec recorded before [search] study_storage: its optuna.db),
    # the password, never recorded, from the environment
    search = raw.setdefault("search", {})
    search["study_storage"] = studies.with_password(search.get("study_storage", ""))
    spec = from_dict(raw, source=str(spec_file))
    if not storage.is_remote(str(path)) and storage.is_remote(spec.search.storage_path):
        storage.pull(storage.location(spec.search.storage_path, exp_dir), exp_dir)
    uri = (exp_dir / TRACKING_FILE).read_text().strip() if (exp_dir / TRACKING_FILE).is_file() else ""
    return exp_dir, spec, uri
