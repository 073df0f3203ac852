"""Data sets by name, held as tensors and augmented per batch.

In-memory sets (digits, Fashion-MNIST, CIFAR, SVHN) are one uint8 tensor N x C x H x W;
a :class:`TensorLoader` slices batches from it and applies pad-and-crop and flips to the
whole batch at once, so no per-sample Python or PIL work sits on the hot path. Folder
sets (TinyImageNet, ImageNet-100, Animals-10N) stream through torchvision's ImageFolder.
Nothing is downloaded unless the caller asks for it.
"""
from __future__ import annotations

import gzip
import os
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
    """An in-memory image set: uint8 (or float) images N x C x H x W, int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    scale: float = 255.0  # images / scale lies in [0, 1]

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
        if train and self.augments:
            x = augment_batch(x, self.crop_padding, self.flip, generator, self.workspace)
        if self.mul.device != x.device:
            self.mul, self.add = self.mul.to(x.device), self.add.to(x.device)
        return x.float().mul_(self.mul).add_(self.add)


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None,
                  workspace: dict | None = None) -> torch.Tensor:
    """Random pad-and-crop (zero padding) and horizontal flip, drawn per sample, done as one gather.

    Each output pixel's source position in the padded image is computed for the whole batch, so
    the work is one copy into a zero-bordered buffer and one gather. With a ``workspace`` dict the
    padded image and the int64 gather index live in buffers reused from batch to batch: fresh
    allocations of that size cost page faults on every batch (measured with `kd loader-bench`).
    """
    b, c, h, w = x.shape
    dev = x.device
    hp, wp = h + 2 * padding, w + 2 * padding
    ws = workspace if workspace is not None else {}
    if ws.get("shape") != (x.shape, x.dtype, dev, padding):
        ws.clear()
        ws.update(shape=(x.shape, x.dtype, dev, padding),
                  padded=torch.zeros(b, c, hp, wp, dtype=x.dtype, device=dev),
                  index=torch.empty(b, h, w, dtype=torch.long, device=dev),
                  rows=(torch.arange(h, device=dev) * wp).view(1, h, 1),
                  cols=torch.arange(w, device=dev).view(1, 1, w))
    xp = ws["padded"]
    xp[:, :, padding:padding + h, padding:padding + w].copy_(x)  # the border stays zero
    cols = ws["cols"]
    if flip:
        mirror = (torch.rand(b, device=dev, generator=generator) < 0.5).view(b, 1, 1)
        cols = torch.where(mirror, (w - 1) - cols, cols)
    index = torch.add(ws["rows"], cols, out=ws["index"]) if flip else ws["index"].copy_(
        (ws["rows"] + cols).expand(b, h, w))
    if padding > 0:
        di = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=dev, generator=generator)
        dj = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=dev, generator=generator)
        index.add_(di * wp + dj)
    return xp.view(b, c, hp * wp).gather(2, index.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


class TensorLoader:
    """Batches (x, y, index) from tensors already in memory; shards by rank for multi-process runs."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, drop_last: bool = False, transform: BatchTransform | None = None,
                 train: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.inputs = inputs.to(self.device)
        self.labels = labels.to(self.device)
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
            x = self.inputs[idx]
            if self.transform is not None:
                x = self.transform(x, self.train, self.generator)
            yield x, self.labels[idx], idx


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style data set so that each item also carries its index."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return x, y, i


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
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    places = fashion_mnist_candidates(root)
    if download and root is not None:
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), download=True)
    for place in places:
        files = [_find_idx(place, s) for s in stems]
        if all(files):
            xtr, ytr, xte, yte = (_read_idx(f) for f in files)
            mk = lambda x, y: ImageTensors(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
            return mk(xtr, ytr), mk(xte, yte)
    raise KDError(
        "Fashion-MNIST not found: looked in " + ", ".join(str(p) for p in places)
        + "; install it with `apt-get install dataset-fashion-mnist`, or pass --data-root DIR --download"
    )


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
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

#: name -> (info, loader). Loaders take (root or None, download) and return (train, test).
REGISTRY: dict[str, tuple[DatasetInfo, Callable]] = {
    "digits": (DatasetInfo("digits", 10, 1, 8, (0.3052,), (0.3760,), "lenet",
                           class_names=[str(i) for i in range(10)]), _digits),
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
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise KDError(f"unknown data set '{name}'; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[key][0]


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> DataSplit:
    """Load a registered data set. ``root`` defaults to $KD_DATA_ROOT or ./data."""
    info = dataset_info(name)
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir() and not download:
            raise KDError(f"data root {root} does not exist; create it and put the data set there, or add --download")
    train, test = REGISTRY[info.name][1](root, download)
    if not info.class_names:
        classes = getattr(train, "classes", None)
        info = replace(info, class_names=list(classes) if classes else [str(i) for i in range(info.num_classes)])
    return DataSplit(train, test, info)


def infer_num_classes(data) -> int:
    """K for a data set whose labels are 0..K-1 (ImageTensors, TensorDataset, or one with .classes)."""
    if isinstance(data, ImageTensors):
        return int(data.labels.max()) + 1
    if isinstance(data, torch.utils.data.TensorDataset):
        return int(data.tensors[1].max()) + 1
    classes = getattr(data, "classes", None)
    if classes:
        return len(classes)
    raise KDError("cannot tell the number of classes of this data set; pass num_classes")
