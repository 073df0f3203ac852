"""A user's own images: ``imagefolder:PATH`` with PATH/train/CLASS/* and PATH/val/CLASS/* (or test/), held in
memory when they fit, else streamed from disk (:class:`ImageFiles`)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kd.data.tensors import BatchTransform, DataSplit, DatasetInfo, ImageTensors
from kd.errors import KDError


IMAGEFOLDER_PREFIX = "imagefolder:"
#: imagefolder sets whose decoded uint8 images (train + test) take at most this many bytes are held in memory.
IN_MEMORY_LIMIT_BYTES = 2 * 1024 ** 3
#: Streamed imagefolder sets measure mean and std on this many training images, evenly spaced.
STREAM_STATS_IMAGES = 4096
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("L", "1")  # PIL modes that count as grayscale


def image_folder_path(name: str) -> Path | None:
    """PATH of an ``imagefolder:PATH`` data set name, None for any other name."""
    if not name.lower().startswith(IMAGEFOLDER_PREFIX):
        return None
    rest = name[len(IMAGEFOLDER_PREFIX):].strip()
    if not rest:
        raise KDError("imagefolder: needs a folder: --dataset imagefolder:PATH with PATH/train/CLASS/* and PATH/val/CLASS/*")
    return Path(rest).expanduser()


def _class_folders(split: Path) -> list[str]:
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files (by extension) under ``folder``, sub-folders included, hidden ones skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def scan_image_folder(path: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]], Path]:
    """Class names and (file, label) lists of train and val (or test), every layout mistake a KDError."""
    layout = f"lay out your images as {path}/train/CLASS/* and {path}/val/CLASS/* (or test/CLASS/*)"
    if not path.is_dir():
        raise KDError(f"image folder {path} " + ("is not a folder" if path.exists() else "does not exist") + f"; {layout}")
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise KDError(f"{path} has no train/ folder; {layout}")
    test_dir = next((path / n for n in ("val", "test") if (path / n).is_dir()), None)
    if test_dir is None:
        raise KDError(f"{path} has no val/ or test/ folder; {layout}")
    classes, test_classes = _class_folders(train_dir), _class_folders(test_dir)
    for c in classes:
        if c not in test_classes:
            raise KDError(f"class folder '{c}' is in {train_dir} but not in {test_dir}; every class needs a folder in both")
    for c in test_classes:
        if c not in classes:
            raise KDError(f"class folder '{c}' is in {test_dir} but not in {train_dir}; every class needs a folder in both")
    splits = []
    for split in (train_dir, test_dir):
        files = [(f, k) for k, c in enumerate(classes) for f in _image_files(split / c)]
        if not files:
            raise KDError(f"{split} holds no images (files ending {', '.join(IMAGE_EXTENSIONS)} in its class folders); {layout}")
        splits.append(files)
    counts = np.bincount([k for _, k in splits[0]], minlength=len(classes))
    if (counts == 0).any():
        raise KDError(f"{train_dir / classes[int(np.argmin(counts))]} holds no images; add some or remove the class folder")
    return classes, splits[0], splits[1], test_dir


def _unreadable(path: Path, e: Exception) -> KDError:
    why = (str(e).splitlines() or [""])[0] or type(e).__name__
    return KDError(f"cannot read image {path} ({why}); replace or remove the file")


def _image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and PIL mode of an image file, read from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise _unreadable(path, e) from None


def decode_image(path: Path | str, size: int, mode: str) -> np.ndarray:
    """The image as uint8 H x W x C: converted to ``mode`` (L or RGB), resized (bilinear) to size x size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode) if im.mode != mode else im
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            a = np.array(im, dtype=np.uint8)
    except Exception as e:  # truncated or corrupt data shows up only when decoding
        raise _unreadable(Path(path), e) from None
    return a.reshape(size, size, -1)


def _parallel_map(fn, items: list) -> list:
    """``fn`` over ``items`` in threads (PIL decodes without the GIL); the first error is raised."""
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def _decode_many(paths: list[Path], size: int, mode: str) -> torch.Tensor:
    """Decoded images as one uint8 tensor N x C x size x size."""
    channels = 1 if mode == "L" else 3
    out = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)

    def put(i: int) -> None:
        out[i] = torch.from_numpy(decode_image(paths[i], size, mode)).permute(2, 0, 1)

    _parallel_map(put, list(range(len(paths))))
    return out


def channel_mean_std(images: torch.Tensor, scale: float = 255.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images N x C x H x W divided by ``scale``.

    Sums are exact int64 over chunks (no float copy of the whole set). A channel with no
    spread at all gets std 1.0, so normalising never divides by zero.
    """
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    per_image = max(1, images[0].numel()) if len(images) else 1
    chunk = max(1, (1 << 22) // per_image)
    for start in range(0, len(images), chunk):
        x = images[start: start + chunk].to(torch.int64)
        s1 += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = images.numel() // c
    mean = s1.double() / (n * scale)
    var = (s2.double() / (n * scale * scale) - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class ImageFiles(torch.utils.data.Dataset):
    """Images decoded from their files per item, for folder sets too large to hold in memory.

    Each item is (normalised float C x size x size, label): converted to ``mode``, resized,
    then (while ``augment``) padded-and-cropped and flipped with the global torch RNG (which
    DataLoader seeds per worker), then normalised with the data set's mean and std.
    """

    def __init__(self, files: list[tuple[Path, int]], classes: list[str], size: int, mode: str,
                 mean: Sequence[float], std: Sequence[float], crop_padding: int = 0, flip: bool = False,
                 augment: bool = False):
        self.paths = [str(f) for f, _ in files]
        self.targets = [int(k) for _, k in files]
        self.classes = list(classes)
        self.size, self.mode = int(size), mode
        self.transform = BatchTransform(255.0, mean, std, crop_padding, flip)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(decode_image(self.paths[i], self.size, self.mode)).permute(2, 0, 1).unsqueeze(0)
        return self.transform(x, self.augment)[0], self.targets[i]


def default_folder_model(size: int, channels: int) -> str:
    """Small-input ResNet-18 up to 64 px; above, the ImageNet-stem ResNet-18 (timm's for 1 channel)."""
    if size <= 64:
        return "resnet18"
    return "torchvision:resnet18" if channels == 3 else "timm:resnet18"


def load_image_folder(path: Path, image_size: int | None = None) -> DataSplit:
    """A user's images in PATH/train/CLASS/* and PATH/val/CLASS/* (test/ when there is no val/).

    Classes are the train/ folder names, sorted. Every image is resized (bilinear, aspect
    not kept) to a square of ``image_size``, default the larger side of the first training
    image. Grayscale (1 channel) when every training image is PIL mode L or 1, else RGB
    (3 channels; other images converted). Mean and std are measured on the training images
    (all of them when held in memory; :data:`STREAM_STATS_IMAGES` evenly spaced ones when
    streamed). The set is held in memory as uint8 :class:`ImageTensors` when train + test
    take at most :data:`IN_MEMORY_LIMIT_BYTES`, else streamed as :class:`ImageFiles`.
    Augmentation: pad-and-crop by size // 8 and horizontal flips.
    """
    path = path.resolve()
    classes, train_files, test_files, _ = scan_image_folder(path)
    headers = _parallel_map(_image_header, [f for f, _ in train_files + test_files])
    (w, h), _ = headers[0]
    size = image_size or max(w, h)
    gray = all(m in GRAY_MODES for _, m in headers[:len(train_files)])
    mode, channels = ("L", 1) if gray else ("RGB", 3)
    in_memory = (len(train_files) + len(test_files)) * channels * size * size <= IN_MEMORY_LIMIT_BYTES
    if in_memory:
        xtr = _decode_many([f for f, _ in train_files], size, mode)
        xte = _decode_many([f for f, _ in test_files], size, mode)
        mean, std = channel_mean_std(xtr)
    else:
        pick = np.unique(np.linspace(0, len(train_files) - 1, min(len(train_files), STREAM_STATS_IMAGES)).round().astype(int))
        mean, std = channel_mean_std(_decode_many([train_files[i][0] for i in pick], size, mode))
    info = DatasetInfo(IMAGEFOLDER_PREFIX + str(path), len(classes), channels, size, mean, std,
                       default_folder_model(size, channels), size // 8, True, list(classes))
    if in_memory:
        labels = lambda files: torch.tensor([k for _, k in files], dtype=torch.int64)
        return DataSplit(ImageTensors(xtr, labels(train_files)), ImageTensors(xte, labels(test_files)), info)
    train = ImageFiles(train_files, classes, size, mode, mean, std, info.crop_padding, info.flip, augment=True)
    test = ImageFiles(test_files, classes, size, mode, mean, std)
    return DataSplit(train, test, info)
