"""``prunetune``'s arguments: one subparser per command, with the help a user reads."""
from __future__ import annotations

import argparse
from typing import Callable

from trainables.names import CHECKPOINT_FILE
from tuning.jobs import DEFAULT_JOBS_ADDRESS

_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"


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


def parser(description: str, commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """``prunetune``'s parser; each subcommand runs ``commands[name]``."""
    p = argparse.ArgumentParser(prog="prunetune", description=description)
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_and_sweep(sub, commands)
    _add_search(sub, commands)
    _add_mlflow(sub, commands)
    return p


def _with_file(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", help="experiment file (TOML), e.g. experiments/quickstart.toml")
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one key of the file (repeatable), e.g. --set train.epochs=3")


def _add_train_and_sweep(sub, commands) -> None:
    t = sub.add_parser("train", help="train one model without Ray and save its checkpoint")
    _with_file(t)
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint written by an earlier run")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    t.set_defaults(func=commands["train"])

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
    s.set_defaults(func=commands["sweep"])


def _add_search(sub, commands) -> None:
    address_help = "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    se = sub.add_parser("search", help="Ray Tune + Optuna search over lr and prune ratio (train + sweep per trial)")
    _with_file(se)
    se.add_argument("--address", help=address_help)
    se.add_argument("--tracking-uri", help=_TRACKING_HELP)
    se.set_defaults(func=commands["search"])

    re_ = sub.add_parser("resume", help="continue an interrupted search from its directory")
    re_.add_argument("path", help="the experiment directory `prunetune search` printed")
    re_.add_argument("--address", help=f"{address_help}; a Jobs API (http://HEAD:8265) resumes it there as a Ray Job")
    re_.add_argument("--follow", action="store_true", help="with a Jobs API address: stream the job's logs")
    re_.set_defaults(func=commands["resume"])

    su = sub.add_parser("submit", help="run the search as a Ray Job on a cluster's head node")
    _with_file(su)
    su.add_argument("--address", help=f"the head's Jobs API (default: $RAY_API_SERVER_ADDRESS, else {DEFAULT_JOBS_ADDRESS})")
    su.add_argument("--tracking-uri", help="MLflow server the cluster reaches (default: $MLFLOW_TRACKING_URI; required)")
    su.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 if it succeeded")
    su.set_defaults(func=commands["submit"])


def _add_mlflow(sub, commands) -> None:
    pa = sub.add_parser("pareto", help="print the Pareto front of the latest finished search from MLflow")
    pa.add_argument("--experiment", help="MLflow experiment (the experiment file's name); default: any")
    pa.add_argument("--max-latency-ms", type=_budget(positive=True), help="latency budget (default: the search's [search] "
                    "max_latency_ms); the fastest point within both budgets is picked")
    pa.add_argument("--max-accuracy-drop", type=_budget(positive=False), help="accuracy budget, 0-1 below the best equal-compute "
                    "dense point (0.01 = one point; default: the search's)")
    pa.add_argument("--json", action="store_true", help="print a JSON array of the front's points last (with "
                    "version, aliases, picked)")
    pa.add_argument("--tracking-uri", help=_TRACKING_HELP)
    pa.set_defaults(func=commands["pareto"])

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
    _checked_here(ex, commands["export"], "the file")

    ve = sub.add_parser("verify", help="run a point's file on this machine and compare with what the search measured")
    ve.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a trial's run id (+ --method/--ratio/--int8)")
    ve.add_argument("--file", help="a model on disk (e.g. from prunetune export) to check against the record; "
                    "default: the registered (or trial's) file itself")
    ve.add_argument("--method")
    ve.add_argument("--ratio", type=float)
    ve.add_argument("--int8", action="store_true")
    _checked_here(ve, commands["verify"], "it")

    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store and print its URL")
    ui.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=commands["ui"])


def _checked_here(p: argparse.ArgumentParser, command: Callable[[argparse.Namespace], int], what: str) -> None:
    """The options of a command that runs a point's file here against its record."""
    p.add_argument("--tolerance", type=_budget(positive=False), default=0.01, help=f"accuracy (0-1) {what} may "
                   "lose here against its record (default 0.01: one point)")
    p.add_argument("--tracking-uri", help=_TRACKING_HELP)
    p.set_defaults(func=command)
