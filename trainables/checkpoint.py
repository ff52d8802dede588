"""Checkpoint files: written atomically, read back with errors that say what is wrong.

A checkpoint (written by :func:`trainables.train.fit`, for ``prunetune train`` and for every
trial alike) is a dict: the network (``arch``, ``stem``, ``num_classes``, ``input_shape``: a
:class:`trainables.model.Network`), what its inputs are (``classes``, ``mean`` and ``std``, per
channel on the 0-1 scale), ``epoch``, ``model`` (state dict), ``optimizer``,
``scheduler``, ``rng``, ``device`` (where it trained), ``train`` (the recipe), ``meta``
(:class:`trainables.names.CheckpointMeta`: the experiment spec and the sampled config) and
``history`` (one dict per epoch). Checkpoints written before ``[model]`` (``arch =
"cifar_resnet18"``) still load: ResNet18, cifar stem, 3 x 32 x 32, CIFAR-10's statistics.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trainables.errors import CheckpointError
from trainables.data import MEAN, STD
from trainables.model import Network, build


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
    """Write atomically: a reader (or a crash) never sees a half-written checkpoint. The
    temporary file is unique to this write, so two writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# What every checkpoint holds, and of what type (the rest is optional: optimizer, scheduler, rng,
# history, ...). A file that lacks one of them was not written by prunetune.
_REQUIRED = {"arch": str, "epoch": int, "model": dict, "meta": dict}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit`; clear errors for a missing or foreign file.

    Only tensors and plain data are read (``torch.load(weights_only=True)``): a checkpoint is
    a file anyone can hand over (a shared MLflow server, a download), and unpickling arbitrary
    objects would run whatever code the file names. A file that holds anything else is a
    :class:`CheckpointError`, and nothing of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; `prunetune train FILE` writes one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):
            raise CheckpointError(f"{path} is not a prunetune checkpoint: unreadable as a torch file") from None
        raise CheckpointError(f"{path} is not a prunetune checkpoint: it holds Python objects other than tensors "
                              "and plain data, which prunetune never writes and does not load (unpickling them "
                              "could run code)") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a prunetune checkpoint: {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("arch"), str):
        found = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"arch {ckpt.get('arch')!r}"
        raise CheckpointError(f"{path} is not a checkpoint written by prunetune (found {found})")
    wrong = [f"{k} ({'missing' if k not in ckpt else type(ckpt[k]).__name__})" for k, tp in _REQUIRED.items()
             if not isinstance(ckpt.get(k), tp)]
    if wrong:
        raise CheckpointError(f"{path} is not a complete prunetune checkpoint: {', '.join(wrong)}; "
                              "`prunetune train FILE` writes one")
    return ckpt


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def model_from_checkpoint(ckpt: dict[str, Any], trusted: str = "") -> nn.Module:
    """The checkpoint's network with its weights. ``trusted``: the ``[model] arch`` of the
    experiment file being run, the only user factory this may import (:func:`trainables.model.build`)."""
    try:
        net = Network.from_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not say what network it holds ({e!r} missing or malformed); "
                              "`prunetune train FILE` writes complete ones") from None
    model = build(net, trusted)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its network {net.arch}: "
                              f"{str(e).splitlines()[0][:200]}") from None
    return model


def input_stats(ckpt: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std (0-1 scale, per channel) the checkpoint's model was trained with."""
    return tuple(ckpt.get("mean", MEAN)), tuple(ckpt.get("std", STD))


# Knobs that do not change the result; everything else ([train] and [data]) must match to continue a run
# exactly: a changed [data] seed or size would make earlier training images validation images.
# (precise_bn changes the statistics evaluated with, not the weights trained.) A key the checkpoint
# predates is not compared: its run had that key's default behaviour.
_RESUME_FREE = {"threads", "device", "eval_batch_size", "output_dir", "download", "precise_bn"}


def _check_same_run(ckpt: dict[str, Any], now: dict[str, Any], data: dict[str, Any] | None = None) -> None:
    diff = [f"{k}={ckpt['train'].get(k)!r} (now {v!r})" for k, v in now.items()
            if k not in _RESUME_FREE and k in ckpt["train"] and ckpt["train"][k] != v]
    was = ckpt.get("meta", {}).get("spec", {}).get("data")
    if data is not None and was is not None:
        diff += [f"data.{k}={was.get(k)!r} (now {v!r})" for k, v in data.items()
                 if k not in _RESUME_FREE and k in was and was[k] != v]
    if diff:
        raise CheckpointError(
            "cannot resume: the checkpoint's run was trained with " + ", ".join(diff)
            + "; resuming continues that same run, so use the same experiment file and --set values"
        )


def restore(resume: dict[str, Any], recipe: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
            sched, device: torch.device, data: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Put a checkpoint's model, optimiser, scheduler and RNG state back; return its history.
    ``recipe`` (the ``[train]`` config as a dict) and ``data`` (the ``[data]`` one, when known)
    must match the checkpoint's, but for the knobs that do not change the result: resuming
    continues that same run.

    Batches draw from their own (seed, epoch) generators, so the CPU state is all there is;
    older checkpoints' per-GPU CUDA states are ignored (their count need not match this node's).
    """
    _check_same_run(resume, recipe, data)
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
