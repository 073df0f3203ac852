"""Input augmentations beyond pad-and-crop and flips: Cutout, RandAugment, Mixup and CutMix.

Flags follow timm's training script: ``--mixup ALPHA`` and ``--cutmix ALPHA`` (Beta
parameters; both given: switch between them with probability 0.5, per batch),
``--cutout SIZE`` (a SIZE x SIZE square zeroed at a random centre per image, clipped at the
border, as DeVries and Taylor's Cutout) and ``--aa rand-mM-nN`` (RandAugment as torchvision's v2
defines it, N operations of magnitude M drawn per image, applied to whole batches by
:class:`BatchRandAugment` in loader workers, or in the training process with 0 workers).

Mixing happens in the training step, on the batch: sample i becomes lam * x_i + (1 - lam) *
x_perm(i) with perm the batch reversed (one lam per batch, like timm's batch mode), and its
label the soft label m_i = lam * onehot(y_i) + (1 - lam) * onehot(y_perm(i)).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kd.data.tensors import TensorLoader
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


class _RandAugmentedBatches(torch.utils.data.Dataset):
    """Item i: batch i of an epoch's order (uint8 images, labels, indices) through batched RandAugment.

    Its draws come from a generator seeded by (seed, epoch, rank, i), so a batch is the same
    whichever worker makes it and however many workers there are.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, magnitude: int, num_ops: int):
        self.images, self.labels = images, labels
        self.ra = BatchRandAugment(magnitude, num_ops)
        self.batches: list[torch.Tensor] = []
        self.seed = (0, 0, 0)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        idx = self.batches[i]
        seed, epoch, rank = self.seed
        g = torch.Generator().manual_seed((((seed * 1000003 + epoch) * 64 + rank) * 1000003 + i) % (1 << 63))
        return self.ra(self.images.index_select(0, idx), g), self.labels.index_select(0, idx), idx


class WorkerAugmentLoader:
    """A :class:`TensorLoader`'s batches with RandAugment done per batch in DataLoader workers.

    Same order, sharding and batch transform (crop, flip, normalisation) as the wrapped loader.
    Each worker makes whole batches with :class:`BatchRandAugment` (images that drew the same
    operation go through it together: about 4x faster than torchvision's per-image RandAugment,
    benchmarks/loading.md, "Loader cost"), seeded by (seed, epoch,
    rank, batch), so a run is reproducible and independent of ``num_workers`` (0: in the
    training process).
    """

    def __init__(self, base: TensorLoader, magnitude: int, num_ops: int, num_workers: int):
        self.base = base
        self.dataset = _RandAugmentedBatches(base.inputs.cpu(), base.labels.cpu(), magnitude, num_ops)
        self.num_workers = num_workers
        self.generator = base.generator

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        b = self.base
        order = b._order().cpu()
        n = len(order)
        stop = n - n % b.batch_size if b.drop_last else n
        self.dataset.batches = [order[s: s + b.batch_size] for s in range(0, stop, b.batch_size)]
        self.dataset.seed = (b.seed, b.epoch, b.rank)
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                         pin_memory=b.device.type == "cuda", prefetch_factor=2 if self.num_workers else None)
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


# RandAugment's operations in torchvision's order, with (magnitude at bin i of n for an H x W image, signed).
_RA_SPACE = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 4))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
RAND_AUGMENT_OPS = tuple(_RA_SPACE)


def rand_augment_op(x: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment operation with one signed magnitude on uint8 images (..., C, H, W), as
    torchvision's v2 RandAugment applies it (nearest interpolation, fill 0). Every image of a
    batch gets the same operation; per-image statistics (contrast mean, autocontrast range,
    equalize histogram) stay per image."""
    from torchvision.transforms.v2 import functional as TF
    from torchvision.transforms.v2 import InterpolationMode

    near = InterpolationMode.NEAREST
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        s = math.degrees(math.atan(magnitude))
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[s, 0.0] if op == "ShearX" else [0.0, s],
                         interpolation=near, fill=None, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        t = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(x, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=near, fill=None)
    if op == "Rotate":
        return TF.rotate(x, angle=magnitude, interpolation=near, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(x, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(x, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(x, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(x, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(x, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    raise KDError(f"unknown RandAugment operation '{op}'")


class BatchRandAugment:
    """RandAugment (N operations drawn uniformly per image, magnitude M of 31 bins) on a whole
    uint8 batch at once: per round, each image draws its operation and sign; images that drew
    the same (operation, sign) go through that operation together, one call per group.

    The same definition as torchvision's v2 ``RandAugment`` applied per image (operations,
    magnitudes, nearest interpolation, fill 0); tests/test_loader_fast.py checks a batch
    against per-image application of the same draws. Deviation: the random stream is the
    loader's generator (one operation and one sign draw per image per round, the sign drawn
    for unsigned operations too), not torch's global RNG in a worker, so the draws differ
    from torchvision's while their distribution is the same.
    """

    def __init__(self, magnitude: int, num_ops: int, num_bins: int = 31):
        if not 0 <= magnitude < num_bins or num_ops < 1:
            raise KDError(f"RandAugment needs 0 <= magnitude < {num_bins} and at least one operation")
        self.magnitude, self.num_ops, self.num_bins = int(magnitude), int(num_ops), int(num_bins)

    def magnitude_of(self, op: str, h: int, w: int) -> float:
        fn = _RA_SPACE[op][0]
        return 0.0 if fn is None else float(fn(self.num_bins, h, w)[self.magnitude])

    def draws(self, b: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(operation index, negative sign) per image for one round."""
        ops = torch.randint(len(RAND_AUGMENT_OPS), (b,), generator=generator, device=device)
        neg = torch.rand(b, generator=generator, device=device) <= 0.5
        return ops, neg

    def apply_round(self, x: torch.Tensor, ops: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        signed = torch.tensor([_RA_SPACE[o][1] for o in RAND_AUGMENT_OPS], device=ops.device)
        key = (ops * 2 + (neg & signed[ops]).long()).tolist()  # one host read per round
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(key):
            groups.setdefault(k, []).append(i)
        out = x.clone()
        for k, rows in groups.items():
            op = RAND_AUGMENT_OPS[k // 2]
            if op == "Identity":
                continue
            m = self.magnitude_of(op, h, w) * (-1.0 if k % 2 else 1.0)
            sel = torch.tensor(rows, device=x.device)
            out.index_copy_(0, sel, rand_augment_op(x.index_select(0, sel), op, m))
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise KDError("RandAugment works on uint8 images; this batch holds other values")
        for _ in range(self.num_ops):
            x = self.apply_round(x, *self.draws(x.shape[0], generator, x.device))
        return x

