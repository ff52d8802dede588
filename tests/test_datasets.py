"""The dataset sources of trainables.datasets: CIFAR-100's python format and image folders,
on tiny fixtures written here (no network, a few seconds)."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from trainables import data, datasets
from trainables.data import DataConfig, DataError

C100_NAMES = ["apple", "bee", "cloud"]


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict:
    """A small CIFAR-100 in torchvision's python format (pickled plain dicts, as the real files);
    returns the NHWC images and labels of both splits to check the loader against."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        fine = [int(v) for v in (np.arange(n) * 2 + 1) % 3]  # 1, 0, 2, 1, ...: not the image order
        with open(base / name, "wb") as f:
            pickle.dump({"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": name,
                         "fine_labels": fine, "coarse_labels": [0] * n, "data": x}, f)
        out[name] = (x.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": C100_NAMES, "coarse_label_names": ["things"]}, f)
    return out


def test_cifar100_reads_pixels_labels_and_fine_names_then_its_cache(tmp_path, monkeypatch):
    want = write_cifar100(tmp_path)
    (x_tr, y_tr, x_te, y_te), names = datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path)))
    np.testing.assert_array_equal(x_tr, want["train"][0])
    np.testing.assert_array_equal(y_tr, want["train"][1])
    np.testing.assert_array_equal(x_te, want["test"][0])
    np.testing.assert_array_equal(y_te, want["test"][1])
    assert names == C100_NAMES and x_tr.dtype == np.uint8 and x_tr.shape == (12, 32, 32, 3)
    cache = tmp_path / "cifar100_uint8.npz"
    with np.load(cache, allow_pickle=False) as f:
        assert list(f["class_names"]) == C100_NAMES

    # now from the cache: the batches are never opened again
    monkeypatch.setattr(datasets, "_unpickle_cifar", lambda *a: pytest.fail("read the batches, not the cache"))
    s = data.load(DataConfig(dataset="cifar100", root=str(tmp_path), val_fraction=0.25))
    assert s.classes == C100_NAMES and s.num_classes == 3
    assert len(s.train) == 9 and len(s.val) == 3 and len(s.test) == 6
    assert s.test.x.shape[1:] == (3, 32, 32)
    np.testing.assert_array_equal(s.test.x.numpy().transpose(0, 2, 3, 1), want["test"][0])


def test_cifar100_download_fetches_torchvisions_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils
    from torchvision.datasets import CIFAR100

    calls = []

    def fake_download(url, root, filename=None, md5=None):
        calls.append((url, root, filename, md5))
        write_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    (x_tr, *_), names = datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path / "c"), download=True))
    assert calls == [(CIFAR100.url, str(tmp_path / "c"), "cifar-100-python.tar.gz", CIFAR100.tgz_md5)]
    assert names == C100_NAMES and len(x_tr) == 12

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not download CIFAR-100 into .*Network is unreachable.*"
                                        "cifar-100-python/ from cifar-100-python.tar.gz.*download = false"):
        datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path / "d"), download=True))


def test_cifar100_missing_offline_names_the_path_and_the_fix(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        data.load(DataConfig(dataset="cifar100", root=str(root), download=False))
    msg = str(e.value)
    assert str(root / "cifar-100-python" / "train") in msg and "CIFAR-100 not found" in msg
    assert "download = true" in msg and "cifar-100-python/" in msg and "\n" not in msg
    # one file missing: that one is named
    write_cifar100(tmp_path / "part")
    (tmp_path / "part" / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"missing .*cifar-100-python/meta\)"):
        datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path / "part")))


class Planted:
    """What a tampered file would carry: an object whose unpickling runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("file", ["train", "meta"])
def test_a_tampered_cifar100_file_is_refused_without_running(tmp_path, file):
    write_cifar100(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / "cifar-100-python" / file, "wb") as f:
        pickle.dump({"data": Planted(marker), "fine_labels": [0], "fine_label_names": Planted(marker)}, f)
    with pytest.raises(DataError) as e:
        datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path)))
    msg = str(e.value)
    assert "names posix.system; refused" in msg and "cifar-100-python.tar.gz again" in msg
    assert str(tmp_path / "cifar-100-python" / file) in msg
    assert not marker.exists() and not (tmp_path / "cifar100_uint8.npz").exists()


def test_cifar100_wrong_label_key_or_shape_is_named(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, f)  # CIFAR-10's key
    with pytest.raises(DataError, match="not a CIFAR-100 batch .*fine_labels"):
        datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path)))
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"data must be N x 3072 uint8 .*\(2, 100\)"):
        datasets.read(DataConfig(dataset="cifar100", root=str(tmp_path)))


# ----------------------------------------------------------------------------- imagefolder

# Sorted, the folders are ant, moth, zebra (labels 0, 1, 2); written in another order.
COLOURS = {"zebra": (90, 90, 90), "ant": (200, 30, 30), "moth": (30, 200, 60)}


def write_png(path: Path, colour: tuple[int, int, int], size=(48, 40)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if len(set(colour)) == 1:  # a grey class is stored as a one-channel PNG: decoded to RGB
        Image.new("L", size, colour[0]).save(path)
    else:
        Image.new("RGB", size, colour).save(path)


def write_folder(root: Path, n_train: int = 4, n_test: int = 2) -> None:
    for cls, colour in COLOURS.items():
        for i in range(n_train):
            write_png(root / "train" / cls / f"{i}.png", colour)
        for i in range(n_test):
            write_png(root / "test" / cls / f"t{i}.PNG", colour)
    (root / "train" / "ant" / "notes.txt").write_text("not an image: left alone")
    (root / "train" / "ant" / "._0.png").write_bytes(b"macOS resource fork: hidden, left alone")


def caches(root: Path) -> list[Path]:
    return sorted(root.glob(".prunetune-cache-24-*.npz"))


def test_imagefolder_decodes_at_image_size_caches_and_rebuilds(tmp_path, monkeypatch):
    from PIL import Image

    write_folder(tmp_path)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(Path(p).name) or real_open(p, *a, **k))
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24, val_fraction=0.25)
    s = data.load(cfg)
    assert s.classes == ["ant", "moth", "zebra"] and s.input_shape == (3, 24, 24)
    assert len(s.train) == 9 and len(s.val) == 3 and len(s.test) == 6 and len(opened) == 18
    for split in (s.train, s.val, s.test):
        assert sorted(split.y.tolist()) == sorted([0, 1, 2] * (len(split) // 3))
        for x, y in zip(split.x.numpy(), split.y.tolist()):  # every pixel its class's colour
            want = np.array(COLOURS[s.classes[y]], np.uint8)[:, None, None]
            assert (x == want).all(), (s.classes[y], x[:, 0, 0])
    assert len(caches(tmp_path)) == 1

    # again: from the cache, no image opened
    opened.clear()
    again = data.load(cfg)
    assert opened == [] and again.classes == s.classes
    assert (again.train.x == s.train.x).all() and (again.test.y == s.test.y).all()

    # a new image: the cache no longer matches; rebuilt (every image decoded again), the old one removed
    old = caches(tmp_path)
    write_png(tmp_path / "train" / "moth" / "new.png", COLOURS["moth"])
    grown = data.load(cfg)
    assert len(opened) == 19 and len(grown.train) + len(grown.val) == 13
    assert len(caches(tmp_path)) == 1 and caches(tmp_path) != old

    # a changed image (same name, other size): rebuilt too
    opened.clear()
    write_png(tmp_path / "test" / "ant" / "t0.PNG", COLOURS["ant"], size=(60, 30))
    data.load(cfg)
    assert len(opened) == 19


def test_imagefolder_crops_the_centre_of_the_shorter_side(tmp_path):
    from PIL import Image

    # 48 x 24: the left and right quarters red, the middle half blue; at 24 the crop is the middle
    img = np.zeros((24, 48, 3), np.uint8)
    img[:, :12] = img[:, 36:] = (255, 0, 0)
    img[:, 12:36] = (0, 0, 255)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(img).save(tmp_path / split / cls / "x.png")
    (x_tr, y_tr, x_te, y_te), names = datasets.read(DataConfig(dataset="imagefolder", root=str(tmp_path),
                                                               image_size=24))
    assert names == ["a", "b"] and x_tr.shape == (2, 24, 24, 3) and list(y_tr) == [0, 1]
    assert (x_tr == (0, 0, 255)).all() and (x_te == (0, 0, 255)).all()


def test_imagefolder_test_may_hold_a_subset_of_the_classes(tmp_path):
    write_folder(tmp_path)
    for f in (tmp_path / "test" / "ant").iterdir():
        f.unlink()
    (tmp_path / "test" / "ant").rmdir()
    (_, y_tr, x_te, y_te), names = datasets.read(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24))
    assert names == ["ant", "moth", "zebra"] and sorted(set(y_tr)) == [0, 1, 2] and sorted(y_te) == [1, 1, 2, 2]
    assert (x_te[y_te == 2] == 90).all()  # zebra is still label 2


def test_imagefolder_works_without_a_cache_where_root_is_read_only(tmp_path, monkeypatch):
    write_folder(tmp_path)

    def read_only(*a, **k):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(np, "savez", read_only)
    (x_tr, *_), names = datasets.read(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24))
    assert len(x_tr) == 12 and names == ["ant", "moth", "zebra"]
    assert caches(tmp_path) == [] and not list(tmp_path.glob(".prunetune-cache*"))  # no temporary left either


def test_imagefolder_a_corrupt_cache_is_rebuilt(tmp_path):
    write_folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24)
    first = datasets.read(cfg)[0][0]
    (cache,) = caches(tmp_path)
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    np.testing.assert_array_equal(datasets.read(cfg)[0][0], first)
    assert cache.stat().st_size > 1000


def test_imagefolder_needs_image_size(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(DataError, match=r"imagefolder .*set \[data\] image_size"):
        data.load(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_imagefolder_a_file_pil_cannot_decode_is_named(tmp_path):
    write_folder(tmp_path)
    bad = tmp_path / "train" / "moth" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError) as e:
        data.load(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24))
    assert str(bad) in str(e.value) and "not an image PIL can decode" in str(e.value)
    assert caches(tmp_path) == []


def test_imagefolder_a_test_class_missing_from_train_is_named(tmp_path):
    write_folder(tmp_path)
    write_png(tmp_path / "test" / "bat" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"has class folder\(s\) \['bat'\] that .*train lacks"):
        data.load(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24))


def test_imagefolder_empty_or_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r"imagefolder: .*nowhere/train not found; \[data\] root must"):
        datasets.read(DataConfig(dataset="imagefolder", root=str(tmp_path / "nowhere"), image_size=24))
    write_folder(tmp_path)
    (tmp_path / "train" / "wasp").mkdir()
    (tmp_path / "train" / "wasp" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"train/wasp holds no images \(.png"):
        datasets.read(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=24))


def test_unknown_dataset_lists_all_five():
    with pytest.raises(DataError, match="use digits, npz, cifar10, cifar100 or imagefolder"):
        datasets.read(DataConfig(dataset="svhn"))


def test_an_empty_split_is_named():
    x = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="x_test is empty"):
        datasets.check_arrays("here", x, np.array([0, 1, 0, 1]), x[:0], np.zeros(0, np.int64))
