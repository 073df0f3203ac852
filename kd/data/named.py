"""Data sets by name: the registry (digits, MNIST, Fashion-MNIST, CIFAR, SVHN, the ImageNet-style folders),
their file readers, and :func:`load_dataset`, which also reads ``imagefolder:PATH`` and ``text:PATH``.
Nothing is downloaded unless the caller asks for it."""
from __future__ import annotations

import gzip
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kd.data.folders import image_folder_path, load_image_folder
from kd.data.splits import PAPER_PIPELINES, paper_preprocess
from kd.data.tensors import DataSplit, DatasetInfo, ImageTensors
from kd.data.text import load_text_folder, run_text_options, text_path
from kd.errors import KDError

DEFAULT_ROOT_ENV = "KD_DATA_ROOT"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")



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


def read_idx(path: Path) -> np.ndarray:
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
    x, y = read_idx(images), read_idx(labels)
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

    ``text:PATH`` loads a user's own text (see :func:`kd.data.text.load_text_folder`), read and encoded as
    ``text`` (a :class:`kd.data.text.TextOptions`; None: the defaults) says.

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
        return load_dataset(name, root, text=run_text_options(meta, run_dir))
    size = meta.get("image_size") if image_folder_path(name) is not None else None
    return load_dataset(name, root, image_size=size, preprocess=meta.get("preprocess", "matched"))
