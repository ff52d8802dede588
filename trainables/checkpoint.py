"""Checkpoint files: written atomically, read back with errors that say what is wrong.

A checkpoint (written by :func:`trainables.train.fit`, for ``prunetune train`` and for every
trial alike) is a dict: ``arch``, ``num_classes``, ``epoch``, ``model`` (state dict), ``optimizer``,
``scheduler``, ``rng``, ``device`` (where it trained), ``train`` (the recipe), ``meta``
(:class:`trainables.names.CheckpointMeta`: the experiment spec and the sampled config) and
``history`` (one dict per epoch).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trainables.model import ARCH, cifar_resnet18


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not ours."""


class ResumeWarning(UserWarning):
    """A run resumes on another kind of device than it trained on: not an exact continuation."""


SCRATCH_PREFIX = "prunetune-trial-"  # then the pid of the trial's process


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A trial's scratch directory for its checkpoints (Tune copies each reported one into the
    search's storage). It goes when the trial returns; first, :func:`reap_scratch`."""
    reap_scratch()
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def reap_scratch() -> list[Path]:
    """Remove the scratch directories of trial processes that are gone from this machine and
    return them. A killed trial (a lost node, a killed search, ``ray stop``) cannot remove its
    own, and each holds a dense checkpoint and its fine-tuned points (~200 MB)."""
    gone = []
    for d in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = d.name[len(SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader (or a crash) never sees a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit`; clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; `prunetune train FILE` writes one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a prunetune checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("arch") != ARCH:
        found = ckpt.get("arch") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a {ARCH} checkpoint written by prunetune (found {found!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    model = cifar_resnet18(ckpt.get("num_classes", 10))
    model.load_state_dict(ckpt["model"])
    return model


# Knobs that do not change the result; everything else must match to continue a run exactly.
_RESUME_FREE = {"threads", "device", "eval_batch_size", "output_dir"}


def _check_same_run(ckpt: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [f"{k}={ckpt['train'].get(k)!r} (now {v!r})" for k, v in now.items()
            if k not in _RESUME_FREE and ckpt["train"].get(k) != v]
    if diff:
        raise CheckpointError(
            "cannot resume: the checkpoint's run was trained with " + ", ".join(diff)
            + "; resuming continues that same run, so use the same experiment file and --set values"
        )


def restore(resume: dict[str, Any], recipe: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
            sched, device: torch.device) -> list[dict[str, float]]:
    """Put a checkpoint's model, optimiser, scheduler and RNG state back; return its history.
    ``recipe`` (the ``[train]`` config as a dict) must match the checkpoint's, but for the knobs
    that do not change the result: resuming continues that same run.

    Batches draw from their own (seed, epoch) generators, so the CPU state is all there is;
    older checkpoints' per-GPU CUDA states are ignored (their count need not match this node's).
    """
    _check_same_run(resume, recipe)
    model.load_state_dict(resume["model"])
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    torch.set_rng_state(resume["rng"]["torch"])
    trained_on = resume.get("device", device.type)
    if trained_on != device.type:
        warnings.warn(ResumeWarning(
            f"resuming a run that trained on {trained_on} on {device.type}: epochs from {resume['epoch'] + 1} on "
            f"shuffle and augment with the {device.type} generator, so the weights will differ from an "
            f"uninterrupted {trained_on} run"), stacklevel=3)
    return list(resume["history"])
