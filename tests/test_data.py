import numpy as np
import pytest
import torch

from conftest import SUBSET, write_cifar_fixture
from trainables import data, datasets
from trainables.data import DataConfig, DataError


def test_digits_splits_are_uint8_stratified_and_disjoint():
    s = data.load(DataConfig(dataset="digits", val_fraction=0.2, seed=3))
    assert s.train.x.dtype == torch.uint8 and s.train.x.shape[1:] == (3, 32, 32)
    assert len(s.train) + len(s.val) == 1437 and len(s.test) == 360
    assert abs(len(s.val) / (len(s.train) + len(s.val)) - 0.2) < 0.01
    # stratified: every class in val, proportions close to train's
    tr = torch.bincount(s.train.y, minlength=10).float() / len(s.train)
    va = torch.bincount(s.val.y, minlength=10).float() / len(s.val)
    assert (va > 0).all() and (tr - va).abs().max() < 0.02
    # no image both in train and val
    flat = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}
    assert not flat(s.train.x) & flat(s.val.x)
    assert s.train.x.float().std() > 10  # real pixels, not blank


def test_seed_changes_val_split_but_not_test():
    a = data.load(DataConfig(seed=0))
    b = data.load(DataConfig(seed=1))
    assert not torch.equal(a.val.y, b.val.y) or not torch.equal(a.val.x, b.val.x)
    assert torch.equal(a.test.x, b.test.x)


def test_subset_sizes():
    s = data.load(DataConfig(train_size=100, test_size=50, val_fraction=0.1))
    assert len(s.train) + len(s.val) == 100 and len(s.test) == 50


def test_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    y = np.arange(40) % 10
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    s = data.load(DataConfig(dataset="npz", path=str(p), val_fraction=0.25))
    assert len(s.train) == 30 and len(s.val) == 10 and len(s.test) == 10
    # NHWC -> NCHW without changing pixels
    i = 0
    match = [(x[j].transpose(2, 0, 1) == s.test.x[i].numpy()).all() for j in range(10)]
    assert any(match)
    with pytest.raises(DataError, match="not found.*Set \\[data\\] path"):
        data.load(DataConfig(dataset="npz", path=str(tmp_path / "missing.npz")))
    np.savez(tmp_path / "bad.npz", x_train=x)
    with pytest.raises(DataError, match="lacks arrays"):
        data.load(DataConfig(dataset="npz", path=str(tmp_path / "bad.npz")))


def test_cifar10_format_loader_and_cache(tmp_path):
    x0, y0 = write_cifar_fixture(tmp_path, n_per_batch=20, n_test=30)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.1)
    s = data.load(cfg)
    assert len(s.train) + len(s.val) == 100 and len(s.test) == 30
    assert (tmp_path / "cifar10_uint8.npz").is_file()
    (x_tr, y_tr, *_), _ = datasets._load_cifar("cifar10", str(tmp_path), download=False)  # from the cache now
    np.testing.assert_array_equal(x_tr[:20], x0)
    np.testing.assert_array_equal(y_tr[:20], y0)


def test_cifar10_missing_offline_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as e:
        data.load(DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere"), download=False))
    assert str(tmp_path / "nowhere") in str(e.value) and "download = true" in str(e.value)


def test_too_small_for_stratified_val():
    with pytest.raises(DataError, match="validation split"):
        data.load(DataConfig(train_size=12, val_fraction=0.1))


def test_augment_is_crop_and_flip():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = data.augment(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output is some 32x32 window of the zero-padded input, maybe flipped
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        found = any(
            torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))
            for dy in range(9) for dx in range(9)
            for w in [padded[i, :, dy:dy + 32, dx:dx + 32]]
        )
        assert found


def test_train_batches_deterministic_per_epoch():
    s = data.load(DataConfig(train_size=100))
    a = list(data.train_batches(s.train, 32, seed=0, epoch=1))
    b = list(data.train_batches(s.train, 32, seed=0, epoch=1))
    c = list(data.train_batches(s.train, 32, seed=0, epoch=2))
    assert len(a) == len(s.train) // 32
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert abs(a[0][0].mean().item()) < 1.5  # normalised


@pytest.mark.skipif(not SUBSET.is_file(), reason="shared CIFAR-10 subset not present")
def test_real_cifar_subset():
    s = data.load(DataConfig(dataset="npz", path=str(SUBSET)))
    assert len(s.train) + len(s.val) == 5085 and len(s.test) == 1017
    assert set(s.test.y.tolist()) == set(range(10))


def test_a_dataset_too_large_for_memory_names_its_size_and_the_fix(monkeypatch):
    monkeypatch.setattr(data, "MAX_BYTES", 100_000)  # the digits at 32 x 32 are ~5.5 MB of uint8
    with pytest.raises(DataError, match=r"GiB of uint8 images at 32 x 32.*train_size, test_size.*image_size"):
        data.load(DataConfig(dataset="digits"))
    assert len(data.load(DataConfig(dataset="digits", image_size=8, train_size=100, test_size=50)).test) == 50


def test_image_size_resizes_and_the_statistics_come_from_the_training_images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 48, 40, 1), dtype=np.uint8)  # grey, not square
    np.savez(tmp_path / "g.npz", x_train=x, y_train=np.arange(40) % 4, x_test=x[:8], y_test=np.arange(8) % 4)
    s = data.load(DataConfig(dataset="npz", path=str(tmp_path / "g.npz"), image_size=24, val_fraction=0.25))
    assert s.input_shape == (1, 24, 24) and s.test.x.shape[1:] == (1, 24, 24)
    mean, std = s.stats
    fit = s.train.x.float() / 255
    assert mean[0] == pytest.approx(fit.mean().item(), abs=1e-3) and std[0] == pytest.approx(fit.std().item(), abs=2e-3)
    assert s.val.mean == mean and s.test.std == std  # one normalisation for every split
    given = data.load(DataConfig(dataset="npz", path=str(tmp_path / "g.npz"), mean=[0.5], std=[0.25], val_fraction=0.25))
    assert given.stats == ((0.5,), (0.25,)) and given.input_shape == (1, 48, 40)
    with pytest.raises(DataError, match="one value per channel"):
        data.load(DataConfig(dataset="npz", path=str(tmp_path / "g.npz"), mean=[0.5, 0.5, 0.5], std=[0.2] * 3))
