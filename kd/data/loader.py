"""The loader a run reads its data through (:func:`make_loader`): tensors sliced in the training process,
other data sets through a DataLoader."""
from __future__ import annotations

import torch

from kd.data.augment import CutoutTransform, WorkerAugmentLoader, parse_rand_augment
from kd.config import TrainConfig
from kd.data.folders import ImageFiles
from kd.data.tensors import BatchTransform, DatasetInfo, ImageTensors, IndexedDataset, TensorLoader
from kd.errors import KDError


def make_loader(data, info: DatasetInfo | None, cfg: TrainConfig, *, train: bool, device,
                rank: int = 0, world_size: int = 1, accelerator=None, input_dtype: torch.dtype = torch.float32):
    """A loader yielding (x, y, index): tensors stay tensors; other data sets go through DataLoader.

    Training loaders shuffle, augment and shard by rank; evaluation loaders keep the data
    set's order, do not augment and give every process the whole set. A TensorDataset's floating
    inputs of another dtype (float64 from NumPy) are cast once to ``input_dtype``, the model's.
    """
    if not train:
        rank, world_size = 0, 1
    common = dict(shuffle=train, drop_last=train, train=train, seed=cfg.seed, rank=rank,
                  world_size=world_size, device=device)
    augment = cfg.augment is not False  # None: the data set's own augmentation, where it has one
    workers = cfg.num_workers or 0  # None: no worker processes unless asked (the CLI asks for 4)
    if isinstance(data, ImageTensors):
        pad = info.crop_padding if (info and augment) else 0
        flip = bool(info and augment and info.flip)
        mean = info.mean if info else (0.0,) * data.images.shape[1]
        std = info.std if info else (1.0,) * data.images.shape[1]
        tf = BatchTransform(data.scale, mean, std, pad, flip)
        if cfg.cutout and train:
            tf = CutoutTransform(tf, cfg.cutout)
        loader = TensorLoader(data.images, data.labels, cfg.batch_size, transform=tf, ids=data.ids, **common)
        if cfg.aa and train:  # RandAugment (drawn per image, applied per batch) in loader workers
            if data.images.dtype != torch.uint8:
                raise KDError("--aa (RandAugment) needs uint8 images; this data set holds other values")
            magnitude, num_ops = parse_rand_augment(cfg.aa)
            return WorkerAugmentLoader(loader, magnitude, num_ops, workers)
        return loader
    if isinstance(data, ImageFiles):  # a streamed image folder augments per item, in the workers
        data.augment = train and augment
    if train and (cfg.cutout or cfg.aa):
        raise KDError("--cutout and --aa work on in-memory image data sets (digits, MNIST, Fashion-MNIST, CIFAR, "
                      "SVHN, small image folders); this data set is streamed or not made of images")
    if isinstance(data, torch.utils.data.TensorDataset):
        x, y = data.tensors[0], data.tensors[1]
        if x.is_floating_point() and x.dtype != input_dtype:  # float64 arrays (NumPy, scikit-learn): cast once
            x = x.to(input_dtype)
        y = y if y.is_floating_point() else y.long()  # soft labels (N x K) stay floats
        return TensorLoader(x, y, cfg.batch_size, ids=getattr(data, "ids", None), **common)
    workers = getattr(data, "loader_workers", workers)  # a set held in memory (text) asks for none
    loader = torch.utils.data.DataLoader(
        IndexedDataset(data), batch_size=cfg.batch_size, shuffle=train, drop_last=train,
        num_workers=workers, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=train and workers > 0,
        collate_fn=getattr(data, "collate", None),  # a set that batches its own items (text: pads token ids)
    )
    return accelerator.prepare(loader) if (train and accelerator is not None) else loader
