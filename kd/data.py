"""Data sets by name, held as tensors and augmented per batch.

In-memory sets (digits, MNIST, Fashion-MNIST, CIFAR, SVHN) are one uint8 tensor N x C x H x W;
a :class:`TensorLoader` slices batches from it and applies pad-and-crop and flips to the
whole batch at once, so no per-sample Python or PIL work sits on the hot path. Folder
sets (TinyImageNet, ImageNet-100, Animals-10N) stream through torchvision's ImageFolder.
A user's own ``imagefolder:PATH`` is held in memory when it fits, else streamed from disk
(:class:`ImageFiles`). Nothing is downloaded unless the caller asks for it.
"""
from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from kd.errors import KDError

DEFAULT_ROOT_ENV = "KD_DATA_ROOT"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageTensors:
    """An in-memory image set: uint8 (or float) images N x C x H x W, int64 labels.

    ``ids``: each image's position in the set it was taken from (a validation split keeps
    them, so a per-sample source such as a cached teacher reads the right rows); None: 0..N-1.
    """

    images: torch.Tensor
    labels: torch.Tensor
    scale: float = 255.0  # images / scale lies in [0, 1]
    ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_model: str
    crop_padding: int = 0
    flip: bool = False
    class_names: list[str] = field(default_factory=list)
    preprocess: str = "matched"  # "paper": the authors' released pipeline (see PREPROCESS_PAPER)


@dataclass
class DataSplit:
    """Train and test data plus what a model and a loader need to know about them."""

    train: object  # ImageTensors, or any map-style Dataset of (input, label)
    test: object
    info: DatasetInfo


# ---------------------------------------------------------------------------------------
# Batch-level augmentation and the tensor loader


class BatchTransform:
    """Per-batch augmentation (pad-and-crop, horizontal flip) then scaling and normalisation."""

    def __init__(self, scale: float, mean: Sequence[float], std: Sequence[float],
                 crop_padding: int = 0, flip: bool = False):
        self.scale = float(scale)
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / scale - mean) / std as one multiply-add per channel
        self.mul, self.add = 1.0 / (self.scale * std), -mean / std
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.workspace: dict = {}

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __call__(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.mul.device != x.device:
            self.mul, self.add = self.mul.to(x.device), self.add.to(x.device)
        if x.dtype == torch.float64:  # the result is float32, as x.float() made it
            x = x.float()
        if train and self.augments:
            return self._augment_normalised(x, generator)
        # torch.mul casts the uint8 batch to float inside the multiply: one pass fewer than
        # x.float().mul_(...), same values (float(x) * mul, then + add)
        return torch.mul(x, self.mul).add_(self.add)

    def _augment_normalised(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Normalise into the inside of a float padded buffer, then crop and flip with one gather.

        The same values as :func:`augment_batch` followed by normalisation (the gather only moves
        values, and the border holds the normalised zero, ``add``), with the same random draws in
        the same order; it saves the uint8 padded copy and the separate float conversion
        (tests/test_loader_fast.py checks it against augment_batch then normalise).
        """
        b, c, h, w = x.shape
        p = self.crop_padding
        ws = self.workspace
        key = ("normalised", x.shape, x.device, p)
        if ws.get("shape") != key:
            ws.clear()
            ws["shape"] = key
            ws["padded"] = self.add.expand(b, c, h + 2 * p, w + 2 * p).contiguous()  # the border: normalised 0
            ws.update(_index_workspace(b, h, w, p, x.device))
        xp = ws["padded"]
        inside = xp[:, :, p:p + h, p:p + w]
        torch.mul(x, self.mul, out=inside).add_(self.add)
        return _gather_crop(xp, _crop_index(b, h, w, p, self.flip, generator, ws), h, w)


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None,
                  workspace: dict | None = None) -> torch.Tensor:
    """Random pad-and-crop (zero padding) and horizontal flip, drawn per sample, done as one gather.

    Each output pixel's source position in the padded image is computed for the whole batch, so
    the work is one copy into a zero-bordered buffer and one gather. With a ``workspace`` dict the
    padded image and the int64 gather index live in buffers reused from batch to batch: fresh
    allocations of that size cost page faults on every batch (measured with `kd loader-bench`).
    :class:`BatchTransform` does the same crop on the normalised batch (same draws, same values).
    """
    b, c, h, w = x.shape
    dev = x.device
    ws = workspace if workspace is not None else {}
    if ws.get("shape") != (x.shape, x.dtype, dev, padding):
        ws.clear()
        ws.update(shape=(x.shape, x.dtype, dev, padding),
                  padded=torch.zeros(b, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype, device=dev),
                  **_index_workspace(b, h, w, padding, dev))
    xp = ws["padded"]
    xp[:, :, padding:padding + h, padding:padding + w].copy_(x)  # the border stays zero
    return _gather_crop(xp, _crop_index(b, h, w, padding, flip, generator, ws), h, w)


def _index_workspace(b: int, h: int, w: int, padding: int, dev) -> dict:
    wp = w + 2 * padding
    return dict(index=torch.empty(b, h, w, dtype=torch.long, device=dev),
                rows=(torch.arange(h, device=dev) * wp).view(1, h, 1),
                cols=torch.arange(w, device=dev).view(1, 1, w))


def _crop_index(b: int, h: int, w: int, padding: int, flip: bool, generator, ws: dict) -> torch.Tensor:
    """B x H x W flat positions in the padded image: per sample a mirror draw (if ``flip``), then
    the row and column offsets (if ``padding``), drawn from ``generator`` in that order.

    The offsets go into the small per-sample row and column tables first, so the full-size
    index takes one add. (Two gathers, rows then columns, with broadcast index views and no
    full-size index, measured slower on CPU.)"""
    dev = ws["index"].device
    wp = w + 2 * padding
    rows, cols = ws["rows"], ws["cols"]
    if flip:
        mirror = (torch.rand(b, device=dev, generator=generator) < 0.5).view(b, 1, 1)
        cols = torch.where(mirror, (w - 1) - cols, cols)
    if padding > 0:
        di = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=dev, generator=generator)
        dj = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=dev, generator=generator)
        rows, cols = rows + di * wp, cols + dj
    return torch.add(rows.expand(b, h, 1), cols.expand(b, 1, w), out=ws["index"])


def _gather_crop(xp: torch.Tensor, index: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, c, hp, wp = xp.shape
    return xp.view(b, c, hp * wp).gather(2, index.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


class TensorLoader:
    """Batches (x, y, index) from tensors already in memory; shards by rank for multi-process runs."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, drop_last: bool = False, transform: BatchTransform | None = None,
                 train: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", ids: torch.Tensor | None = None):
        self.device = torch.device(device)
        self.inputs = inputs.to(self.device)
        self.labels = labels.to(self.device)
        self.ids = ids.to(self.device) if ids is not None else None  # sample ids yielded instead of positions
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.train = shuffle, drop_last, train
        self.transform = transform
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed * 1000 + rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)  # same on every rank
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per = n // self.world_size if self.drop_last else -(-n // self.world_size)
            order = torch.cat([order, order[: per * self.world_size - n]]) if per * self.world_size > n else order
            order = order[self.rank: per * self.world_size: self.world_size]
        return order.to(self.device)

    def __len__(self) -> int:
        n = len(self.labels) // self.world_size if self.world_size > 1 else len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start: start + self.batch_size]
            x = self.inputs.index_select(0, idx)  # 3 vs 29 us for inputs[idx] (uint8, 128 x 1 x 28 x 28)
            if self.transform is not None:
                x = self.transform(x, self.train, self.generator)
            yield x, self.labels.index_select(0, idx), (idx if self.ids is None else self.ids.index_select(0, idx))


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style data set so that each item also carries its index (the base's ``ids`` entry, when it
    keeps each sample's position in a larger set, as a validation split does)."""

    def __init__(self, base):
        self.base = base
        self.ids = getattr(base, "ids", None)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return x, y, (i if self.ids is None else int(self.ids[i]))


# ---------------------------------------------------------------------------------------
# The registry


def _digits(root: Path | None, download: bool):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # N x 1 x 8 x 8, values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=0)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return ImageTensors(x[tr], y[tr], 16.0), ImageTensors(x[te], y[te], 16.0)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise KDError(f"{path} is not an IDX file (bad magic number); re-install the data set")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if data[2] != 0x08:
        raise KDError(f"{path}: expected unsigned bytes (type 0x08), found type {data[2]:#x}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise KDError(f"{path} is truncated: {arr.size} values for shape {dims}; re-install the data set")
    return arr.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


#: The four IDX files of MNIST and Fashion-MNIST (each may carry a .gz suffix).
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_images_and_labels(images: Path, labels: Path) -> ImageTensors:
    """One split of 28 x 28 ten-class IDX data, checked for shape and agreement of the two files."""
    x, y = _read_idx(images), _read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise KDError(f"{images}: expected N x 28 x 28 images, found shape {list(x.shape)}; re-install the data set")
    if y.ndim != 1 or len(y) != len(x):
        raise KDError(f"{labels} holds {y.size} labels for the {len(x)} images of {images.name}; re-install the data set")
    if y.size and int(y.max()) > 9:
        raise KDError(f"{labels}: label {int(y.max())} is outside 0..9; re-install the data set")
    return ImageTensors(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))


def _idx_split(folder: Path) -> tuple[ImageTensors, ImageTensors] | None:
    """(train, test) from the four IDX files in ``folder``; None when any of them is missing."""
    files = [_find_idx(folder, s) for s in IDX_STEMS]
    if not all(files):
        return None
    return _idx_images_and_labels(files[0], files[1]), _idx_images_and_labels(files[2], files[3])


def fashion_mnist_candidates(root: Path | None) -> list[Path]:
    """Where Fashion-MNIST's IDX files are looked for, in order."""
    places = []
    if root is not None:
        places += [root, root / "FashionMNIST" / "raw"]
    places.append(FASHION_MNIST_DEBIAN)
    default = _default_root()
    places.append(default / "FashionMNIST" / "raw")
    return places


def _fashion_mnist(root: Path | None, download: bool):
    places = fashion_mnist_candidates(root)
    if download and root is not None:
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), download=True)
    for place in places:
        split = _idx_split(place)
        if split is not None:
            return split
    raise KDError(
        "Fashion-MNIST not found: looked in " + ", ".join(str(p) for p in places)
        + "; install it with `apt-get install dataset-fashion-mnist`, or pass --data-root DIR --download"
    )


def mnist_folder(root: Path | None) -> Path:
    """Where MNIST's IDX files must lie: torchvision's layout ROOT/MNIST/raw (ROOT: --data-root or the default)."""
    return (root if root is not None else _default_root()) / "MNIST" / "raw"


def _mnist(root: Path | None, download: bool):
    """MNIST from its four IDX files (gzipped or not) in ROOT/MNIST/raw; only that folder, nothing downloaded.

    Files lying directly in ROOT are not looked at: Fashion-MNIST's files carry the same names.
    """
    folder = mnist_folder(root)
    split = _idx_split(folder)
    if split is None:
        missing = next(s for s in IDX_STEMS if _find_idx(folder, s) is None)
        raise KDError(
            f"MNIST not found: no {folder / missing}[.gz]; put the four IDX files in torchvision's layout "
            f"ROOT/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] with ROOT given by --data-root "
            f"(default ${DEFAULT_ROOT_ENV} or ./data); proxykd does not download MNIST"
        )
    return split


def _torchvision_tensors(cls_name: str, folder_hint: str):
    def load(root: Path | None, download: bool):
        import torchvision

        root = root or _default_root()
        cls = getattr(torchvision.datasets, cls_name)
        try:
            if cls_name == "SVHN":
                tr = cls(str(root), split="train", download=download)
                te = cls(str(root), split="test", download=download)
                to = lambda d: ImageTensors(torch.from_numpy(d.data), torch.from_numpy(d.labels.astype(np.int64)))
            else:
                tr = cls(str(root), train=True, download=download)
                te = cls(str(root), train=False, download=download)
                to = lambda d: ImageTensors(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                                            torch.tensor(d.targets, dtype=torch.int64))
        except RuntimeError as e:
            raise KDError(
                f"{cls_name} not found under {root / folder_hint} ({str(e).splitlines()[0]}); "
                f"place it there, or pass --data-root DIR --download to fetch it"
            ) from None
        return to(tr), to(te)

    return load


def _image_folder(folder: str, size: int):
    def load(root: Path | None, download: bool):
        import torchvision
        from torchvision import transforms as T

        base = (root or _default_root()) / folder
        if download:
            raise KDError(f"{folder} cannot be downloaded by proxykd; put it in ImageFolder layout under {base}/train and {base}/val")
        missing = [s for s in ("train", "val") if not (base / s).is_dir()]
        if missing:
            raise KDError(f"{folder} not found: no {base}/{missing[0]}; lay it out as {base}/train/CLASS/*.jpg and {base}/val/CLASS/*.jpg")
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if size <= 64:
            train_tf = T.Compose([T.Resize(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(), norm])
            test_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
        else:
            train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
            test_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
        tr = torchvision.datasets.ImageFolder(str(base / "train"), transform=train_tf)
        te = torchvision.datasets.ImageFolder(str(base / "val"), transform=test_tf)
        return tr, te

    return load


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
#: The usual MNIST constants: mean and std of the 60,000 training images' pixels / 255.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

#: name -> (info, loader). Loaders take (root or None, download) and return (train, test).
REGISTRY: dict[str, tuple[DatasetInfo, Callable]] = {
    "digits": (DatasetInfo("digits", 10, 1, 8, (0.3052,), (0.3760,), "lenet",
                           class_names=[str(i) for i in range(10)]), _digits),
    "mnist": (DatasetInfo("mnist", 10, 1, 28, MNIST_MEAN, MNIST_STD, "lenet", 2, False,
                          [str(i) for i in range(10)]), _mnist),
    "fashion-mnist": (DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "lenet", 2, True,
                                  FASHION_CLASSES), _fashion_mnist),
    "cifar10": (DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                            "resnet18", 4, True, CIFAR10_CLASSES), _torchvision_tensors("CIFAR10", "cifar-10-batches-py")),
    "cifar100": (DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                             "resnet18", 4, True), _torchvision_tensors("CIFAR100", "cifar-100-python")),
    "svhn": (DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "lenet", 2, False,
                         [str(i) for i in range(10)]), _torchvision_tensors("SVHN", "train_32x32.mat")),
    "tinyimagenet": (DatasetInfo("tinyimagenet", 200, 3, 64, IMAGENET_MEAN, IMAGENET_STD, "resnet18"),
                     _image_folder("tiny-imagenet-200", 64)),
    "animals10n": (DatasetInfo("animals10n", 10, 3, 64, IMAGENET_MEAN, IMAGENET_STD, "resnet18"),
                   _image_folder("animals10n", 64)),
    "imagenet100": (DatasetInfo("imagenet100", 100, 3, 224, IMAGENET_MEAN, IMAGENET_STD, "torchvision:resnet18"),
                    _image_folder("imagenet100", 224)),
}
ALIASES = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "tiny-imagenet": "tinyimagenet",
           "imagenet-100": "imagenet100", "animals-10n": "animals10n"}


def _default_root() -> Path:
    return Path(os.environ.get(DEFAULT_ROOT_ENV, "data"))


def dataset_info(name: str) -> DatasetInfo:
    """The fixed description of a registered data set (``imagefolder:PATH`` sets are described when loaded)."""
    if image_folder_path(name) is not None:
        raise KDError(f"'{name}' is described by its images: use load_dataset, which measures its size, classes and mean/std")
    if name.lower().startswith("text:"):
        raise KDError(f"'{name}' is described by its files: use load_dataset, which reads its classes and tokenizer")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise KDError(f"unknown data set '{name}'; choose one of {', '.join(REGISTRY)}, imagefolder:PATH or text:PATH")
    return REGISTRY[key][0]


def _check_image_size(image_size) -> int | None:
    if image_size is None:
        return None
    try:
        size = int(image_size)
        whole = size == float(image_size) and not isinstance(image_size, bool)
    except (TypeError, ValueError):
        size, whole = 0, False
    if not whole or size < 1:
        raise KDError(f"--image-size must be a positive whole number of pixels, got {image_size!r}")
    return size


PREPROCESS = ("matched", "paper")


def load_dataset(name: str, root: str | Path | None = None, download: bool = False, *,
                 image_size: int | None = None, preprocess: str = "matched", text=None) -> DataSplit:
    """Load a data set by name. ``root`` defaults to $KD_DATA_ROOT or ./data.

    ``text:PATH`` loads a user's own text (see :func:`kd.text.load_text_folder`), read and encoded as
    ``text`` (a :class:`kd.text.TextOptions`; None: the defaults) says.

    ``imagefolder:PATH`` loads a user's own folders (see :func:`load_image_folder`; ``root``
    does not apply, PATH is taken as given); ``image_size`` is the square side its images
    are resized to (default: the first training image's). Registered sets have a fixed size.
    ``preprocess``: ``matched`` (proxykd's: training and test images prepared alike) or
    ``paper`` (the authors' released pipeline, a reproduction aid: see :func:`paper_preprocess`).
    """
    size = _check_image_size(image_size)
    if preprocess not in PREPROCESS:
        raise KDError(f"--preprocess must be one of {', '.join(PREPROCESS)}, got '{preprocess}'")
    if name.lower().startswith("text:"):
        from kd.text import load_text_folder, text_path

        if download or size is not None or preprocess != "matched":
            raise KDError("--download, --image-size and --preprocess paper do not apply to text:PATH data sets; drop them")
        return load_text_folder(text_path(name), text)
    folder = image_folder_path(name)
    if preprocess == "paper" and (folder is not None or dataset_info(name).name not in PAPER_PIPELINES):
        raise KDError(f"--preprocess paper reproduces the authors' released pipeline for "
                      f"{', '.join(PAPER_PIPELINES)} only (where it differs from proxykd's); drop it for '{name}'")
    if folder is not None:
        if download:
            raise KDError("--download does not apply to imagefolder:PATH data sets (nothing to fetch); drop it")
        return load_image_folder(folder, size)
    info = dataset_info(name)
    if size is not None and size != info.image_size:
        raise KDError(f"--image-size applies to imagefolder:PATH data sets only; {info.name} images are "
                      f"{info.image_size}x{info.image_size}, drop --image-size")
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir() and not download:
            raise KDError(f"data root {root} does not exist; create it and put the data set there, or add --download")
    train, test = REGISTRY[info.name][1](root, download)
    if not info.class_names:
        classes = getattr(train, "classes", None)
        info = replace(info, class_names=list(classes) if classes else [str(i) for i in range(info.num_classes)])
    split = DataSplit(train, test, info)
    return paper_preprocess(split) if preprocess == "paper" else split


def load_dataset_of_run(meta: dict, root: str | Path | None = None, run_dir: str | Path | None = None) -> DataSplit:
    """The data set a finished run was trained on, prepared as it was (``summary.json``'s dataset,
    preprocess and, for image folders, image size; for text, the columns and the tokenizer file kept in
    ``run_dir``)."""
    name = meta["dataset"]
    if name.lower().startswith("text:"):
        from kd.text import run_text_options

        return load_dataset(name, root, text=run_text_options(meta, run_dir))
    size = meta.get("image_size") if image_folder_path(name) is not None else None
    return load_dataset(name, root, image_size=size, preprocess=meta.get("preprocess", "matched"))


# ---------------------------------------------------------------------------------------
# The authors' pipeline (a reproduction aid) and validation splits


def reflect_pad(images: torch.Tensor, p: int) -> torch.Tensor:
    """Reflect-pad N x C x H x W images by ``p`` on every side, edge not repeated (numpy's and
    torchvision's ``Pad(padding_mode='reflect')``), by index: works on uint8 and keeps the values."""
    def index(n: int) -> torch.Tensor:
        i = torch.arange(-p, n + p).abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)

    return images.index_select(2, index(images.shape[2])).index_select(3, index(images.shape[3]))


def resize_bilinear_pil(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 1 x H x W images resized to size x size by PIL's bilinear filter, one image at a time:
    what torchvision's ``Resize([size, size])`` does to the PIL images its data sets return."""
    from PIL import Image

    out = torch.empty(len(images), 1, size, size, dtype=torch.uint8)
    for i, x in enumerate(images[:, 0].numpy()):
        out[i, 0] = torch.from_numpy(np.array(Image.fromarray(x).resize((size, size), Image.BILINEAR)))  # 2-D uint8: mode L
    return out


def _paper_fashion_mnist(split: DataSplit) -> DataSplit:
    """The authors' released Fashion-MNIST loader: training images reflect-padded 28 -> 32 (their
    random 32 x 32 crop of a 32 x 32 image is then the identity) and flipped; test images *resized*
    28 -> 32 (bilinear); both normalised with mean 0.5, std 0.5. The test objects are thus 8/7 larger
    than any training object: a train/test mismatch that costs LeNet about 8 points."""
    tr, te = split.train, split.test
    train = replace(tr, images=reflect_pad(tr.images, 2))
    test = replace(te, images=resize_bilinear_pil(te.images, 32))
    info = replace(split.info, image_size=32, mean=(0.5,), std=(0.5,), crop_padding=0, flip=True, preprocess="paper")
    return DataSplit(train, test, info)


#: data set -> its ``--preprocess paper`` pipeline; only where the authors' differs from proxykd's in kind.
PAPER_PIPELINES: dict[str, Callable[[DataSplit], DataSplit]] = {"fashion-mnist": _paper_fashion_mnist}


def paper_preprocess(split: DataSplit) -> DataSplit:
    """``split`` prepared as the authors' released code prepares it (a reproduction aid, not a
    recommended setting: it is how the paper's numbers were measured, mismatch included)."""
    return PAPER_PIPELINES[split.info.name](split)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0,
                       flag: str = "--val-fraction") -> torch.Tensor:
    """A boolean mask over ``labels`` holding out ``fraction`` of each class (seeded), the validation part."""
    g = torch.Generator().manual_seed(int(seed))
    held = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        n_val = int(round(fraction * len(members)))
        if n_val < 1 or n_val >= len(members):
            raise KDError(f"{flag} {fraction} leaves class {c} ({len(members)} training samples) "
                          f"with an empty training or validation part; choose another fraction")
        held.append(members[torch.randperm(len(members), generator=g)[:n_val]])
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    val_mask[torch.cat(held)] = True
    return val_mask


def validation_split(split: DataSplit, fraction: float, seed: int = 0) -> DataSplit:
    """Hold out ``fraction`` of each class of the training set (seeded) as the evaluation set.

    The result's ``train`` is the rest, its ``test`` the held-out part, un-augmented like a test
    set; the real test set is dropped, so nothing chosen on this split has seen it. Each part
    keeps the images' positions in the full training set (``ImageTensors.ids``).
    """
    train, val = split_off_validation(split.train, fraction, seed)
    return DataSplit(train, val, split.info)


def split_off_validation(data, fraction: float, seed: int = 0, flag: str = "--val-fraction"):
    """(rest, held-out share) of an in-memory data set (ImageTensors or TensorDataset), stratified and seeded;
    both parts keep each sample's position in ``data`` (``ids``), which per-sample sources read."""
    if isinstance(data, ImageTensors):
        labels = data.labels
    elif isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) >= 2 and data.tensors[1].ndim == 1:
        labels = data.tensors[1]
    elif hasattr(data, "subset") and torch.is_tensor(getattr(data, "targets", None)):  # kd.text.TextDataset
        labels = data.targets
    else:
        raise KDError(f"{flag} splits in-memory data sets (digits, MNIST, Fashion-MNIST, CIFAR, SVHN, small image "
                      f"folders, text:PATH, a TensorDataset or (inputs, labels) arrays with integer labels); this one is "
                      f"{type(data).__name__}: split it yourself and pass the held-out part as the evaluation data")
    val_mask = stratified_holdout(labels, fraction, seed, flag)
    ids = getattr(data, "ids", None)
    ids = ids if ids is not None else torch.arange(len(labels))

    def part(mask: torch.Tensor):
        keep = mask.nonzero().flatten()
        if isinstance(data, ImageTensors):
            return ImageTensors(data.images[keep], data.labels[keep], data.scale, ids[keep])
        if hasattr(data, "subset"):
            return data.subset(keep, ids[keep])
        return TensorSubset(*(t[keep] for t in data.tensors), ids=ids[keep])

    return part(~val_mask), part(val_mask)


class TensorSubset(torch.utils.data.TensorDataset):
    """A TensorDataset that remembers each sample's position in the set it was taken from (``ids``)."""

    def __init__(self, *tensors: torch.Tensor, ids: torch.Tensor | None = None):
        super().__init__(*tensors)
        self.ids = ids


def as_dataset(data, what: str = "training", *, evaluation: bool = False):
    """A user's data as proxykd reads it, checked once: ImageTensors and map-style Datasets as they are; an
    (inputs, labels) pair of arrays or tensors becomes a TensorDataset. Refused in one line: float labels
    that are not soft labels by design (an N x K float matrix whose rows sum to 1, for training only), labels
    of more than two dimensions, and inputs and labels of different lengths."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, torch.utils.data.Dataset):
        try:
            x, y = (torch.from_numpy(np.array(a)) if not torch.is_tensor(a) else a for a in data)  # a copy: pandas'
            # .values can be read-only, which torch warns of
        except (TypeError, ValueError) as e:
            raise KDError(f"the {what} data: (inputs, labels) must be arrays or tensors ({e})") from None
        data = torch.utils.data.TensorDataset(x, y) if len(x) == len(y) else (x, y)
        if isinstance(data, tuple):
            raise KDError(f"the {what} data has {len(x)} inputs but {len(y)} labels; give one label per input")
    if not isinstance(data, torch.utils.data.TensorDataset):
        return data
    if len(data.tensors) < 2:
        raise KDError(f"the {what} TensorDataset holds {len(data.tensors)} tensor; give (inputs, labels)")
    y = data.tensors[1]
    if y.is_floating_point():
        soft = y.ndim == 2
        if soft and evaluation:
            raise KDError(f"the {what} labels are soft (an N x K float matrix); evaluation needs class indices: "
                          f"pass labels.argmax(1)")
        if not soft:
            raise KDError(f"the {what} labels are {str(y.dtype).replace('torch.', '')} (floats); class indices must "
                          f"be integers: pass y.long() (or y.astype(int)); soft labels go as an N x K float matrix")
        if (y < 0).any() or not torch.allclose(y.double().sum(1), torch.ones(len(y), dtype=torch.float64), atol=1e-3):
            raise KDError(f"the {what} labels are an N x K float matrix but not soft labels: each row must be "
                          f"non-negative and sum to 1")
    elif y.dtype == torch.bool or y.is_complex() or y.ndim != 1:
        raise KDError(f"the {what} labels must be integer class indices, one per sample (got {y.dtype}, shape "
                      f"{tuple(y.shape)})")
    return data


# ---------------------------------------------------------------------------------------
# A user's own images: imagefolder:PATH with PATH/train/CLASS/* and PATH/val/CLASS/* (or test/)

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


def infer_num_classes(*datasets) -> int:
    """K for data sets whose labels are 0..K-1 (ImageTensors, TensorDataset, or one with .classes): one more
    than the largest label any of them holds (a set may lack the last class), or the length of ``classes``."""
    ks = []
    for data in datasets:
        if data is None:
            continue
        if isinstance(data, ImageTensors):
            ks.append(int(data.labels.max()) + 1)
        elif isinstance(data, torch.utils.data.TensorDataset):
            y = data.tensors[1]
            ks.append(y.shape[1] if y.is_floating_point() else int(y.max()) + 1)
        elif getattr(data, "classes", None):
            ks.append(len(data.classes))
    if not ks:
        raise KDError("cannot tell the number of classes of this data set; pass num_classes=K")
    return max(ks)
