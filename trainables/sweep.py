"""Trained dense model x (method, ratio[, int8]) -> one pandas row per point."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SweepConfig:
    """The ``[sweep]`` section of an experiment file."""

    methods: list[str] = field(default_factory=lambda: ["global_l1"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    int8: bool = False  # also measure every point with INT8 on top
    finetune_epochs: int = 0
    finetune_lr: float = 0.001
    eval_size: int = 0  # 0 = the whole validation/test split
    latency_threads: int = 1
    latency_runs: int = 50
    latency_warmup: int = 10
    calibration_size: int = 256  # training images used to calibrate INT8
