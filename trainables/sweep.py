"""Trained dense model x (method, ratio[, int8]) -> one pandas row per point.

For every point: prune a copy of the trained weights (in the plain layout, whatever the
model trained in) and evaluate it in fp32 as it ships (``accuracy`` on the validation split,
``test_accuracy`` on the test split); with ``finetune_epochs`` fine-tune it first, then bake
the mask in and measure what would ship: sparsity, nonzero parameters, compressed size, MACs
and CPU batch-1 latency (plus GPU batched throughput on CUDA). With ``int8`` every point is
measured a second time with INT8 on top (post-training, or quantization-aware fine-tuning).

Fine-tuning (``finetune_epochs > 0``) keeps unstructured masks and channel counts fixed and,
with ``distill``, learns from the dense model's soft predictions as well as the labels
(knowledge distillation: ``(1 - w) * CE + w * T^2 * KL(teacher_T || student_T)``; the teacher is
the dense model after its own fine-tuning epochs). Accuracy is compared at equal compute: the
dense point (ratio 0) gets the same epochs of plain continued training, so a drop is never the
fine-tuning's extra epochs. ``accuracy_no_finetune`` keeps the before.

Latency is a property of the architecture, not of the weights (DESIGN.md), so it is measured
once per :func:`trainables.compress.architecture_signature` and cached in ``latency_cache``;
pass one dict to several sweeps (trials) and they share their measurements. Unstructured
masks keep the dense architecture, so they get the dense latency: ``experiments/bench_sweep.py``
measures each ratio separately to show that this is what the hardware does.
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, MutableMapping

import pandas as pd
import torch.nn as nn
from tqdm import tqdm

from trainables import compress, measure, ort
from trainables.data import Split, Splits, normalize
from trainables.names import SWEEP_TABLE
from trainables.finetune import distillation_loss, finetune, quantization_aware
from trainables.train import TrainConfig, evaluate, for_training


@dataclass
class SweepConfig:
    """The ``[sweep]`` section of an experiment file."""

    methods: list[str] = field(default_factory=lambda: ["global_l1"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    runtime: Literal["torch", "onnxruntime"] = "torch"  # what latency and accuracy are measured in
    int8: bool = False  # also measure every point with INT8 on top
    int8_mode: Literal["ptq", "qat"] = "ptq"  # qat: fine-tuned points get qat_epochs of quantization-aware training
    qat_epochs: int = 1
    finetune_epochs: int = 0  # fine-tune every point (mask / channels fixed; ratio 0 too, for equal compute)
    finetune_lr: float = 0.01
    distill: bool = True  # pruned points learn from the dense model's soft predictions too
    distill_weight: float = 0.7  # w in (1 - w) * CE + w * T^2 * KL
    distill_temperature: float = 4.0
    round_to: int = compress.ROUND_TO  # channel_l1 keeps channel counts multiples of this
    bn_recalibration: int = 512  # training images a structured-pruned model re-estimates its BatchNorm statistics on; 0 = off
    eval_size: int = 0  # evaluate on at most this many validation / test images; 0 = all
    latency_threads: int = 1
    latency_runs: int = 50
    latency_warmup: int = 10
    calibration_size: int = 256  # training images used to calibrate INT8
    seed: int = 0  # global_random's masks


# Column order of the sweep table; metric names as in DESIGN.md.
COLUMNS = [
    "method", "ratio", "int8", "finetune_epochs", "accuracy", "test_accuracy", "accuracy_no_finetune",
    "test_accuracy_no_finetune", "sparsity", "nonzero_params", "size_mb", "macs", "latency_ms",
    "latency_p90_ms", "latency_cv", "latency_speedup", "throughput_ips", "arch", "cpu", "cpu_flags", "threads",
    "runtime", "runtime_version", "artifact", "artifact_sha256", "test_labels_sha256", "test_images", "error",
]


@functools.cache
def _version(runtime: str) -> str:
    from importlib import metadata

    return metadata.version("onnxruntime" if runtime == "onnxruntime" else "torch").split("+")[0]


def point_key(method: str, ratio: float) -> str:
    """How a point's weights are filed (``names.DEPLOYABLE_FILE``): ``"channel_l1@0.3"``."""
    return f"{method}@{float(ratio):g}"


def table_to_json(df: pd.DataFrame) -> str:
    """The table in a trial's final report (``names.SWEEP_TABLE``); :func:`table_from_report` reads it."""
    return df.to_json(orient="records")


def is_dense(table: pd.DataFrame) -> pd.Series:
    """Rows of the dense fp32 model (ratio 0, no INT8): what speed-ups and accuracy drops are against."""
    return (table["ratio"] == 0.0) & ~table["int8"].astype(bool)


def table_from_report(report: Mapping[str, Any]) -> pd.DataFrame | None:
    """The sweep table in a trial's report, or None when it has none (an epoch report, a
    diverged trial). ``json.loads`` keeps every value's JSON type, so a hash like ``arch`` stays
    a string where ``pd.read_json`` may turn an all-digit one into a number."""
    text = report.get(SWEEP_TABLE)
    if not isinstance(text, str) or not text:
        return None
    return pd.DataFrame.from_records(json.loads(text))


@dataclass
class _Shipped:
    """One variant of a point as it would ship, with its (validation, test) accuracy."""

    int8: bool
    model: nn.Module  # fp32 or torch INT8; sparsity, nonzero parameters and MACs are read off it
    accuracy: tuple[float, float]
    onnx: ort.OrtModel | None = None  # runtime = "onnxruntime": the classifier evaluated, timed, sized and shipped
    labels: str | None = None  # its test labels' digest (ort.labels_digest): what a verification compares


def prune_point(model: nn.Module, method: str, ratio: float, cfg: SweepConfig, train: Split | None) -> nn.Module:
    """``model`` pruned as a sweep prunes a point, before it is judged or fine-tuned: then, for a
    structured method, its BatchNorm statistics re-estimated on the first ``cfg.bn_recalibration``
    of ``train`` (the training split; None: not re-estimated, for weights that bring their own).
    One function, so a point re-derived elsewhere (``tuning.models.derive``) is the model the sweep
    measured."""
    pruned = compress.prune(model, method, ratio, seed=cfg.seed, round_to=cfg.round_to)
    if method in compress.STRUCTURED and ratio > 0.0 and cfg.bn_recalibration and train is not None:
        pruned = compress.recalibrate_bn(pruned, train.normalized(cfg.bn_recalibration))
    return pruned


def artifact_name(method: str, ratio: float, int8: bool) -> str:
    """Where a deployable point's ONNX classifier is filed beside its trial's checkpoint."""
    return f"points/{point_key(method, ratio)}{'-int8' if int8 else ''}.onnx"


class _Sweep:
    """What every point of one sweep shares: the dense model (its evaluation, its fine-tuned
    twin, its role as teacher), the evaluation splits, the calibration images, the latency cache."""

    def __init__(self, model: nn.Module, splits: Splits, cfg: SweepConfig, train_cfg: TrainConfig,
                 cache: MutableMapping[str, dict[str, Any]]) -> None:
        self.model, self.splits, self.cfg, self.train_cfg, self.cache = model, splits, cfg, train_cfg, cache
        self.val, self.test = splits.val.head(cfg.eval_size), splits.test.head(cfg.eval_size)
        self.calibration = normalize(splits.train.x[: cfg.calibration_size].cpu(), *splits.stats)
        self.dense_accuracy = self.accuracy(model)
        self._dense: list[_Shipped] | None = None

    @functools.cached_property
    def _cpu_splits(self) -> tuple[Split, Split]:
        return self.val.to("cpu"), self.test.to("cpu")

    @functools.cached_property
    def _teacher(self) -> nn.Module:
        """The best dense model at hand: with fine-tuning, the dense one after the same epochs
        (a 3-epoch quickstart model distilled into its pruned copies dragged them below their
        no-retrain accuracy; its own continued training had gained 30 points)."""
        dense = self.variants(self.cfg.methods[0], 0.0)[1][0].model if self.cfg.finetune_epochs else self.model
        device = self.splits.train.x.device
        return for_training(compress.clone(dense).to(device), device, self.train_cfg.amp).eval()

    def accuracy(self, m: nn.Module) -> tuple[float, float]:
        """(validation, test) accuracy: torch fp32 on the sweep's device, INT8 on the CPU."""
        val, test = self._cpu_splits if compress.is_quantized(m) else (self.val, self.test)
        bs = self.train_cfg.eval_batch_size
        return evaluate(m, val, bs), evaluate(m, test, bs)

    @staticmethod
    def _latency_key(model: nn.Module, onnx: bool, int8: bool) -> str:
        """The latency cache's key: what determines latency (the architecture) and what times it."""
        return compress.architecture_signature(model) + (f"/onnxruntime{'-int8' if int8 else ''}" if onnx else "")

    def latency(self, shipped: _Shipped) -> dict[str, Any]:
        """Timed once per architecture (and runtime), then taken from the cache."""
        c, m = self.cfg, shipped.model
        key = self._latency_key(m, shipped.onnx is not None, shipped.int8)
        if key not in self.cache:
            if shipped.onnx is None:
                entry = measure.cpu_latency(m, threads=c.latency_threads, runs=c.latency_runs, warmup=c.latency_warmup)
                entry["throughput_ips"] = measure.gpu_throughput(m)
            else:
                entry = shipped.onnx.latency(runs=c.latency_runs, warmup=c.latency_warmup)
            entry.pop("runs", None)
            self.cache[key] = entry  # a shared cache may keep an earlier trial's entry instead
        return {"arch": key, **self.cache[key]}

    def describe(self, shipped: _Shipped, **known: Any) -> dict[str, Any]:
        m, onnx = shipped.model, shipped.onnx
        row = {**known, "int8": shipped.int8, "accuracy": shipped.accuracy[0], "test_accuracy": shipped.accuracy[1],
               "sparsity": measure.sparsity(m), "nonzero_params": measure.nonzero_params(m),
               "size_mb": measure.size_mb(m) if onnx is None else onnx.size_mb(), "macs": measure.macs(m),
               **self.latency(shipped), "runtime": self.cfg.runtime, "runtime_version": _version(self.cfg.runtime)}
        if onnx is not None:
            row.update(artifact_sha256=onnx.sha256, test_labels_sha256=shipped.labels, test_images=len(self.test))
        return row

    def ship(self, fp32: nn.Module, accuracy: Callable[[], tuple[float, float]], int8: Callable[[], nn.Module] | None,
             name: str) -> list[_Shipped]:
        """The fp32 model and its INT8 (``int8`` makes the torch one) in the runtime; ``accuracy``
        gives the torch fp32 one (asked only when torch is the runtime: ORT evaluates its own files)."""
        if self.cfg.runtime == "torch":
            out = [_Shipped(False, fp32, accuracy())]
            if int8 is not None:
                q = int8()
                out.append(_Shipped(True, q, self.accuracy(q)))
            return out
        built = ort.build(fp32, self.splits.classes, self.splits.stats, threads=self.cfg.latency_threads, name=name,
                          calibration=self.calibration if int8 is not None else None)
        out = []
        for onnx, is_int8 in zip(built, (False, True)):
            (val, _), (test, labels) = onnx.evaluate(self.val), onnx.evaluate(self.test)
            out.append(_Shipped(is_int8, fp32, (val, test), onnx, ort.labels_digest(labels)))
        return out

    def variants(self, method: str, ratio: float) -> tuple[tuple[float, float], list[_Shipped]]:
        """The accuracy before fine-tuning, and the point as it ships: fp32, and INT8 when asked."""
        if ratio == 0.0 and self._dense is not None:
            return self.dense_accuracy, self._dense  # the dense point is the same whatever the method
        c, epochs = self.cfg, self.cfg.finetune_epochs
        pruned = prune_point(self.model, method, ratio, c, self.splits.train)
        before = self.dense_accuracy if ratio == 0.0 else self.accuracy(pruned)
        loss_fn = None  # the dense point: plain continued training, the equal-compute reference
        if epochs and ratio > 0.0 and c.distill:
            loss_fn = distillation_loss(self._teacher, c, self.train_cfg.label_smoothing)
        if epochs:
            pruned = finetune(pruned, self.splits.train, self.train_cfg, epochs, c.finetune_lr, loss_fn)
        fp32 = compress.make_permanent(pruned).cpu().eval()

        def int8() -> nn.Module:
            if epochs and c.int8_mode == "qat":
                return quantization_aware(fp32, self.splits.train, self.train_cfg, c.qat_epochs, c.finetune_lr / 10,
                                          loss_fn)
            return compress.quantize_int8(fp32, self.calibration)

        out = self.ship(fp32, (lambda: self.accuracy(pruned)) if epochs else (lambda: before),
                        int8 if c.int8 else None, f"{method} at ratio {ratio:g}")
        if ratio == 0.0:
            self._dense = out
        return before, out

    def points(self, method: str, ratio: float, models_out: dict[str, nn.Module] | None = None,
               artifacts_out: dict[str, ort.OrtModel] | None = None) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"method": method, "ratio": ratio, "finetune_epochs": self.cfg.finetune_epochs}
        try:
            before, variants = self.variants(method, ratio)
        except ort.OrtError as e:  # one point ORT cannot take; the others go on
            print(f"sweep: {e}; the sweep goes on with the other points", file=sys.stderr, flush=True)
            return [{**row, "int8": False, "runtime": self.cfg.runtime, "error": str(e)}]
        if self.cfg.finetune_epochs:
            row["accuracy_no_finetune"], row["test_accuracy_no_finetune"] = before
        if models_out is not None:
            models_out[point_key(method, ratio)] = variants[0].model
        rows = [self.describe(v, **row) for v in variants]
        if artifacts_out is not None:
            for v, r in zip(variants, rows):
                if v.onnx is not None:
                    r["artifact"] = artifact_name(method, ratio, v.int8)
                    artifacts_out[r["artifact"]] = v.onnx
        return rows

    def dense_latency(self) -> float:
        """Latency of the dense fp32 model in the sweep's runtime (the architecture, whatever its weights)."""
        if self._dense:
            return self.latency(self._dense[0])["latency_ms"]
        m = compress.make_permanent(self.model).cpu().eval()
        key = self._latency_key(m, self.cfg.runtime == "onnxruntime", False)
        if key in self.cache:  # another trial or rung timed it: building the file only to look it up cost an export
            return self.cache[key]["latency_ms"]
        return self.latency(self.ship(m, lambda: self.dense_accuracy, None, "the dense model")[0])["latency_ms"]


def run_sweep(model: nn.Module, splits: Splits, cfg: SweepConfig, train_cfg: TrainConfig | None = None, *,
              latency_cache: MutableMapping[str, dict[str, Any]] | None = None, progress: bool = True,
              on_point: Callable[[dict[str, Any]], None] | None = None,
              models_out: dict[str, nn.Module] | None = None,
              artifacts_out: dict[str, ort.OrtModel] | None = None) -> pd.DataFrame:
    """Sweep ``cfg.methods`` x ``cfg.ratios`` (x INT8) over a trained dense ``model``.

    ``splits`` should be on the training device; evaluation stays there (INT8 models run on
    the CPU). ``train_cfg`` is the recipe used for fine-tuning (batch size, seed, ...).
    Returns one row per point with the columns of :data:`COLUMNS`. ``models_out`` receives each
    point's shipped fp32 model under :func:`point_key` (fine-tuned, when ``finetune_epochs``);
    ``artifacts_out`` (``runtime = "onnxruntime"``) each point's ONNX classifier, as measured,
    under :func:`artifact_name` (the row's ``artifact``).
    """
    for m in cfg.methods:  # fail before any work
        compress.check_method(m)
    for r in cfg.ratios:
        compress.check_ratio(r)
    if cfg.int8 and cfg.runtime == "torch" and progress:
        print("sweep: INT8 in eager PyTorch is torch.ao.quantization's FX API, deprecated and being removed "
              "(pytorch/ao#2259); --runtime onnxruntime measures INT8 as a search ships it", file=sys.stderr, flush=True)
    sweep = _Sweep(model, splits, cfg, train_cfg or TrainConfig(), {} if latency_cache is None else latency_cache)
    rows: list[dict[str, Any]] = []
    total = len(cfg.methods) * len(cfg.ratios) * (2 if cfg.int8 else 1)
    with tqdm(total=total, desc="sweep", unit="point", file=sys.stderr, disable=not progress, leave=False) as bar:
        for method in cfg.methods:
            for ratio in cfg.ratios:
                for point in sweep.points(method, ratio, models_out, artifacts_out):
                    rows.append(point)
                    if on_point is not None:
                        on_point(point)
                    bar.update()
                    bar.set_postfix(method=method, ratio=ratio, acc=f"{point.get('accuracy', float('nan')):.3f}")
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    df["latency_speedup"] = sweep.dense_latency() / df.latency_ms
    return df
