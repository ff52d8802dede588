"""Ray Tune's part of a search: the trainable with its resources, and the Tuner, new or restored.

- One trial is :func:`trainables.trainable.train_and_sweep` with ``{cpu, gpu}`` from
  ``[search] cpus_per_trial`` / ``gpus_per_trial`` (fractional GPUs allowed); the dataset goes
  into the object store once, with the trainable.
- The param space and searcher come from :mod:`tuning.space` (:class:`~tuning.space.Sampling`); ``asha = true`` adds early
  stopping on ``val_accuracy``; ``FailureConfig(max_failures)`` retries a trial from its last
  checkpoint; one checkpoint is kept per trial; the progress table shows the objectives.
- :func:`latency_cache`: the search's latency-per-architecture table, one actor on the head node.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from ray import tune

from trainables.data import Splits
from trainables.names import PHASE
from tuning import stopping, storage
from tuning.space import Sampling
from tuning.spec import Spec


def create(spec: Spec, exp_dir: Path, splits: Splits, sampling: Sampling, callbacks: list[tune.Callback]) -> tune.Tuner:
    """A new search in ``exp_dir`` (``storage_path/<name>-<time>``; on an object store, Tune's
    experiment and the checkpoints go there, ``exp_dir`` is the driver's copy)."""
    from ray.tune.schedulers import ASHAScheduler

    q = spec.search
    scheduler = None
    if q.asha:
        # max_t one past the last epoch: reaching max_t stops a trial, which must still sweep
        scheduler = ASHAScheduler(metric="val_accuracy", mode="max", time_attr="epoch",
                                  max_t=spec.train.epochs + 1, grace_period=1, reduction_factor=2)
    elif q.early_stop == "pareto":
        remote = storage.location(q.storage_path, exp_dir) if storage.is_remote(q.storage_path) else None
        scheduler = stopping.ParetoStopping(exp_dir, _rungs(spec), q.early_stop_eta, q.early_stop_margin, remote)
    stop = stopping.StopRule(q.stop_after_minutes, q.stop_after_epochs, q.stop_patience, q.stop_tolerance)
    tune_config = tune.TuneConfig(search_alg=sampling.searcher, scheduler=scheduler, num_samples=sampling.num_samples,
                                  max_concurrent_trials=q.max_concurrent_trials or None)
    run_config = tune.RunConfig(
        name=exp_dir.name, storage_path=q.storage_path if storage.is_remote(q.storage_path) else str(exp_dir.parent),
        progress_reporter=_reporter(spec, sampling), verbose=1,
        failure_config=tune.FailureConfig(max_failures=q.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks, stop=stop,
    )
    return tune.Tuner(_trainable(spec, splits, sampling), param_space=sampling.param_space, tune_config=tune_config,
                      run_config=run_config)


def restore(exp_dir: Path, spec: Spec, splits: Splits, sampling: Sampling) -> tune.Tuner:
    """The search in ``exp_dir`` as Tune saved it: finished trials stay, unfinished and errored
    ones continue from their checkpoints, the searcher keeps its study and its callbacks."""
    return tune.Tuner.restore(storage.location(spec.search.storage_path, exp_dir), trainable=_trainable(spec, splits, sampling), resume_unfinished=True,
                              resume_errored=True)


@contextlib.contextmanager
def latency_cache() -> Iterator[Any]:
    """The search's :class:`~trainables.trainable.LatencyCache` actor, alive for the block.
    It lives on the head node: a lost worker node must not take the table with it."""
    from trainables.trainable import LATENCY_CACHE, LatencyCache

    actor = LatencyCache.options(name=LATENCY_CACHE, get_if_exists=True,
                                 resources={"node:__internal_head__": 0.001}).remote()
    try:
        yield actor
    finally:
        del actor  # the last handle: Ray ends the actor


def _trainable(spec: Spec, splits: Splits, sampling: Sampling) -> Any:
    from trainables.trainable import TrialPlan, train_and_sweep

    q = spec.search
    print(f"data: {spec.data.dataset}: train {len(splits.train)} / val {len(splits.val)} / test "
          f"{len(splits.test)} images (put in the object store once)", flush=True)
    plan = TrialPlan(model=spec.model, train=spec.train, sweep=spec.sweep, finetune_epochs=q.finetune_epochs,
                     method=sampling.methods[0], record=spec.to_dict(), rungs=_rungs(spec))
    fn = tune.with_parameters(train_and_sweep, splits=splits, plan=plan)
    return tune.with_resources(fn, {"cpu": q.cpus_per_trial, "gpu": q.gpus_per_trial})


def _rungs(spec: Spec) -> tuple[int, ...]:
    q = spec.search
    return stopping.rungs(spec.train.epochs, q.early_stop_eta) if q.early_stop == "pareto" else ()


def _reporter(spec: Spec, sampling: Sampling) -> tune.ProgressReporter:
    return tune.CLIReporter(
        parameter_columns=sampling.columns,
        metric_columns=[PHASE, "epoch", "val_accuracy", *(o.metric for o in spec.search.objectives)],
        max_report_frequency=30, print_intermediate_tables=True,
    )
