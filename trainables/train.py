"""Train and evaluate a classifier (ResNet18 by default): ``train_one_epoch`` / ``evaluate`` / ``fit``.

No Ray here, so this runs and benchmarks standalone. The recipe, top to bottom:
SGD with Nesterov momentum and weight decay (or Adam), a one-cycle (triangle) / cosine / constant schedule
stepped per batch, label smoothing, on CUDA bf16 autocast and channels_last. Batches come from
:mod:`trainables.data` (uint8 on the device, augmented per batch there).

Layout: training on CUDA runs channels_last (:func:`fast_path`), but every model that leaves
:func:`fit` or :func:`for_training` is back in the plain (contiguous) layout, the one that is
pruned, measured, checkpointed and shipped. Evaluation runs bf16 only when asked (``amp``): the
sweep evaluates fp32 models as they ship.

A checkpoint holds model, optimiser, scheduler, completed epochs, the CPU RNG state, the device
it trained on, the training config, ``meta`` and the per-epoch history. Since each epoch's
shuffle and augmentation depend only on ``(seed, epoch)`` and the device's generator, resuming
on the same kind of device continues the run exactly: the same weights as an uninterrupted run.
Resuming on another kind (CUDA and CPU generators differ) warns (``checkpoint.ResumeWarning``).
A NaN/Inf loss raises :class:`Diverged` naming the epoch and the lr; the last good checkpoint
is kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from trainables import compress
from trainables.checkpoint import restore, save_checkpoint
from trainables.errors import DeviceError, Diverged
from trainables.data import Split, Splits, eval_batches, train_batches
from trainables.model import ModelConfig, Network, build, load_weights


@dataclass
class TrainConfig:
    """The ``[train]`` section of an experiment file: every recipe knob in one place."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: float = 0.1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    amp: bool = True  # on CUDA: bf16 autocast + channels_last (no effect on CPU)
    eval_batch_size: int = 512
    precise_bn: int = 1024  # BatchNorm statistics re-estimated on this many training images per epoch (0 = off)
    output_dir: str = "runs"  # `prunetune train` writes OUTPUT_DIR/<name>/<time>/checkpoint.pt


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    val_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    checkpoint: str | None = None


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("[train] device = 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def fast_path(device: torch.device, amp: bool) -> bool:
    """Whether to run bf16 autocast + channels_last: on CUDA when ``amp`` is on.

    Every caller looks this up at call time, so a test can force the CUDA branch on a CPU
    (torch has CPU bf16 autocast and channels_last too) by patching it.
    """
    return amp and device.type == "cuda"


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if fast_path(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def for_training(model: nn.Module, device: torch.device, amp: bool) -> nn.Module:
    """``model`` in the layout it trains fastest in on ``device`` (channels_last on the fast path)."""
    return model.to(memory_format=torch.channels_last if fast_path(device, amp) else torch.contiguous_format)


def plain_layout(model: nn.Module) -> nn.Module:
    """``model`` back in the contiguous layout: the one pruning (``view(-1)``), latency and
    export expect, and the one checkpoints are rebuilt in."""
    return model.to(memory_format=torch.contiguous_format)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-batch lr multiplier. ``onecycle`` is airbench's triangle: linear warm-up over the
    first 25% of steps to ``lr``, then linear decay to 0 (well-defined for any step count)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = max(1, round(0.25 * total))
    if cfg.schedule == "onecycle":
        def factor(step: int) -> float:
            return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
    elif cfg.schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    else:
        def factor(step: int) -> float:
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss


def train_one_epoch(
    model: nn.Module, split: Split, opt: torch.optim.Optimizer, sched, cfg: TrainConfig, epoch: int,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """One pass over ``split``; returns loss, train accuracy, images and seconds.

    The loss is label-smoothed cross-entropy unless ``loss_fn`` is given (fine-tuning with
    distillation passes one that also asks a teacher about the same augmented batch).
    """
    device = split.x.device
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    criterion = loss_fn or (lambda out, x, y: ce(out, y))
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    fast = fast_path(device, cfg.amp)
    for step, (x, y) in enumerate(train_batches(split, cfg.batch_size, cfg.seed, epoch)):
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            out = model(x)
            loss = criterion(out, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if step % 20 == 0 and not torch.isfinite(loss_sum):  # one sync every 20 steps
            break
    loss = (loss_sum / max(seen, 1)).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not math.isfinite(loss):
        raise Diverged(epoch, cfg.lr, loss, cfg.optimizer)
    return {"train_loss": loss, "train_accuracy": correct.item() / max(seen, 1), "images": seen, "seconds": seconds}


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512, *, amp: bool = False) -> float:
    """Top-1 accuracy (0-1) of ``model`` on ``split`` (no augmentation).

    fp32 by default: the accuracy of the model as it ships. ``amp=True`` evaluates the way it
    trains (bf16 + channels_last inputs on the fast path): the per-epoch validation of ``fit``.
    """
    device = split.x.device
    was_training = model.training
    model.eval()
    fast = fast_path(device, amp)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in eval_batches(split, batch_size):
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / max(len(split), 1)


def precise_bn(model: nn.Module, split: Split, images: int) -> None:
    """Re-estimate the BatchNorm running statistics of ``model`` with its current weights on the
    first ``images`` of ``split`` ("precise BN", Wu and Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021): the running averages trail the weights, and in eval mode a MobileNetV3-small
    trained 45 steps on the digits scored chance (0.10) where the same weights with re-estimated
    statistics scored 0.55 (as in train mode). Evaluation, checkpoints and the sweep see the
    weights' own statistics; training itself is unchanged (it normalises by batch statistics)."""
    if images > 0:
        compress.reestimate_bn(model, split.normalized(images))


def _network(splits: Splits, cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device,
             fresh_run: bool) -> tuple[Network, nn.Module]:
    """The network :func:`fit` trains, in the layout it trains fastest in on ``device``. The global
    generator is seeded first, so the initial weights (and every later draw from it) repeat run to
    run; ``[model] weights`` load only into a ``fresh_run``, since a resumed one brings its own."""
    torch.manual_seed(cfg.seed)
    net = Network.of(model_cfg, splits.num_classes, splits.input_shape)
    model = build(net, trusted=model_cfg.arch)
    if model_cfg.weights and fresh_run:
        fresh = load_weights(model, model_cfg.weights, net.arch)
        print(f"prunetune: {net.arch} starts from {model_cfg.weights}"
              + (f"; fresh: {', '.join(fresh)}" if fresh else ""), flush=True)
    return net, for_training(model.to(device), device, cfg.amp)


def fit(
    splits: Splits, cfg: TrainConfig, *, checkpoint_path: str | Path | None = None,
    resume: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None, model_cfg: ModelConfig | None = None,
) -> FitResult:
    """Train a fresh ``model_cfg`` network (ResNet18 by default; or continue ``resume``) on
    ``splits`` for ``cfg.epochs``, its output layer sized from the classes and its first layer
    from the images; ``[model] weights`` start a fresh run.

    ``splits`` should already be on the training device. After every epoch the checkpoint is
    written (when ``checkpoint_path`` is given) and ``on_epoch(metrics)`` is called.
    ``meta`` (e.g. the data config) is stored in the checkpoint for later sweeps.
    """
    device = splits.train.x.device
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    net, model = _network(splits, cfg, model_cfg or ModelConfig(), device, fresh_run=resume is None)
    opt = make_optimizer(model, cfg)
    steps = max(1, len(splits.train) // cfg.batch_size)
    sched = make_scheduler(opt, cfg, steps)
    data_cfg = (meta or {}).get("spec", {}).get("data")
    history = restore(resume, dataclasses.asdict(cfg), model, opt, sched, device, data_cfg) if resume is not None else []
    start_epoch = resume["epoch"] + 1 if resume is not None else 1

    result = FitResult(model=model, history=history, checkpoint=str(checkpoint_path) if checkpoint_path else None)
    train_seconds = sum(h["seconds"] for h in history)
    images = sum(h["images"] for h in history)
    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        stats = train_one_epoch(model, splits.train, opt, sched, cfg, epoch)
        precise_bn(model, splits.train, cfg.precise_bn)
        stats["val_accuracy"] = evaluate(model, splits.val, cfg.eval_batch_size, amp=cfg.amp)
        stats["epoch"] = epoch
        stats["images_per_second"] = stats["images"] / stats["seconds"]
        stats["lr"] = sched.get_last_lr()[0]
        stats["epoch_seconds"] = time.perf_counter() - epoch_start
        stats["elapsed"] = stats["epoch_seconds"] + (history[-1]["elapsed"] if history else 0.0)
        history.append(stats)
        train_seconds += stats["seconds"]
        images += stats["images"]
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {
                **net.record(), "classes": list(splits.classes), "mean": list(splits.stats[0]),
                "std": list(splits.stats[1]), "epoch": epoch, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state()}, "device": device.type,
                "train": dataclasses.asdict(cfg), "meta": meta or {}, "history": history,
            })
        if on_epoch is not None:
            on_epoch(stats)
    result.model = plain_layout(model)
    result.history = history
    result.val_accuracy = history[-1]["val_accuracy"] if history else float("nan")
    result.train_seconds = train_seconds
    result.images_per_second = images / train_seconds if train_seconds else 0.0
    result.test_accuracy = evaluate(model, splits.test, cfg.eval_batch_size)
    return result
