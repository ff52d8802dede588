"""Ray Tune's part of a search: the trainable with its resources, and the Tuner, new or restored.

- One trial is :func:`trainables.trainable.train_and_sweep` with ``{cpu, gpu}`` from
  ``[search] cpus_per_trial`` / ``gpus_per_trial`` (fractional GPUs allowed); the dataset goes
  into the object store once, with the trainable.
- The param space and searcher come from :mod:`tuning.space`; ``asha = true`` adds early
  stopping on ``val_accuracy``; ``FailureConfig(max_failures)`` retries a trial from its last
  checkpoint; one checkpoint is kept per trial; the progress table shows the objectives.
- :func:`latency_cache`: the search's latency-per-architecture table, one actor on the head node.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from ray import tune

from trainables.data import Splits
from trainables.names import PHASE
from tuning import cluster, space
from tuning.spec import Spec


def create(spec: Spec, exp_dir: Path, splits: Splits, callbacks: list[tune.Callback]) -> tune.Tuner:
    """A new search in ``exp_dir`` (``storage_path/<name>-<time>``)."""
    from ray.tune.schedulers import ASHAScheduler

    q = spec.search
    param_space, searcher, num_samples = space.tune_search(spec, exp_dir)
    scheduler = None
    if q.asha:
        # max_t one past the last epoch: reaching max_t stops a trial, which must still sweep
        scheduler = ASHAScheduler(metric="val_accuracy", mode="max", time_attr="epoch",
                                  max_t=spec.train.epochs + 1, grace_period=1, reduction_factor=2)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=q.max_concurrent_trials or None)
    run_config = tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent), progress_reporter=_reporter(spec), verbose=1,
        failure_config=tune.FailureConfig(max_failures=q.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks,
    )
    return tune.Tuner(_trainable(spec, splits), param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def restore(exp_dir: Path, spec: Spec, splits: Splits) -> tune.Tuner:
    """The search in ``exp_dir`` as Tune saved it: finished trials stay, unfinished and errored
    ones continue from their checkpoints, the searcher keeps its study and its callbacks."""
    return tune.Tuner.restore(str(exp_dir), trainable=_trainable(spec, splits), resume_unfinished=True,
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


def _trainable(spec: Spec, splits: Splits) -> Any:
    from trainables.trainable import TrialPlan, train_and_sweep

    q = spec.search
    # with a searcher Tune keeps one trial pending at a time, so trials start one worker start-up
    # after another; let as many wait as can run at once (more would be sampled blind)
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(cluster.slots(q))
    print(f"data: {spec.data.dataset}: train {len(splits.train)} / val {len(splits.val)} / test "
          f"{len(splits.test)} images (put in the object store once)", flush=True)
    plan = TrialPlan(finetune_epochs=q.finetune_epochs, method=space.own_methods(spec)[0])
    fn = tune.with_parameters(train_and_sweep, splits=splits, spec=spec.to_dict(), plan=plan)
    return tune.with_resources(fn, {"cpu": q.cpus_per_trial, "gpu": q.gpus_per_trial})


def _reporter(spec: Spec) -> tune.ProgressReporter:
    return tune.CLIReporter(
        parameter_columns=list(space.optuna_space(spec)),  # what is sampled (method only when there is a choice)
        metric_columns=[PHASE, "epoch", "val_accuracy", *(o.metric for o in spec.search.objectives)],
        max_report_frequency=30, print_intermediate_tables=True,
    )
