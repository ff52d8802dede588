"""The network a trial trains: the default, torchvision networks, a user's factory, weights."""
import json
import textwrap

import numpy as np
import pytest
import torch

from trainables import compress, data, measure, ort
from trainables.checkpoint import CheckpointError, input_stats, load_checkpoint, model_from_checkpoint
from trainables.errors import ModelError
from trainables.model import (TRUST_ENV, ModelConfig, Network, build, check_weights_file, cifar_resnet18, input_shape,
                              load_weights)
from trainables.train import TrainConfig, fit
from tuning import models
from tuning.spec import from_dict


def test_cifar_resnet18_shape_and_size():
    model = cifar_resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # 11.17 M
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_the_stem_follows_the_image_size_unless_given():
    small = Network.of(ModelConfig(), 5, (3, 64, 64))
    large = Network.of(ModelConfig(), 5, (3, 96, 96))
    assert (small.stem, large.stem) == ("cifar", "imagenet")
    assert Network.of(ModelConfig(stem="imagenet"), 5, (3, 32, 32)).stem == "imagenet"
    net = build(large)
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, torch.nn.MaxPool2d)
    grey = build(Network("resnet18", "cifar", 4, (1, 40, 40))).eval()  # one channel, the first conv takes it
    assert grey(torch.zeros(2, 1, 40, 40)).shape == (2, 4) and input_shape(grey) == (1, 40, 40)


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow  # 15 s each: export and quantization of another network
@pytest.mark.parametrize("size", [32, 64])
def test_mobilenet_v3_small_prunes_quantizes_and_exports_at_its_size(size):
    model = build(Network("mobilenet_v3_small", "", 3, (3, size, size))).eval()
    pruned = compress.make_permanent(compress.prune(model, "channel_l1", 0.3)).eval()
    assert measure.macs(pruned) < 0.7 * measure.macs(model)
    assert measure.macs(compress.quantize_int8(pruned, _images(8, size))) == measure.macs(pruned)  # its size, not 32
    fp32, int8 = ort.build(pruned, ["a", "b", "c"], ((0.5,) * 3, (0.25,) * 3), calibration=_images(16, size))
    assert list(int8.session.get_inputs()[0].shape[1:]) == [size, size, 3]
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    labels, _, names = int8.session.run(None, {int8.input: images})
    assert set(labels) <= {0, 1, 2} and set(names) <= {"a", "b", "c"}
    assert measure.cpu_latency(fp32, runs=3, warmup=1)["latency_ms"] > 0


def _tiny(classes: int, size: int, n: int = 6, channels: int = 3) -> data.Splits:
    rng = np.random.default_rng(classes)
    x = rng.integers(0, 256, (classes * n, size, size, channels), dtype=np.uint8)
    y = np.repeat(np.arange(classes), n)
    mean, std = data.channel_stats(x)
    split = data.Split(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y), mean, std)
    return data.Splits(split, split.head(classes * 2), split.head(classes * 2), "tiny", [f"c{i}" for i in range(classes)])


def test_a_hundred_classes_train_and_the_checkpoint_records_the_network(tmp_path):
    splits = _tiny(100, 8, n=2)
    fit(splits, TrainConfig(epochs=1, batch_size=50, threads=1), checkpoint_path=tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert (ckpt["arch"], ckpt["stem"], ckpt["num_classes"], ckpt["input_shape"]) == ("resnet18", "cifar", 100, [3, 8, 8])
    assert ckpt["classes"][99] == "c99" and ckpt["mean"] == list(splits.stats[0])
    assert model_from_checkpoint(ckpt).eval()(torch.zeros(1, 3, 8, 8)).shape == (1, 100)


def test_a_user_factory_trains_and_is_imported_only_when_trusted(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def small(num_classes):
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = "my_nets:small"
    fit(_tiny(3, 12), TrainConfig(epochs=1, batch_size=6, threads=1), checkpoint_path=tmp_path / "c.pt",
        model_cfg=ModelConfig(arch=arch))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["arch"] == arch
    with pytest.raises(CheckpointError, match=f"{TRUST_ENV}=my_nets:small"):  # a checkpoint alone runs no code
        model_from_checkpoint(ckpt)
    assert model_from_checkpoint(ckpt, trusted=arch).eval()(torch.zeros(1, 3, 12, 12)).shape == (1, 3)
    monkeypatch.setenv(TRUST_ENV, arch)
    pruned = compress.prune(model_from_checkpoint(ckpt), "channel_l1", 0.5, round_to=1)
    assert measure.macs(pruned) < measure.macs(model_from_checkpoint(ckpt))
    with pytest.raises(ModelError, match="cannot import it"):
        build(Network("no_such_module:f", "cifar", 3, (3, 12, 12)), trusted="no_such_module:f")


def test_a_weights_file_starts_training_and_a_new_classifier_starts_fresh(tmp_path, capsys):
    ten = cifar_resnet18(10)
    torch.save(ten.state_dict(), tmp_path / "w.pt")
    three = build(Network("resnet18", "cifar", 3, (3, 32, 32)))
    assert load_weights(three, str(tmp_path / "w.pt"), "resnet18") == ["fc.bias", "fc.weight"]
    assert torch.equal(three.layer3[0].conv1.weight, ten.layer3[0].conv1.weight)
    splits = _tiny(3, 16)
    spec = from_dict({"name": "w", "model": {"weights": str(tmp_path / "w.pt")}})
    result = fit(splits, TrainConfig(epochs=1, batch_size=6, threads=1, lr=1e-9, schedule="constant"),
                 model_cfg=spec.model, checkpoint_path=tmp_path / "c.pt", meta={"spec": spec.to_dict()})
    assert "starts from" in capsys.readouterr().out
    assert torch.allclose(result.model.layer4[1].conv2.weight, ten.layer4[1].conv2.weight, atol=1e-4)
    (tmp_path / "w.pt").unlink()  # the file training started from is gone: only a new training needs it
    with pytest.raises(ModelError, match="w.pt': no such file"):
        check_weights_file(spec.model)
    assert models.dense_from_checkpoint(tmp_path / "c.pt")[1].model.weights == str(tmp_path / "w.pt")
    torch.save(cifar_resnet18(10).state_dict() | {"extra.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="do not fit resnet18"):
        load_weights(three, str(tmp_path / "other.pt"), "resnet18")
    with pytest.raises(ModelError, match="no such file"):
        load_weights(three, str(tmp_path / "nope.pt"), "resnet18")


def test_torchvision_weights_come_from_the_file_placed_where_the_error_says(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    imagenet = build(Network("mobilenet_v3_small", "imagenet", 1000, (3, 224, 224)))
    from torchvision import models

    url = models.get_model_weights("mobilenet_v3_small")["IMAGENET1K_V1"].url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), target)  # what torch.hub would have downloaded (offline: placed by hand)
    mine = build(Network("mobilenet_v3_small", "cifar", 3, (3, 32, 32)))
    fresh = load_weights(mine, "IMAGENET1K_V1", "mobilenet_v3_small")
    assert "classifier.3.weight" in fresh and "features.1.block.0.0.weight" not in fresh
    assert torch.equal(mine.features[1].block[0][0].weight, imagenet.features[1].block[0][0].weight)
    with pytest.raises(ModelError, match="not a file, nor torchvision weights"):
        load_weights(mine, "NO_SUCH_WEIGHTS", "mobilenet_v3_small")


def test_a_checkpoint_written_before_the_network_was_recorded_still_sweeps(tmp_path):
    from conftest import prunetune_here

    spec = {"name": "old", "data": {"dataset": "digits", "train_size": 60, "test_size": 20, "val_fraction": 0.25}}
    old = {"arch": "cifar_resnet18", "num_classes": 10, "epoch": 1, "model": cifar_resnet18().state_dict(),
           "meta": {"spec": spec}}  # what prunetune wrote before [model]: no stem, input shape or statistics
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    model = model_from_checkpoint(ckpt)
    assert input_shape(model) == (3, 32, 32) and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert input_stats(ckpt) == (data.MEAN, data.STD)
    _, _, splits = models.load_trained(tmp_path / "old.pt")
    assert splits.stats == (data.MEAN, data.STD)  # the statistics it was trained with, not the digits' own
    r = prunetune_here("sweep", str(tmp_path / "old.pt"), "--methods", "channel_l1", "--ratios", "0,0.5", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [row["ratio"] for row in rows] == [0.0, 0.5] and rows[1]["macs"] < rows[0]["macs"]
