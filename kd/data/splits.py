"""The authors' released preprocessing (a reproduction aid) and validation splits held out of the training set."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from dataclasses import replace

from kd.data.tensors import DataSplit, ImageTensors, TensorSubset
from kd.errors import KDError



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
    elif hasattr(data, "subset") and torch.is_tensor(getattr(data, "targets", None)):  # kd.data.text.TextDataset
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
