"""The checks of an experiment's values that one key's type cannot say: ranges, and keys that
must agree. :func:`validate` runs them on every :class:`tuning.spec.Spec` loaded; each failure is
one :class:`SpecError` line naming the file, the key and the fix.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

from trainables import compress
from trainables.errors import SpecError
from trainables.model import check as check_model
from tuning import storage, studies

if TYPE_CHECKING:
    from tuning.spec import Spec

# An experiment's name names an MLflow experiment and registered model, directories and tag filters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate(spec: Spec) -> None:
    """Raise the first problem of ``spec``, or return."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise SpecError(f"{spec.source}: {msg}")

    _data_and_train(spec, need)
    _sweep(spec, need)
    _search(spec, need)


def _data_and_train(spec: Spec, need: Callable[[bool, str], None]) -> None:
    d, t = spec.data, spec.train
    need(bool(_NAME.fullmatch(spec.name)), f"name {spec.name!r} must be 1-64 letters, digits, '_', '.' or '-', "
         "starting with a letter or digit (it names the MLflow experiment, the registered model and the results "
         "directory), e.g. name = \"cifar10-channel\"")
    need(0.0 < d.val_fraction < 1.0, f"[data] val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.train_size >= 0 and d.test_size >= 0, "[data] train_size and test_size must be >= 0 (0 = all)")
    need(d.dataset != "npz" or bool(d.path), "[data] dataset = 'npz' needs path = 'FILE.npz'")
    need(d.image_size == 0 or d.image_size >= 8, f"[data] image_size must be >= 8 pixels (0 = as stored), got "
         f"{d.image_size}")
    need(d.dataset != "imagefolder" or d.image_size > 0, "[data] dataset = 'imagefolder' needs image_size = N "
         "(its images are decoded once at N x N), e.g. image_size = 64")
    check_model(spec.model)
    need(t.epochs >= 1, f"[train] epochs must be >= 1, got {t.epochs}")
    need(t.batch_size >= 1 and t.eval_batch_size >= 1, "[train] batch sizes must be >= 1")
    need(t.lr > 0, f"[train] lr must be > 0, got {t.lr}")
    need(t.momentum >= 0 and t.weight_decay >= 0, f"[train] momentum and weight_decay must be >= 0, got "
         f"{t.momentum} and {t.weight_decay}")
    need(t.threads >= 0, "[train] threads must be >= 0 (0 = torch's default)")
    need(0.0 <= t.label_smoothing < 1.0, "[train] label_smoothing must be in [0, 1)")


def _sweep(spec: Spec, need: Callable[[bool, str], None]) -> None:
    s, q = spec.sweep, spec.search
    need(bool(s.ratios), "[sweep] ratios must not be empty")
    try:
        for m in s.methods:
            compress.check_method(m)
        for r in s.ratios:
            compress.check_ratio(r)
    except ValueError as e:
        raise SpecError(f"{spec.source}: [sweep] {e}") from None
    need(s.finetune_epochs >= 0 and q.finetune_epochs >= 0, "[sweep] and [search] finetune_epochs must be >= 0")
    need(s.finetune_lr > 0, f"[sweep] finetune_lr must be > 0, got {s.finetune_lr}")
    need(0.0 <= s.distill_weight <= 1.0, f"[sweep] distill_weight must be in [0, 1], got {s.distill_weight}")
    need(s.distill_temperature > 0, f"[sweep] distill_temperature must be > 0, got {s.distill_temperature}")
    need(s.qat_epochs >= 1, f"[sweep] qat_epochs must be >= 1, got {s.qat_epochs}")
    need(s.runtime == "torch" or s.int8_mode == "ptq", "[sweep] int8_mode = 'qat' makes torch INT8 models; with "
         "runtime = 'onnxruntime' INT8 comes from ONNX Runtime's static quantization: use int8_mode = 'ptq'")
    need(s.bn_recalibration >= 0, f"[sweep] bn_recalibration must be >= 0 (training images; 0 = off), got "
         f"{s.bn_recalibration}")
    need(s.round_to >= 1, f"[sweep] round_to must be >= 1 (1 = no rounding), got {s.round_to}")
    need(s.latency_runs >= 1 and s.latency_threads >= 1, "[sweep] latency_runs and latency_threads must be >= 1")
    need(s.latency_warmup >= 0, f"[sweep] latency_warmup must be >= 0, got {s.latency_warmup}")
    need(s.calibration_size >= 1, f"[sweep] calibration_size must be >= 1 (training images INT8 is calibrated "
         f"on), got {s.calibration_size}")
    need(s.eval_size >= 0, f"[sweep] eval_size must be >= 0 (0 = every validation / test image), got {s.eval_size}")


def _search(spec: Spec, need: Callable[[bool, str], None]) -> None:
    q = spec.search
    need(q.num_samples >= 1, "[search] num_samples must be >= 1")
    need(q.max_failures >= 0, f"[search] max_failures must be >= 0 (retries of a trial whose worker died), got "
         f"{q.max_failures}")
    need(q.min_accuracy < 1.0, f"[search] min_accuracy must be < 1 (< 0: twice chance), got {q.min_accuracy}")
    need(q.max_latency_ms > 0 and q.max_accuracy_drop >= 0, "[search] max_latency_ms must be > 0 and "
         "max_accuracy_drop >= 0 (inf: no budget), e.g. max_latency_ms = 5.0, max_accuracy_drop = 0.01")
    need(q.register_models >= 0, "[search] register_models must be >= 0 (0 = register none)")
    need(0 < q.lr_min <= q.lr_max, f"[search] need 0 < lr_min <= lr_max, got {q.lr_min}, {q.lr_max}")
    need(0.0 <= q.ratio_min <= q.ratio_max < 1.0, "[search] need 0 <= ratio_min <= ratio_max < 1")
    _study_storage(spec, need)
    need(q.cpus_per_trial > 0 and q.gpus_per_trial >= 0, "[search] cpus_per_trial must be > 0, gpus_per_trial >= 0")
    need(q.sampler != "grid" or bool(q.grid_lrs), "[search] sampler = 'grid' needs grid_lrs = [...]")
    need(bool(q.objectives), "[search] objectives must not be empty")
    metrics = [o.metric for o in q.objectives]
    need("test_accuracy" not in metrics, "[search] objectives: test_accuracy is reported, never tuned on (a search "
         "that optimises it reports a biased test accuracy); use accuracy:max (the validation split)")
    need(len(set(metrics)) == len(metrics), f"[search] objectives name a metric twice: {metrics}")
    need(not (q.asha and q.early_stop != "none"), "[search] asha = true and early_stop = 'pareto' both stop trials: "
         "choose one (early_stop = 'pareto' weighs every objective, asha validation accuracy alone)")
    need(q.early_stop_eta >= 2 and q.early_stop_margin >= 0, f"[search] early_stop_eta must be >= 2 and "
         f"early_stop_margin >= 0, got {q.early_stop_eta} and {q.early_stop_margin}")
    need(min(q.stop_after_minutes, q.stop_after_epochs, q.stop_patience, q.stop_tolerance) >= 0,
         "[search] stop_after_minutes, stop_after_epochs, stop_patience and stop_tolerance must be >= 0 (0: no rule)")
    need(not q.hypervolume_reference or len(q.hypervolume_reference) == len(q.objectives),
         f"[search] hypervolume_reference has {len(q.hypervolume_reference)} values for {len(q.objectives)} "
         "objectives: give one per objective, in their order (e.g. [0.0, 20.0] for accuracy:max, latency_ms:min)")


def _study_storage(spec: Spec, need: Callable[[bool, str], None]) -> None:
    """``[search] study_storage`` is a URL Optuna can keep a study in; results in an object store need
    one of a database server (the SQLite file ``optuna.db`` needs a file system; a grid has no study)."""
    q = spec.search
    where = ("[search] study_storage" if "search.study_storage" in spec.given
             else f"${studies.ENV} ([search] study_storage's default)")
    wrong = studies.problem(q.study_storage)
    need(wrong is None, f"{where} {wrong}")
    need(not storage.is_remote(q.storage_path) or q.sampler == "grid" or studies.is_server(q.study_storage),
         f"[search] storage_path {q.storage_path!r} is an object store, where the Optuna study cannot be a SQLite "
         f"file: give the study a database server, {studies.HOW_TO_SET}"
         + (f" (now {studies.public(q.study_storage)!r})" if q.study_storage else ""))
