"""Input augmentations beyond pad-and-crop and flips: Cutout, RandAugment, Mixup and CutMix.

Flags follow timm's training script: ``--mixup ALPHA`` and ``--cutmix ALPHA`` (Beta
parameters; both given: switch between them with probability 0.5, per batch),
``--cutout SIZE`` (a SIZE x SIZE square zeroed at a random centre per image, clipped at the
border, as DeVries and Taylor's Cutout) and ``--aa rand-mM-nN`` (torchvision's v2
RandAugment, N operations of magnitude M, drawn per image in loader workers).

Mixing happens in the training step, on the batch: sample i becomes lam * x_i + (1 - lam) *
x_perm(i) with perm the batch reversed (one lam per batch, like timm's batch mode), and its
label the soft label m_i = lam * onehot(y_i) + (1 - lam) * onehot(y_perm(i)).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from kd.data import TensorLoader
from kd.errors import KDError


@dataclass
class MixedIndex:
    """Sample indices of a mixed batch: row i is lam * sample index[i] + (1 - lam) * sample index[perm[i]]."""

    index: torch.Tensor
    perm: torch.Tensor
    lam: float

    def mix_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Mix per-sample rows (e.g. cached teacher probabilities) with the batch's own weights."""
        return rows.mul(self.lam).add_(rows.index_select(0, self.perm), alpha=1.0 - self.lam)


class BatchMix:
    """Mixup / CutMix on a batch: returns (mixed x, soft labels m, how it was mixed).

    Its random draws (lam, mixup or cutmix, the box) come from a stream seeded by (seed,
    epoch, rank) at each :meth:`set_epoch`, so a resumed run mixes as the uninterrupted one.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, switch_prob: float = 0.5,
                 seed: int = 0, rank: int = 0):
        if mixup < 0 or cutmix < 0:
            raise KDError(f"--mixup and --cutmix take a Beta parameter > 0 (0: off), got {mixup} and {cutmix}")
        self.num_classes, self.mixup, self.cutmix, self.switch_prob = num_classes, mixup, cutmix, switch_prob
        self.seed, self.rank = seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng([self.seed, epoch, self.rank, 0x6D6978])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or self.rng.random() < self.switch_prob)
        b = x.shape[0]
        perm = torch.arange(b - 1, -1, -1, device=x.device)
        if use_cutmix:
            lam = float(self.rng.beta(self.cutmix, self.cutmix))
            h, w = x.shape[-2:]
            cut = (1.0 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            lam = float(self.rng.beta(self.mixup, self.mixup))
            x = x.mul(lam).add_(x.flip(0), alpha=1.0 - lam)
        one_hot = F.one_hot(y, self.num_classes).float()
        m = one_hot.mul(lam).add_(one_hot.flip(0), alpha=1.0 - lam)
        mixed = MixedIndex(index if index is not None else torch.arange(b, device=x.device), perm, lam)
        return x, m, mixed


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a size x size square per image at a uniformly drawn centre (clipped at the border), in place."""
    b, _, h, w = x.shape
    top = torch.randint(0, h, (b, 1, 1), generator=generator, device=x.device) - size // 2
    left = torch.randint(0, w, (b, 1, 1), generator=generator, device=x.device) - size // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x.masked_fill_(inside.unsqueeze(1), 0.0)


def parse_rand_augment(spec: str) -> tuple[int, int]:
    """``rand-mM-nN`` (either order, timm's spelling) -> (magnitude M, number of operations N)."""
    parts = spec.split("-")
    if not parts or parts[0] != "rand":
        raise KDError(f"--aa '{spec}' is not understood; use rand-mM-nN, e.g. rand-m9-n2")
    m, n = 9, 2
    for p in parts[1:]:
        match = re.fullmatch(r"([mn])(\d+)", p)
        if not match:
            raise KDError(f"--aa '{spec}': unknown part '{p}'; use rand-mM-nN, e.g. rand-m9-n2")
        if match.group(1) == "m":
            m = int(match.group(2))
        else:
            n = int(match.group(2))
    if not 0 <= m <= 30 or n < 1:
        raise KDError(f"--aa '{spec}': magnitude must lie in [0, 30] and N be at least 1")
    return m, n


class _RandAugmented(torch.utils.data.Dataset):
    """uint8 images from memory, each through RandAugment in a loader worker."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, magnitude: int, num_ops: int):
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        self.op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.op(self.images[i]), self.labels[i], i


class _OrderSampler(torch.utils.data.Sampler):
    def __init__(self, loader: TensorLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[int]:
        return iter(self.loader._order().cpu().tolist())

    def __len__(self) -> int:
        return len(self.loader._order())


class WorkerAugmentLoader:
    """A :class:`TensorLoader`'s batches with per-image RandAugment done in DataLoader workers.

    Same order, sharding and batch transform (crop, flip, normalisation) as the wrapped loader;
    the workers' random streams are seeded from (seed, epoch, rank), so a run is reproducible.
    """

    def __init__(self, base: TensorLoader, magnitude: int, num_ops: int, num_workers: int):
        self.base = base
        self.dataset = _RandAugmented(base.inputs.cpu(), base.labels.cpu(), magnitude, num_ops)
        self.num_workers = num_workers
        self.generator = base.generator

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        b = self.base
        g = torch.Generator().manual_seed((b.seed * 1000003 + b.epoch) * 64 + b.rank)
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=b.batch_size, sampler=_OrderSampler(b),
                                         drop_last=b.drop_last, num_workers=self.num_workers, generator=g,
                                         pin_memory=b.device.type == "cuda")
        for x, y, idx in dl:
            x, y, idx = x.to(b.device, non_blocking=True), y.to(b.device), idx.to(b.device)
            if b.transform is not None:
                x = b.transform(x, b.train, b.generator)
            yield x, y, idx


class CutoutTransform:
    """A batch transform followed by Cutout on the normalised images (training only)."""

    def __init__(self, inner, size: int):
        self.inner, self.size = inner, int(size)

    def __call__(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.inner(x, train, generator)
        return cutout(x, self.size, generator) if train else x
