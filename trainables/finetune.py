"""Fine-tuning a compressed model: mask or channels fixed, optionally distilled, optionally
quantization-aware.

- :func:`finetune`: SGD with a cosine schedule from ``lr``; unstructured masks stay fixed (torch's
  prune reparametrisation), a channel-pruned model keeps its channel counts; on the fast path
  it trains in bf16 + channels_last and comes back in the plain layout.
- :func:`distillation_loss`: knowledge distillation from a teacher (the dense model) on the same
  augmented batch, ``(1 - w) * CE + w * T^2 * KL(teacher_T || student_T)``.
- :func:`quantization_aware`: INT8 by quantization-aware fine-tuning (FX fake quantization, x86
  INT8 scheme), pruned zeros held at zero.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables import compress
from trainables.data import Split
from trainables.train import (LossFn, TrainConfig, for_training, make_optimizer, make_scheduler, plain_layout, precise_bn,
                              train_one_epoch)

if TYPE_CHECKING:
    from trainables.sweep import SweepConfig


def distillation_loss(teacher: nn.Module, cfg: SweepConfig, label_smoothing: float = 0.0) -> LossFn:
    """``(1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    on each batch, the teacher (in eval mode, no gradients) seeing the same augmented images."""
    w, t = cfg.distill_weight, cfg.distill_temperature
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(x).float() / t, dim=1)
        kd = F.kl_div(F.log_softmax(out.float() / t, dim=1), soft, reduction="batchmean") * t * t
        return (1 - w) * ce(out, y) + w * kd

    return loss


def finetune(model: nn.Module, split: Split, cfg: TrainConfig, epochs: int, lr: float,
             loss_fn: LossFn | None = None) -> nn.Module:
    """Fine-tune a copy of ``model`` for ``epochs`` (SGD, cosine schedule from ``lr``).

    Unstructured masks stay fixed: torch's prune reparametrisation multiplies ``weight_orig``
    by the mask in every forward, so pruned weights stay exactly zero (their gradient is zero
    and they are recomputed from the mask). A channel-pruned model keeps its channel counts.
    ``loss_fn`` (e.g. :func:`distillation_loss`) replaces the label-smoothed cross-entropy.
    """
    device = split.x.device
    model = for_training(compress.clone(model).to(device), device, cfg.amp)
    _train(model, split, cfg, epochs, lr, loss_fn)
    precise_bn(model, split, cfg.precise_bn)
    return plain_layout(model).eval()


def quantization_aware(model: nn.Module, split: Split, cfg: TrainConfig, epochs: int, lr: float,
                       loss_fn: LossFn | None = None) -> nn.Module:
    """INT8 by quantization-aware fine-tuning: fake-quantize ``model`` (masks baked in), train it
    ``epochs`` in fp32 with pruned zeros held at zero, convert to the INT8 CPU model."""
    device = split.x.device
    prepared = compress.prepare_qat(model).to(device)
    for p in prepared.parameters():  # unstructured zeros stay zeros (no-op for dense weights)
        if p.dim() > 1 and bool((p == 0).any()):
            keep = (p != 0).to(p.dtype)
            p.register_hook(lambda grad, keep=keep: grad * keep)
    _train(prepared, split, dataclasses.replace(cfg, amp=False), epochs, lr, loss_fn)
    return compress.convert_int8(prepared)


def _train(model: nn.Module, split: Split, cfg: TrainConfig, epochs: int, lr: float, loss_fn: LossFn | None) -> None:
    ft = dataclasses.replace(cfg, epochs=epochs, lr=lr, schedule="cosine", optimizer="sgd")
    opt = make_optimizer(model, ft)
    sched = make_scheduler(opt, ft, max(1, len(split) // ft.batch_size))
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, split, opt, sched, ft, 10_000 + epoch, loss_fn)
