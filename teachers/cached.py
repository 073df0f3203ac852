"""Offline knowledge distillation: teacher logits computed once per training sample, gathered by index.

Cached rows describe the *un-augmented* training inputs: with random augmentation on, the
student sees a cropped or flipped image but learns the teacher's output for the original.

Two file forms, told apart by the ``format`` entry of the metadata. Dense
(``proxykd-teacher-cache-v1``, written here): ``logits``, N x K float32 (:class:`CachedTeacher`).
Top-k (``proxykd-teacher-cache-topk-v1``, `kd teacher cache --top-k K`): the sparse form,
:class:`teachers.topk.TopKCached`, whose file is written and read in :mod:`teachers.topk`.
:func:`load_cache` reads both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kd import runs
from kd.cmatrix import artifact_format
from kd.data.augment import MixedIndex
from kd.errors import KDError
from kd.losses import soft_cross_entropy
from kd.sources import SourceContext, TargetSource
from teachers.topk import CACHE_TOPK_FORMAT, TopKCached, load_topk_cache

DENSE_FORMAT = "proxykd-teacher-cache-v1"


class CachedTeacher(TargetSource):
    """Targets = softmax(cached_logits[index]): an N x K table gathered by sample index."""

    name = "cached"
    summary = "offline KD: teacher outputs cached once per training sample (from `kd teacher cache`)"
    spec_arg = "FILE"
    needs_index = True
    augmentation_warning = ("cached teacher outputs describe un-augmented inputs, but random augmentation is on; "
                            "pass augment=False (--no-augment) to train on the inputs the cache describes. "
                            "With --mixup/--cutmix the two samples' cached outputs are mixed with the same lam, "
                            "which only approximates the teacher's output on the mixed image")
    mixes_index = True

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "CachedTeacher":
        if "logits" in ctx.artifacts:  # outputs in memory (Python): one row per training sample, in its order
            logits = torch.as_tensor(ctx.artifacts["logits"]).detach()
            if logits.ndim != 2 or logits.shape[1] != ctx.num_classes:
                raise KDError(f"logits= must be N x K = N x {ctx.num_classes}, got shape {tuple(logits.shape)}")
            if ctx.num_train is not None and logits.shape[0] != ctx.num_train:
                raise KDError(f"logits= holds {logits.shape[0]} rows but the training set has {ctx.num_train} samples")
            return cls(logits)
        if not arg:
            raise KDError("teacher 'cached' needs a file: cached:FILE (make one with `kd teacher cache RUN_DIR --out FILE`)")
        return load_cache(arg, ctx.dataset, ctx.num_train, ctx.num_classes)

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "CachedTeacher":
        n = ctx.num_train or 10_000
        return cls(torch.randn(n, ctx.num_classes, generator=torch.Generator().manual_seed(0)))

    def __init__(self, logits: torch.Tensor):
        logits = torch.as_tensor(logits, dtype=torch.float32)
        super().__init__(logits.shape[1])
        self.register_buffer("probs", logits.softmax(-1), persistent=False)

    def targets(self, labels, *, inputs=None, index=None):
        if index is None:
            raise ValueError("a cached teacher needs the sample indices of the batch")
        if isinstance(index, MixedIndex):  # mixup / cutmix: the two samples' rows mixed with the batch's lam
            return index.mix_rows(self.probs.index_select(0, index.index))
        return self.probs.index_select(0, index)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        return {"ce": soft_cross_entropy(logits, self.targets(labels, index=index))}


TopKCached.share(CachedTeacher)


def save_cache(path: Path, logits: torch.Tensor, dataset: str, teacher_run: str) -> None:
    meta = {"format": DENSE_FORMAT, "dataset": dataset, "teacher_run": teacher_run,
            "num_samples": str(logits.shape[0]), "num_classes": str(logits.shape[1])}
    runs.save_safetensors(path, {"logits": logits.detach().float().cpu().contiguous()}, meta)


def load_cache(path: str | Path, dataset: str | None = None, num_samples: int | None = None,
               num_classes: int | None = None) -> CachedTeacher:
    """A cached teacher, checked against the data set it will be used with.

    Reads both forms: dense logits give a :class:`CachedTeacher`, a top-k file a :class:`TopKCached`.
    """
    path = Path(path)
    if path.is_file() and artifact_format(path) == CACHE_TOPK_FORMAT:
        return load_topk_cache(path, dataset, num_samples, num_classes)
    tensors = runs.load_safetensors(path)
    if "logits" not in tensors:
        raise KDError(f"{path} holds no tensor 'logits'; make one with `kd teacher cache RUN_DIR --out {path}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    logits = tensors["logits"]
    if dataset is not None and meta.get("dataset") not in (None, dataset):
        raise KDError(f"{path} caches outputs for data set '{meta['dataset']}', not '{dataset}'")
    if num_samples is not None and logits.shape[0] != num_samples:
        raise KDError(f"{path} has {logits.shape[0]} rows but the training set has {num_samples} samples")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise KDError(f"{path} has K={logits.shape[1]} classes but the data set has {num_classes}")
    return CachedTeacher(logits)


