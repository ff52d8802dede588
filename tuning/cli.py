"""The ``prunetune`` command line."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from trainables.errors import NoFeasiblePoint, PrunetuneError
from trainables.names import CHECKPOINT_FILE, CheckpointMeta
from tuning import _arguments, _scoped, runs, spec as spec_mod, storage




def _print_json(obj: dict | list[dict]) -> None:
    """The last stdout line of a ``--json`` command: one JSON document (NaN and Inf as null)."""
    def clean(row: dict) -> dict:
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}

    print(json.dumps([clean(r) for r in obj] if isinstance(obj, list) else clean(obj)), flush=True)



def cmd_train(args: argparse.Namespace) -> int:
    from trainables import data
    from trainables.checkpoint import load_checkpoint
    from trainables.model import check_weights_file
    from trainables.train import fit, pick_device

    spec = spec_mod.load(args.file, args.set)
    check_weights_file(spec.model)
    device = pick_device(spec.train.device)
    splits = data.load(spec.data)
    print(f"{spec.name}: {spec.data.dataset} train {len(splits.train)} / val {len(splits.val)} / "
          f"test {len(splits.test)} images on {device}; {spec.train.epochs} epochs, "
          f"{spec.train.optimizer} lr={spec.train.lr:g}, batch {spec.train.batch_size}", flush=True)
    resume = load_checkpoint(args.resume) if args.resume else None
    if args.resume:
        ckpt_path = Path(args.resume)
        print(f"resuming from {ckpt_path} after epoch {resume['epoch']}", flush=True)
    else:
        run_dir = spec_mod.new_run_dir(Path(spec.train.output_dir) / spec.name, spec_mod.run_stamp())
        ckpt_path = run_dir / CHECKPOINT_FILE
    print(f"checkpoint (written every epoch): {ckpt_path}", flush=True)

    def progress(m: dict[str, float]) -> None:
        print(f"epoch {int(m['epoch'])}/{spec.train.epochs}  loss {m['train_loss']:.4f}  "
              f"train_acc {m['train_accuracy']:.4f}  val_acc {m['val_accuracy']:.4f}  "
              f"{m['images_per_second']:.0f} img/s  {m['elapsed']:.1f}s", flush=True)

    result = fit(splits.to(device), spec.train, checkpoint_path=ckpt_path, resume=resume,
                 meta=CheckpointMeta(spec=spec.to_dict(), config={}), on_epoch=progress, model_cfg=spec.model)
    print(f"test accuracy {result.test_accuracy:.4f}; checkpoint {ckpt_path}", flush=True)
    if args.json:
        _print_json({
            "test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
            "epochs": len(result.history), "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second, "checkpoint": str(ckpt_path),
            "train_loss": result.history[-1]["train_loss"] if result.history else None,
        })
    return 0



def cmd_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from trainables.sweep import run_sweep
    from tuning.models import load_trained

    model, spec, splits = load_trained(args.checkpoint)
    options = {"methods": args.methods and [m.strip() for m in args.methods.split(",") if m.strip()],
               "ratios": args.ratios and spec_mod.parse_ratios(args.ratios), "int8": args.int8 or None,
               "distill": False if args.no_distill else None, "finetune_epochs": args.finetune_epochs,
               "eval_size": args.eval_size, "int8_mode": args.int8_mode, "runtime": args.runtime}
    given = {f"sweep.{k}": v for k, v in options.items() if v is not None and v != ""}
    spec = spec_mod.replace(spec, given, source="prunetune sweep options")  # same checks as a file
    cfg = spec.sweep
    print(f"sweeping {args.checkpoint}: methods {', '.join(cfg.methods)}; ratios {cfg.ratios}; "
          f"int8 {cfg.int8_mode + ' on+off' if cfg.int8 else 'off'}; fine-tune {cfg.finetune_epochs} epochs"
          f"{' with distillation' if cfg.finetune_epochs and cfg.distill else ''}; latency: {cfg.runtime}, CPU "
          f"batch 1, {cfg.latency_threads} thread(s), median of {cfg.latency_runs}", flush=True)
    df = run_sweep(model, splits, cfg, spec.train)
    shown = df.drop(columns=["arch", "cpu", "threads"]).dropna(axis=1, how="all")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
        print(shown.to_string(index=False))
    print(f"latency measured on: {df.cpu.iloc[0]}", flush=True)
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if args.json:
        _print_json(json.loads(df.to_json(orient="records")))
    return 0



def cmd_search(args: argparse.Namespace) -> int:
    from tuning import driver, jobs

    spec = spec_mod.load(args.file, args.set)
    jobs.leave_job_dir(spec.search.storage_path)  # in a submitted job: the file is read
    return _exit_code(driver.search(spec, address=args.address, tracking_uri=args.tracking_uri))


def _exit_code(res) -> int:
    """0: a front, and a point within the budgets if there are any; 1: no completed trial or no
    shippable point above the floor; 3 (:class:`NoFeasiblePoint`'s): budgets no point meets.
    Every result is kept all the same."""
    if not len(res.front):
        return 1
    return 0 if res.front.feasible else NoFeasiblePoint.exit_code


def cmd_resume(args: argparse.Namespace) -> int:
    from tuning import driver, jobs

    if jobs.is_jobs_address(args.address):  # the directory is on the cluster: resume there, as a job
        return jobs.announce(jobs.submit_resume(args.path, args.address), args.follow)
    jobs.leave_job_dir(args.path if storage.is_remote(args.path) else str(Path(args.path).resolve().parent))
    return _exit_code(driver.resume(args.path, address=args.address))


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit ``prunetune search FILE`` as a Ray Job: the driver runs on the head node, so the
    search survives this machine going to sleep or losing its connection."""
    from tuning import jobs

    spec = spec_mod.load(args.file, args.set)  # fail here, not on the cluster, on a bad file
    return jobs.announce(jobs.submit_search(args.file, args.set, spec, address=args.address,
                                            tracking_uri=args.tracking_uri), args.follow)


def cmd_pareto(args: argparse.Namespace) -> int:
    from tuning import registry, runs

    uri = runs.tracking_uri(args.tracking_uri)
    running = registry.provisional(uri, args.experiment)
    if running is not None:
        print(running, flush=True)
    try:
        table, text, met = registry.answer(uri, args.experiment, args.max_latency_ms, args.max_accuracy_drop)
    except runs.NotFound:
        if running is None:
            raise
        return 0  # no finished search yet: the provisional front is all there is
    print(text, flush=True)
    if args.json:
        _print_json(json.loads(table.to_json(orient="records")))
    return 0 if met else NoFeasiblePoint.exit_code


def cmd_export(args: argparse.Namespace) -> int:
    from tuning import models, runs, verify

    uri = runs.tracking_uri(args.tracking_uri)
    runs.check_reachable(uri)
    point = models.resolve(uri, args.ref, args.method, args.ratio, True if args.int8 else None)
    print(f"exporting {point.method} ratio {point.ratio:g}{' + int8' if point.int8 else ''} of trial run "
          f"{point.run_id} as {args.format} -> {args.output}", flush=True)
    if args.format == "torchscript":
        print("note: TorchScript (and torch's INT8) are deprecated in PyTorch, and not what the search measured "
              "(an ONNX file in ONNX Runtime): this file is re-derived", flush=True)
    done = models.export_point(uri, point, args.format, args.output)
    print(f"from {done.source}; input: uint8 images, batch x H x W x 3 (normalisation inside); output: "
          f"{'label, probabilities, class' if args.format == 'onnx' else 'class probabilities'}", flush=True)
    if done.verdict is None:
        print(f"never measured by the search, so nothing to verify against: its test accuracy here is "
              f"{done.test_accuracy:.4f} on {done.images} held-out images", flush=True)
        return 0
    print(f"verified {done.verdict.describe()}", flush=True)
    verify.require(done.verdict, args.tolerance)  # exits 1 with the cause when the file loses accuracy here
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tuning import models, runs, verify

    uri = runs.tracking_uri(args.tracking_uri)
    runs.check_reachable(uri)
    point = models.resolve(uri, args.ref, args.method, args.ratio, True if args.int8 else None)
    found = models.shipped(uri, point)
    if found is None:
        raise models.ModelError(f"{point.method} ratio {point.ratio:g}{' int8' if point.int8 else ''} of trial run "
                                f"{point.run_id} was never built by its search: nothing was measured to verify against")
    payload = Path(args.file).read_bytes() if args.file else found.payload
    verdict = verify.check(payload, found.record)
    print(f"{args.file or found.source} against the record of {found.source}: {verdict.describe()}", flush=True)
    verify.require(verdict, args.tolerance)
    print("ok: within the tolerance of what was measured", flush=True)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from tuning import runs

    return runs.serve_ui(runs.tracking_uri(args.tracking_uri), args.host, args.port)



def _parser() -> argparse.ArgumentParser:
    return _arguments.parser(__doc__, {"train": cmd_train, "sweep": cmd_sweep, "search": cmd_search,
                                       "resume": cmd_resume, "submit": cmd_submit, "pareto": cmd_pareto,
                                       "export": cmd_export, "verify": cmd_verify, "ui": cmd_ui})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with _scoped.environment(runs.ARTIFACT_ENV):
            return args.func(args)
    except PrunetuneError as e:
        if os.environ.get("PRUNETUNE_DEBUG"):
            raise
        print(f"prunetune {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"prunetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
