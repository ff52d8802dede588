"""The ``prunetune`` command line."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tuning import spec as spec_mod


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_json(obj: Any) -> None:
    """The last stdout line of a ``--json`` command: one JSON document."""
    if isinstance(obj, dict):
        obj = {k: _jsonable(v) for k, v in obj.items()}
    elif isinstance(obj, list):
        obj = [{k: _jsonable(v) for k, v in row.items()} for row in obj]
    print(json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from trainables import data
    from trainables.train import fit, load_checkpoint, pick_device

    spec = spec_mod.load(args.file, args.set)
    device = pick_device(spec.train.device)
    splits = data.load(spec.data)
    print(
        f"{spec.name}: {spec.data.dataset} train {len(splits.train)} / val {len(splits.val)} / "
        f"test {len(splits.test)} images on {device}; {spec.train.epochs} epochs, "
        f"{spec.train.optimizer} lr={spec.train.lr:g}, batch {spec.train.batch_size}",
        flush=True,
    )
    resume = load_checkpoint(args.resume) if args.resume else None
    if args.resume:
        ckpt_path = Path(args.resume)
        print(f"resuming from {ckpt_path} after epoch {resume['epoch']}", flush=True)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        ckpt_path = Path(spec.train.output_dir) / spec.name / stamp / "checkpoint.pt"
    print(f"checkpoint (written every epoch): {ckpt_path}", flush=True)

    def progress(m: dict[str, float]) -> None:
        print(
            f"epoch {int(m['epoch'])}/{spec.train.epochs}  loss {m['train_loss']:.4f}  "
            f"train_acc {m['train_accuracy']:.4f}  val_acc {m['val_accuracy']:.4f}  "
            f"{m['images_per_second']:.0f} img/s  {m['elapsed']:.1f}s",
            flush=True,
        )

    result = fit(
        splits.to(device), spec.train, checkpoint_path=ckpt_path, resume=resume,
        meta={"name": spec.name, "data": dataclasses.asdict(spec.data), "spec": spec.to_dict()},
        on_epoch=progress,
    )
    print(f"test accuracy {result.test_accuracy:.4f}; checkpoint {ckpt_path}", flush=True)
    if args.json:
        _print_json({
            "test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
            "epochs": len(result.history), "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second, "checkpoint": str(ckpt_path),
            "train_loss": result.history[-1]["train_loss"] if result.history else None,
        })
    return 0


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunetune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_file(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("file", help="experiment file (TOML), e.g. experiments/quickstart.toml")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key of the file (repeatable), e.g. --set train.epochs=3")

    t = sub.add_parser("train", help="train one model without Ray and save its checkpoint")
    with_file(t)
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint written by an earlier run")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from trainables.data import DataError
    from trainables.train import CheckpointError, DeviceError, Diverged

    try:
        return args.func(args)
    except (UserError, spec_mod.SpecError, DataError, Diverged, CheckpointError, DeviceError) as e:
        print(f"prunetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
