"""The ``imagefolder`` source: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` image files
(png, jpg, bmp, webp, ...; class names are the training folders, sorted), read into the four
checked uint8 arrays of :mod:`trainables.datasets`.

Every image is decoded with PIL at ``[data] image_size`` (required: shorter side resized, then
centre-cropped), since a folder of photos of many sizes has no size "as stored". Decoding is slow,
so the arrays are cached once beside the folders, ``ROOT/.prunetune-cache-<size>-<hash>.npz``,
keyed by every file's path, size and modification time: adding, removing or changing an image
rebuilds it. A read-only ROOT works without the cache.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from trainables.datasets import Arrays, _read_cache, _write_cache, check_arrays
from trainables.errors import DataError

# The file types imagefolder reads (torchvision's ImageFolder's list, plus gif); anything else in a
# class folder (notes, thumbnails' databases) is left alone, as are hidden files and folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
PROGRESS_EVERY = 1000  # decoded images between progress lines on stderr (none for smaller folders)


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (its subfolders too, as torchvision's ImageFolder), sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _decode(path: Path, size: int) -> np.ndarray:
    """One image file as ``size`` x ``size`` x 3 uint8: RGB, shorter side resized to ``size``
    (bilinear; PIL antialiases when shrinking), then the centre ``size`` x ``size`` cut out."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, ValueError, bombs)
        raise DataError(f"{path} is not an image PIL can decode ({type(e).__name__}: {str(e)[:120]}); "
                        "replace or remove the file") from None


def _images(root_p: Path) -> tuple[list[str], list[tuple[int, int, Path]]]:
    """The class names (the training folders, sorted) and (split index, label, file) for every
    image, in a fixed order (split, class, path); a :class:`DataError` naming the folder and the
    fix unless ``root_p`` holds train/ and test/ class folders of images."""
    train_dir, test_dir = root_p / "train", root_p / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"imagefolder: {d} not found; [data] root must be a folder holding train/<class>/ and "
                            "test/<class>/ folders of images (one folder per class)")
    classes = [p.name for p in _class_folders(train_dir)]
    if len(classes) < 2:
        raise DataError(f"imagefolder: {train_dir} has {len(classes)} class folder(s) {classes}; a classifier needs "
                        "at least two (train/<class>/ holds that class's images)")
    test_classes = [p.name for p in _class_folders(test_dir)]
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise DataError(f"imagefolder: {test_dir} has class folder(s) {extra} that {train_dir} lacks; every test "
                        "class needs training images: add them under train/ or remove the test folder(s)")
    items: list[tuple[int, int, Path]] = []
    for split, split_dir, names in ((0, train_dir, classes), (1, test_dir, test_classes)):
        for name in names:
            files = _image_files(split_dir / name)
            if not files:
                raise DataError(f"imagefolder: {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                "add images or remove the folder")
            items += [(split, classes.index(name), f) for f in files]
    if not any(split == 1 for split, _, _ in items):
        raise DataError(f"imagefolder: {test_dir} has no class folders; put test images in test/<class>/ folders")
    return classes, items


def load(root: str, image_size: int) -> tuple[Arrays, list[str]]:
    """``root``/train/<class>/* and ``root``/test/<class>/* decoded at ``image_size``, from the
    cache beside them when no file changed since it was written."""
    if image_size <= 0:
        raise DataError("imagefolder decodes every image at one size and needs it: set [data] image_size "
                        "(e.g. 32, or 224 for photos) to the side of the square images the model trains on")
    root_p = Path(root)
    classes, items = _images(root_p)
    key = hashlib.sha256(f"imagefolder v1 {image_size}\n".encode())
    for _, _, f in items:
        st = f.stat()
        key.update(f"{f.relative_to(root_p).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    cache = root_p / f".prunetune-cache-{image_size}-{key.hexdigest()[:16]}.npz"
    cached = _read_cache(cache)
    if cached is not None and cached[1] == classes and cached[0][0].shape[1:3] == (image_size, image_size):
        return cached[0], classes

    x = np.empty((len(items), image_size, image_size, 3), np.uint8)
    for i, (_, _, f) in enumerate(items):
        x[i] = _decode(f, image_size)
        if (i + 1) % PROGRESS_EVERY == 0:
            print(f"imagefolder: decoded {i + 1}/{len(items)} images of {root_p} at {image_size} x {image_size}",
                  file=sys.stderr, flush=True)
    split_of = np.array([s for s, _, _ in items])
    y = np.array([label for _, label, _ in items], dtype=np.int64)
    arrays = (x[split_of == 0], y[split_of == 0], x[split_of == 1], y[split_of == 1])
    check_arrays(str(root_p), *arrays, num_classes=len(classes))
    if _write_cache(cache, arrays, classes):  # a read-only root works, decoding every time
        for old in root_p.glob(f".prunetune-cache-{image_size}-*.npz"):
            if old != cache:  # the files changed since: that cache can never match again
                try:
                    old.unlink(missing_ok=True)
                except OSError:
                    pass
    return arrays, classes
