"""trainables.ort: export, ONNX Runtime INT8, evaluation and timing in a real InferenceSession."""
from __future__ import annotations

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
def exported(model):
    return ort.export(model, threads=1, name="channel_l1 at 0.5")


def test_export_runs_the_same_network(model, exported, tiny):
    x = data.normalize(tiny.test.x[:16])
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(exported(x), want, rtol=1e-3, atol=1e-4)
    assert exported.evaluate(tiny.test) == evaluate(model, tiny.test)


def test_quantize_makes_a_per_channel_int8_qdq_graph(model, exported, tiny):
    q = ort.quantize(exported, data.normalize(tiny.train.x[:64]), name="channel_l1 at 0.5")
    graph = onnx.load_from_string(q.onnx_bytes).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert int8_weights  # conv weights stored as INT8
    per_channel = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert per_channel  # one scale per output channel
    assert q.size_mb() < 0.4 * exported.size_mb()
    x = data.normalize(tiny.test.x[:16])
    a, b = q(x).ravel(), exported(x).ravel()
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95  # same function, 8-bit precision


def test_latency_reports_the_same_fields_as_torch(exported):
    stats = exported.latency(runs=5, warmup=1)
    assert {"latency_ms", "latency_p90_ms", "latency_cv", "threads", "runs", "cpu"} <= set(stats)
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
    real_export = ort.export

    def export(model, threads=1, name="model"):
        if name.startswith("channel_l1"):  # an operator this ORT build lacks, for this point only
            return ort.OrtModel(_unknown_op_model(), threads, name)
        return real_export(model, threads, name)

    monkeypatch.setattr(ort, "export", export)
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
    # fp32 rows are evaluated by running the ONNX model: the same predictions as PyTorch
    dense_row = ok[(ok.method == "global_l1") & (ok.ratio == 0.0) & ~ok.int8].iloc[0]
    val = data.Split(tiny.val.x[:20], tiny.val.y[:20])
    assert dense_row.accuracy == evaluate(dense, val)
    assert ok[ok.int8].size_mb.max() < 0.4 * ok[~ok.int8].size_mb.min()
