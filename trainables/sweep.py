"""Trained dense model x (method, ratio[, int8]) -> one pandas row per point.

For every point: prune a copy of the trained weights, evaluate it without retraining
(``accuracy`` on the validation split, ``test_accuracy`` on the test split), optionally
fine-tune it with its mask fixed and evaluate again, bake the mask in, and measure what
would ship: sparsity, nonzero parameters, compressed size, MACs and CPU batch-1 latency
(plus GPU batched throughput on CUDA). With ``int8`` every point is measured a second time
with post-training static INT8 on top.

Latency is a property of the architecture, not of the weights (DESIGN.md), so it is measured
once per :func:`trainables.compress.architecture_signature` and cached in ``latency_cache``;
pass one dict to several sweeps (trials) and they share their measurements. Unstructured
masks keep the dense architecture, so they get the dense latency: ``experiments/bench_sweep.py``
measures each ratio separately to show that this is what the hardware does.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, MutableMapping

import pandas as pd
import torch.nn as nn

from trainables import compress, measure
from trainables.data import Split, Splits, normalize
from trainables.names import SWEEP_TABLE
from trainables.train import TrainConfig, evaluate, make_optimizer, make_scheduler, train_one_epoch


@dataclass
class SweepConfig:
    """The ``[sweep]`` section of an experiment file."""

    methods: list[str] = field(default_factory=lambda: ["global_l1"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    int8: bool = False  # also measure every point with INT8 on top
    finetune_epochs: int = 0  # fine-tune each pruned model (mask fixed) before measuring
    finetune_lr: float = 0.001
    eval_size: int = 0  # evaluate on at most this many validation / test images; 0 = all
    latency_threads: int = 1
    latency_runs: int = 50
    latency_warmup: int = 10
    calibration_size: int = 256  # training images used to calibrate INT8
    seed: int = 0  # global_random's masks


# Column order of the sweep table; metric names as in DESIGN.md.
COLUMNS = [
    "method", "ratio", "int8", "accuracy", "test_accuracy", "accuracy_no_finetune",
    "test_accuracy_no_finetune", "sparsity", "nonzero_params", "size_mb", "macs", "latency_ms",
    "latency_p90_ms", "latency_cv", "latency_speedup", "throughput_ips", "arch", "cpu", "threads",
]


def table_to_json(df: pd.DataFrame) -> str:
    """The sweep table as a trial's final report carries it (under ``names.SWEEP_TABLE``):
    JSON records, one per point. Read it back with :func:`table_from_report`."""
    return df.to_json(orient="records")


def table_from_report(report: Mapping[str, Any]) -> pd.DataFrame | None:
    """The sweep table in a trial's report, or None when it has none (an epoch report, a
    diverged trial). ``json.loads`` keeps every value's JSON type, so a hash like ``arch`` stays
    a string where ``pd.read_json`` may turn an all-digit one into a number."""
    text = report.get(SWEEP_TABLE)
    if not isinstance(text, str) or not text:
        return None
    return pd.DataFrame.from_records(json.loads(text))


def finetune(model: nn.Module, split: Split, cfg: TrainConfig, epochs: int, lr: float) -> nn.Module:
    """Fine-tune a pruned copy for ``epochs`` with a cosine schedule.

    Unstructured masks stay fixed: torch's prune reparametrisation multiplies ``weight_orig``
    by the mask in every forward, so pruned weights stay exactly zero (their gradient is zero
    and they are recomputed from the mask).
    """
    model = compress.clone(model).to(split.x.device)
    ft = dataclasses.replace(cfg, epochs=epochs, lr=lr, schedule="cosine", optimizer="sgd")
    opt = make_optimizer(model, ft)
    sched = make_scheduler(opt, ft, max(1, len(split) // ft.batch_size))
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, split, opt, sched, ft, 10_000 + epoch)
    return model.eval()


def _head(split: Split, n: int) -> Split:
    return split if n <= 0 else Split(split.x[:n], split.y[:n])


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="sweep", unit="point", file=sys.stderr, disable=not enabled, leave=False)


def run_sweep(
    model: nn.Module,
    splits: Splits,
    cfg: SweepConfig,
    train_cfg: TrainConfig | None = None,
    *,
    latency_cache: MutableMapping[str, dict[str, Any]] | None = None,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Sweep ``cfg.methods`` x ``cfg.ratios`` (x INT8) over a trained dense ``model``.

    ``splits`` should be on the training device; evaluation stays there (INT8 models run on
    the CPU). ``train_cfg`` is the recipe used for fine-tuning (batch size, seed, ...).
    Returns one row per point with the columns of :data:`COLUMNS`.
    """
    for m in cfg.methods:  # fail before any work
        compress.check_method(m)
    for r in cfg.ratios:
        compress.check_ratio(r)
    sweeper = _Sweeper(model, splits, cfg, train_cfg or TrainConfig(), {} if latency_cache is None else latency_cache)
    rows: list[dict[str, Any]] = []
    with _progress(len(cfg.methods) * len(cfg.ratios) * (2 if cfg.int8 else 1), progress) as bar:
        for method in cfg.methods:
            for ratio in cfg.ratios:
                for point in sweeper.points(method, ratio):
                    rows.append(point)
                    if on_point is not None:
                        on_point(point)
                    bar.update()
                    bar.set_postfix(method=method, ratio=ratio, acc=f"{point['accuracy']:.3f}")
    df = pd.DataFrame(rows)
    df["latency_speedup"] = sweeper.latency(compress.make_permanent(model).cpu())["latency_ms"] / df.latency_ms
    return df.reindex(columns=COLUMNS)


class _Sweeper:
    """What every point of one sweep shares: the trained model, the evaluation splits (on the
    training device, and on the CPU for INT8), the calibration images, the latency cache."""

    def __init__(self, model: nn.Module, splits: Splits, cfg: SweepConfig, train_cfg: TrainConfig,
                 cache: MutableMapping[str, dict[str, Any]]) -> None:
        self.model, self.train, self.cfg, self.train_cfg, self.cache = model, splits.train, cfg, train_cfg, cache
        self.val, self.test = _head(splits.val, cfg.eval_size), _head(splits.test, cfg.eval_size)
        self.val_cpu, self.test_cpu = self.val.to("cpu"), self.test.to("cpu")
        self.calibration = normalize(splits.train.x[: cfg.calibration_size].cpu())
        self.dense_accuracy = self.accuracy(model)  # the dense model, once

    def points(self, method: str, ratio: float) -> list[dict[str, Any]]:
        """The point (method, ratio): pruned, evaluated, fine-tuned if asked, made permanent and
        measured; and the same with INT8 on top when the sweep measures INT8."""
        cfg = self.cfg
        pruned = compress.prune(self.model, method, ratio, seed=cfg.seed)
        acc = self.dense_accuracy if ratio == 0.0 else self.accuracy(pruned)
        row: dict[str, Any] = {"method": method, "ratio": ratio}
        if cfg.finetune_epochs > 0 and ratio > 0.0:
            row["accuracy_no_finetune"], row["test_accuracy_no_finetune"] = acc
            pruned = finetune(pruned, self.train, self.train_cfg, cfg.finetune_epochs, cfg.finetune_lr)
            acc = self.accuracy(pruned)
        shipped = compress.make_permanent(pruned).cpu().eval()
        variants = [(False, shipped, acc)]
        if cfg.int8:
            q = compress.quantize_int8(shipped, self.calibration)
            variants.append((True, q, self.accuracy(q, cpu=True)))
        return [self.describe(m, **row, int8=int8, accuracy=a, test_accuracy=ta) for int8, m, (a, ta) in variants]

    def accuracy(self, m: nn.Module, cpu: bool = False) -> tuple[float, float]:
        """(validation, test) top-1 accuracy; ``cpu`` for INT8 models."""
        val, test = (self.val_cpu, self.test_cpu) if cpu else (self.val, self.test)
        bs = self.train_cfg.eval_batch_size
        return evaluate(m, val, bs), evaluate(m, test, bs)

    def describe(self, m: nn.Module, **known: Any) -> dict[str, Any]:
        """``known`` plus what ``m`` costs: sparsity, nonzero parameters, size, MACs, latency."""
        row = {**known, "sparsity": measure.sparsity(m), "nonzero_params": measure.nonzero_params(m),
               "size_mb": measure.size_mb(m), "macs": measure.macs(m), **self.latency(m)}
        row.pop("runs", None)
        return row

    def latency(self, m: nn.Module) -> dict[str, Any]:
        """CPU latency (and GPU throughput) of ``m``'s architecture, measured once per signature."""
        key = compress.architecture_signature(m)
        if key not in self.cache:
            cfg = self.cfg
            entry = measure.cpu_latency(m, threads=cfg.latency_threads, runs=cfg.latency_runs, warmup=cfg.latency_warmup)
            entry["throughput_ips"] = measure.gpu_throughput(m)
            self.cache[key] = entry  # a shared cache may keep an earlier trial's entry instead
        return {"arch": key, **self.cache[key]}
