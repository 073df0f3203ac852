"""What proxykd holds data as: images as one uint8 tensor (:class:`ImageTensors`), a data set's
description (:class:`DatasetInfo`), a train/test pair (:class:`DataSplit`), the batch transform
(pad-and-crop, flip and normalisation of a whole batch at once) and :class:`TensorLoader`, which
slices batches from tensors; a user's arrays become data here (:func:`as_dataset`), and their labels
are checked here (:func:`check_labels`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from kd.errors import KDError


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


def _labels_of(data) -> torch.Tensor | None:
    """The integer labels of a data set without decoding its items, or None when they cannot be read so.

    ``ImageTensors.labels``, ``TensorDataset.tensors[1]`` or a map-style set's ``targets``
    (folder sets, torchvision sets); any other data set is not checked (its labels would take
    a pass over every item).
    """
    if isinstance(data, ImageTensors):
        labels = data.labels
    elif isinstance(data, torch.utils.data.TensorDataset):
        labels = data.tensors[1] if len(data.tensors) > 1 else None
    else:
        labels = getattr(data, "targets", None)
    if labels is None:
        return None
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None  # soft or odd labels: not class indices, nothing to check here
    return labels


def check_labels(data, num_classes: int, what: str) -> None:
    """Raise a one-line KDError when a label of ``data`` lies outside [0, num_classes); one pass, no per-step cost."""
    labels = _labels_of(data)
    if labels is None or labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise KDError(f"{what} label {int(labels[i])} at sample {i} is outside [0, {num_classes}); "
                      f"the source has K={num_classes} classes")
