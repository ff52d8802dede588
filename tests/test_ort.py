"""trainables.ort: the shipped ONNX classifier (export, ONNX Runtime INT8, preprocessing and answer
composed in), evaluation and timing in a real InferenceSession."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from trainables import compress, data, ort
from trainables.data import DataConfig
from trainables.model import cifar_resnet18
from trainables.sweep import SweepConfig, run_sweep
from trainables.train import TrainConfig, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = TrainConfig(epochs=1, batch_size=30, lr=0.002, optimizer="adam", eval_batch_size=64)


@pytest.fixture(scope="module")
def tiny():
    return data.load(DataConfig(train_size=80, test_size=40, val_fraction=0.25))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return compress.make_permanent(compress.prune(cifar_resnet18().eval(), "channel_l1", 0.5))


@pytest.fixture(scope="module")
def core(model):
    return ort.export_core(model, name="channel_l1 at 0.5")


@pytest.fixture(scope="module")
def shipped(core, tiny):
    return ort.OrtModel(ort.classifier(core, tiny.classes), name="channel_l1 at 0.5")


def test_the_core_runs_the_same_network_and_no_deprecated_exporter(model, core, tiny, recwarn):
    x = data.normalize(tiny.test.x[:16])
    with torch.inference_mode():
        want = model(x).numpy()
    got = ort.OrtModel(core).session.run(None, {ort.INPUT: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # the torch.export-based exporter (it files the ExportedProgram's metadata), not the deprecated TorchScript one
    assert any(p.key.startswith("pkg.torch.export") for p in onnx.load_from_string(core).graph.metadata_props)


def test_the_classifier_takes_uint8_images_and_answers_label_probabilities_class(model, shipped, tiny):
    images = tiny.test.x[:8].permute(0, 2, 3, 1).contiguous().numpy()  # uint8 NHWC, as decoded
    label, probs, names = shipped.session.run(None, {ort.IMAGES: images})
    with torch.inference_mode():
        want = model(data.normalize(tiny.test.x[:8])).argmax(1).numpy()
    assert list(label) == list(want) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert list(names) == [tiny.classes[i] for i in label]
    accuracy, labels = shipped.evaluate(tiny.test)
    assert accuracy == evaluate(model, tiny.test) and len(labels) == len(tiny.test)
    assert shipped.sha256 == hashlib.sha256(shipped.onnx_bytes).hexdigest()
    assert ort.labels_digest(labels) == ort.labels_digest(labels.copy()) != ort.labels_digest(labels + 1)


@pytest.mark.parametrize("scheme", sorted(ort.INT8_SCHEMES))
def test_every_int8_scheme_is_a_per_channel_qdq_graph_close_to_fp32(core, shipped, tiny, scheme):
    q = ort.OrtModel(ort.classifier(ort.quantize_core(core, data.normalize(tiny.train.x[:64]), scheme=scheme),
                                    tiny.classes))
    graph = onnx.load_from_string(q.onnx_bytes).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]  # conv weights
    per_channel = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert per_channel  # one scale per output channel
    activations = {i.data_type for i in graph.initializer if i.name.endswith("_zero_point") and len(i.dims) == 0}
    want = onnx.TensorProto.INT8 if ort.INT8_SCHEMES[scheme][0] == "QInt8" else onnx.TensorProto.UINT8
    assert want in activations
    assert q.size_mb() < 0.4 * shipped.size_mb()
    images = tiny.test.x.permute(0, 2, 3, 1).contiguous().numpy()
    a = q.session.run([ort.PROBABILITIES], {ort.IMAGES: images})[0].ravel()
    b = shipped.session.run([ort.PROBABILITIES], {ort.IMAGES: images})[0].ravel()
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95  # same function, 8-bit precision


def test_latency_reports_the_machine(shipped):
    stats = shipped.latency(runs=5, warmup=1)
    assert {"latency_ms", "latency_p90_ms", "latency_cv", "threads", "runs", "cpu", "cpu_flags"} <= set(stats)
    assert 0 < stats["latency_ms"] <= stats["latency_p90_ms"] and stats["threads"] == 1


def _unknown_op_model() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", [ort.INPUT], [ort.OUTPUT], domain="ai.prunetune")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(ort.INPUT, TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info(ort.OUTPUT, TensorProto.FLOAT, [1, 10])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.prunetune", 1)]
                             ).SerializeToString()


@pytest.mark.parametrize("payload", [b"not an onnx model", _unknown_op_model()])
def test_a_model_ort_cannot_load_is_a_clear_error(payload):
    with pytest.raises(ort.OrtError, match="ONNX Runtime cannot load global_l1 at 0.3"):
        ort.OrtModel(payload, name="global_l1 at 0.3")


@pytest.mark.slow
def test_sweep_in_onnxruntime_goes_on_past_a_point_ort_cannot_take(tiny, monkeypatch, capsys):
    torch.manual_seed(0)
    dense = cifar_resnet18().eval()
    real_classifier = ort.classifier

    def classifier(core, classes, *args):
        weights = sum(int(np.prod(i.dims)) for i in onnx.load_from_string(core).graph.initializer)
        if weights < 6_000_000:  # channel_l1 at 0.5 (a quarter of the weights): an operator this ORT build lacks
            return _unknown_op_model()
        return real_classifier(core, classes, *args)

    monkeypatch.setattr(ort, "classifier", classifier)
    cfg = SweepConfig(methods=["global_l1", "channel_l1"], ratios=[0.0, 0.5], int8=True, runtime="onnxruntime",
                      latency_runs=3, latency_warmup=1, eval_size=20, calibration_size=32)
    df = run_sweep(dense, tiny, cfg, TRAIN, progress=False)
    assert (df.runtime == "onnxruntime").all()
    failed = df[df.error.notna()]
    assert list(zip(failed.method, failed.ratio)) == [("channel_l1", 0.5)] and failed.accuracy.isna().all()
    assert "ONNX Runtime cannot load channel_l1 at ratio 0.5" in failed.error.iloc[0]
    assert "the sweep goes on" in capsys.readouterr().err
    ok = df[df.error.isna()]
    assert len(ok) == 6 and ok.accuracy.notna().all() and ok.latency_ms.gt(0).all()
    # fp32 rows are evaluated by running the ONNX classifier on uint8 images: the same predictions as PyTorch
    dense_row = ok[(ok.method == "global_l1") & (ok.ratio == 0.0) & ~ok.int8].iloc[0]
    val = tiny.val.head(20)
    assert dense_row.accuracy == evaluate(dense, val)
    assert ok[ok.int8].size_mb.max() < 0.4 * ok[~ok.int8].size_mb.min()
    assert ok.artifact_sha256.str.len().eq(64).all() and ok.test_labels_sha256.notna().all()
