"""The ``prunetune`` command line."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from trainables.errors import PrunetuneError
from trainables.names import CHECKPOINT_FILE, CheckpointMeta
from tuning import spec as spec_mod
from tuning.jobs import DEFAULT_JOBS_ADDRESS


_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"


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
    from tuning import jobs, search

    spec = spec_mod.load(args.file, args.set)
    jobs.leave_job_dir(spec.search.storage_path)  # in a submitted job: the file is read
    return _exit_code(search.search(spec, address=args.address, tracking_uri=args.tracking_uri))


def _exit_code(res) -> int:
    """0: a front, and a point within the budgets if there are any; 1: no completed trial, no
    shippable point above the floor, or budgets no point meets (every result is kept all the same)."""
    return 0 if len(res.front) and (not res.rules.budgeted or "pick" in res.aliases) else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from tuning import jobs, search

    if jobs.is_jobs_address(args.address):  # the directory is on the cluster: resume there, as a job
        return jobs.announce(jobs.submit_resume(args.path, args.address), args.follow)
    jobs.leave_job_dir(str(Path(args.path).resolve().parent))
    res, _ = search.resume(args.path, address=args.address)
    return _exit_code(res)


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit ``prunetune search FILE`` as a Ray Job: the driver runs on the head node, so the
    search survives this machine going to sleep or losing its connection."""
    from tuning import jobs

    spec = spec_mod.load(args.file, args.set)  # fail here, not on the cluster, on a bad file
    return jobs.announce(jobs.submit_search(args.file, args.set, spec, address=args.address,
                                            tracking_uri=args.tracking_uri), args.follow)


def cmd_pareto(args: argparse.Namespace) -> int:
    from tuning import registry, runs

    table, text, met = registry.answer(runs.tracking_uri(args.tracking_uri), args.experiment, args.max_latency_ms,
                                       args.max_accuracy_drop)
    print(text, flush=True)
    if args.json:
        _print_json(json.loads(table.to_json(orient="records")))
    return 0 if met else 1


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



def _budget(positive: bool):
    """An argparse type: a number > 0 (``positive``) or >= 0, ``inf`` for no budget; NaN is refused
    (it compares false with everything, so it would mean "no budget" unsaid)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 if positive else value >= 0):
            raise argparse.ArgumentTypeError(f"{text!r}: give a number {'> 0' if positive else '>= 0'}, or inf for "
                                             "no budget")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunetune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_and_sweep(sub)
    _add_search(sub)
    _add_mlflow(sub)
    return p


def _with_file(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="experiment file (TOML), e.g. experiments/quickstart.toml")
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one key of the file (repeatable), e.g. --set train.epochs=3")


def _add_train_and_sweep(sub) -> None:
    t = sub.add_parser("train", help="train one model without Ray and save its checkpoint")
    _with_file(t)
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint written by an earlier run")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sweep", help="sweep compression methods and ratios over a trained checkpoint")
    s.add_argument("checkpoint", help=f"{CHECKPOINT_FILE} written by `prunetune train`")
    s.add_argument("--methods", help="comma list of global_l1, layer_l1, global_random, channel_l1")
    s.add_argument("--ratios", help="start:stop:step (stop included, e.g. 0:0.8:0.05) or a comma list")
    s.add_argument("--int8", action="store_true", help="measure every point also with INT8 on top")
    s.add_argument("--finetune-epochs", type=int, help="fine-tune every point (mask / channels fixed; the dense "
                   "point gets the same epochs, for equal compute)")
    s.add_argument("--no-distill", action="store_true", help="fine-tune on the labels only (default: also "
                   "distil from the dense model)")
    s.add_argument("--int8-mode", choices=["ptq", "qat"], help="INT8 of fine-tuned points: post-training "
                   "calibration (ptq) or quantization-aware fine-tuning (qat)")
    s.add_argument("--runtime", choices=["torch", "onnxruntime"], help="what every point is timed and evaluated "
                   "in: PyTorch eager or an ONNX Runtime session (its INT8 from ORT's own quantization)")
    s.add_argument("--eval-size", type=int, help="evaluate on at most N validation/test images")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON array (one object per point) last")
    out.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    s.set_defaults(func=cmd_sweep)


def _add_search(sub) -> None:
    address_help = "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    se = sub.add_parser("search", help="Ray Tune + Optuna search over lr and prune ratio (train + sweep per trial)")
    _with_file(se)
    se.add_argument("--address", help=address_help)
    se.add_argument("--tracking-uri", help=_TRACKING_HELP)
    se.set_defaults(func=cmd_search)

    re_ = sub.add_parser("resume", help="continue an interrupted search from its directory")
    re_.add_argument("path", help="the experiment directory `prunetune search` printed")
    re_.add_argument("--address", help=f"{address_help}; a Jobs API (http://HEAD:8265) resumes it there as a Ray Job")
    re_.add_argument("--follow", action="store_true", help="with a Jobs API address: stream the job's logs")
    re_.set_defaults(func=cmd_resume)

    su = sub.add_parser("submit", help="run the search as a Ray Job on a cluster's head node")
    _with_file(su)
    su.add_argument("--address", help=f"the head's Jobs API (default: $RAY_API_SERVER_ADDRESS, else {DEFAULT_JOBS_ADDRESS})")
    su.add_argument("--tracking-uri", help="MLflow server the cluster reaches (default: $MLFLOW_TRACKING_URI; required)")
    su.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 if it succeeded")
    su.set_defaults(func=cmd_submit)


def _add_mlflow(sub) -> None:
    pa = sub.add_parser("pareto", help="print the Pareto front of the latest finished search from MLflow")
    pa.add_argument("--experiment", help="MLflow experiment (the experiment file's name); default: any")
    pa.add_argument("--max-latency-ms", type=_budget(positive=True), help="latency budget (default: the search's [search] "
                    "max_latency_ms); the fastest point within both budgets is picked")
    pa.add_argument("--max-accuracy-drop", type=_budget(positive=False), help="accuracy budget, 0-1 below the best equal-compute "
                    "dense point (0.01 = one point; default: the search's)")
    pa.add_argument("--json", action="store_true", help="print a JSON array of the front's points last (with "
                    "version, aliases, picked)")
    pa.add_argument("--tracking-uri", help=_TRACKING_HELP)
    pa.set_defaults(func=cmd_pareto)

    ex = sub.add_parser("export", help="write the file a point shipped as (ONNX), checked here against its record")
    ex.add_argument("ref", help="a trial's MLflow run id, or models:/NAME@ALIAS (best-accuracy, fastest, knee, pick) "
                    "or models:/NAME/VERSION")
    ex.add_argument("--method", help="default: the trial's (or the registered version's) method")
    ex.add_argument("--ratio", type=float, help="any ratio in [0, 1), swept or not (re-derived)")
    ex.add_argument("--int8", action="store_true", help="INT8 on top: ONNX Runtime static INT8 with --format onnx, "
                    "torch FX INT8 (deprecated) with --format torchscript")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="onnx (default: the file the "
                    "search measured) or torchscript (deprecated; eager PyTorch, re-derived)")
    ex.add_argument("-o", "--output", required=True, help="output file")
    ex.add_argument("--tolerance", type=_budget(positive=False), default=0.01, help="accuracy (0-1) the file may "
                    "lose here against its record (default 0.01: one point)")
    ex.add_argument("--tracking-uri", help=_TRACKING_HELP)
    ex.set_defaults(func=cmd_export)

    ve = sub.add_parser("verify", help="run a point's file on this machine and compare with what the search measured")
    ve.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a trial's run id (+ --method/--ratio/--int8)")
    ve.add_argument("--file", help="a model on disk (e.g. from prunetune export) to check against the record; "
                    "default: the registered (or trial's) file itself")
    ve.add_argument("--method")
    ve.add_argument("--ratio", type=float)
    ve.add_argument("--int8", action="store_true")
    ve.add_argument("--tolerance", type=_budget(positive=False), default=0.01, help="accuracy (0-1) it may lose here "
                    "against its record (default 0.01)")
    ve.add_argument("--tracking-uri", help=_TRACKING_HELP)
    ve.set_defaults(func=cmd_verify)

    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store and print its URL")
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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
