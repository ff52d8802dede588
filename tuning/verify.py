"""What ships is what was measured: a point's record, and the check that runs its artifact here.

A deployable point is a file, the ONNX classifier its trial built and measured
(:mod:`trainables.ort`). Its :class:`Record` is what the search measured of those bytes: their
SHA-256, the test accuracy on the held-out images and a digest of the labels it gave them, the
data they came from, and where it ran (CPU, instruction-set flags, runtime). A registered
version carries the record in its tags; a trial run, in its ``sweep.csv``.

:func:`check` runs a file on this machine, on the same held-out images, and compares with the
record, never with itself: the bytes (the same file?), the labels (the same answers?) and the
accuracy (within ``tolerance``, default one point). A drop beyond it is a
:class:`~trainables.errors.VerificationError` that names the likely cause: for an INT8 model on
an x86 CPU without VNNI, 8-bit dot products that saturate.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from trainables import data, measure, ort
from trainables.errors import ModelError, VerificationError

TOLERANCE = 0.01  # accuracy (0-1) a model may lose here against its record: one point


@dataclass(frozen=True)
class Record:
    """What a search measured of one artifact."""

    sha256: str
    test_accuracy: float
    test_labels_sha256: str
    test_images: int  # the first N images of the test split (the sweep's eval_size)
    data: dict[str, Any]  # the [data] config the test split comes from
    int8: bool
    cpu: str = ""
    cpu_flags: str = ""
    runtime: str = ""

    def tags(self) -> dict[str, str]:
        """As model version tags (strings)."""
        d = asdict(self)
        return {"artifact_sha256": d.pop("sha256"), "data": json.dumps(d.pop("data"), sort_keys=True),
                **{k: str(v) for k, v in d.items()}}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], where: str) -> "Record":
        """The record in a registered version's tags; a :class:`ModelError` when it has none."""
        need = {"artifact_sha256", "test_accuracy", "test_labels_sha256", "test_images", "data", "int8"}
        missing = need - set(tags)
        if missing:
            raise ModelError(f"{where} carries no record of what was measured (its tags lack "
                             f"{', '.join(sorted(missing))}): it was registered before prunetune recorded one; "
                             "register it again with `prunetune resume DIR` or a new search")
        return cls(tags["artifact_sha256"], float(tags["test_accuracy"]), tags["test_labels_sha256"],
                   int(tags["test_images"]), json.loads(tags["data"]), tags["int8"] == "True", tags.get("cpu", ""),
                   tags.get("cpu_flags", ""), tags.get("runtime", ""))

    @classmethod
    def from_row(cls, row: Mapping[str, Any], data_cfg: dict[str, Any]) -> "Record":
        """The record of a deployable row of a sweep table (``artifact_sha256`` and the rest)."""
        return cls(str(row["artifact_sha256"]), float(row["test_accuracy"]), str(row["test_labels_sha256"]),
                   int(row["test_images"]), data_cfg, bool(row["int8"]), str(row.get("cpu", "")),
                   str(row.get("cpu_flags", "") if isinstance(row.get("cpu_flags"), str) else ""),
                   f"{row.get('runtime', '')} {row.get('runtime_version', '')}".strip())


@dataclass(frozen=True)
class Verdict:
    """What :func:`check` found, and the lines that say it."""

    same_bytes: bool
    same_labels: bool  # the labels' digest is the record's: the very same answers
    test_accuracy: float
    record: Record

    @property
    def drop(self) -> float:
        return self.record.test_accuracy - self.test_accuracy

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.drop <= tolerance + 1e-12

    def describe(self) -> str:
        r = self.record
        return (f"on {measure.cpu_name()} [{measure.cpu_flags() or 'no avx2'}], onnxruntime {_ort_version()}: "
                f"test accuracy {self.test_accuracy:.4f} on {r.test_images} held-out images, recorded {r.test_accuracy:.4f} "
                f"(on {r.cpu or 'an unrecorded CPU'} [{r.cpu_flags or '-'}]); "
                f"{'the same bytes' if self.same_bytes else 'NOT the bytes that were measured'} (sha256 {r.sha256[:12]}); "
                + ("the same labels as recorded" if self.same_labels else "other labels than recorded"))


def test_images(record: Record) -> data.Split:
    """The held-out images the record was measured on: the first ``test_images`` of its data's test split."""
    try:
        split = data.load(data.DataConfig(**record.data)).test
    except TypeError as e:
        raise ModelError(f"the record's data config is not one this prunetune reads: {e}") from None
    if len(split) < record.test_images:
        raise ModelError(f"the record was measured on {record.test_images} test images, the data here has "
                         f"{len(split)}: {record.data}")
    return split.head(record.test_images)


def check(onnx_bytes: bytes, record: Record, images: data.Split | None = None) -> Verdict:
    """Run ``onnx_bytes`` (a classifier, uint8 images in) here on the record's held-out images."""
    images = images if images is not None else test_images(record)
    accuracy, labels = ort.OrtModel(onnx_bytes, name="the model to verify").evaluate(images)
    return Verdict(hashlib.sha256(onnx_bytes).hexdigest() == record.sha256,
                   ort.labels_digest(labels) == record.test_labels_sha256, accuracy, record)


def require(verdict: Verdict, tolerance: float = TOLERANCE) -> None:
    """A :class:`VerificationError` with the likely cause and the fix when the drop exceeds ``tolerance``."""
    if verdict.ok(tolerance):
        return
    r = verdict.record
    if not verdict.same_bytes:
        cause = "the file is not the one that was measured (another export, or changed since)"
        fix = "export the registered version again (`prunetune export models:/NAME@ALIAS`)"
    elif r.int8 and not measure.has_vnni():
        cause = ("INT8 on an x86 CPU without VNNI: its 8-bit dot products (VPMADDUBSW) saturate, which the CPU "
                 f"it was measured on ({r.cpu_flags or 'unrecorded flags'}) does not do")
        fix = ("deploy the fp32 version of this point, or search again with [search] latency_target on a node "
               "of this kind of CPU so the front is measured where it runs")
    else:
        cause = "this CPU or runtime computes it differently from the one it was measured on"
        fix = "measure on the deployment hardware ([search] latency_target) and compare the records"
    raise VerificationError(f"accuracy here is {100 * verdict.drop:.1f} points below the record (tolerance "
                            f"{100 * tolerance:g}): {verdict.describe()}. Likely cause: {cause}. Fix: {fix}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
