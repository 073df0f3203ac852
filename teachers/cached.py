"""Offline knowledge distillation: teacher logits computed once per training sample, gathered by index.

Cached rows describe the *un-augmented* training inputs: with random augmentation on, the
student sees a cropped or flipped image but learns the teacher's output for the original.

Two file forms, told apart by the ``format`` entry of the metadata. Dense
(``proxykd-teacher-cache-v1``): ``logits``, N x K float32 (:class:`CachedTeacher`). Top-k
(``proxykd-teacher-cache-topk-v1``, `kd teacher cache --top-k K`): per sample the k largest
softmax probabilities ``topk_probs`` (N x k float16) and their classes ``topk_indices`` (N x k,
int16 when K <= 32,768, else int32); the targets are rebuilt FKD-style (Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", 2022) by :class:`TopKCached`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kd import runs
from kd.errors import KDError
from kd.losses import soft_cross_entropy
from kd.data.augment import MixedIndex
from kd.sources import SourceContext, TargetSource
from teachers.proxy import (_has_duplicates, artifact_format, check_top_k, distinct_random_indices, index_dtype,
                            sparse_soft_cross_entropy)

DENSE_FORMAT = "proxykd-teacher-cache-v1"
TOPK_FORMAT = "proxykd-teacher-cache-topk-v1"


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


class TopKCached(TargetSource):
    """Targets rebuilt from each sample's top-k teacher probabilities, FKD's scheme.

    For a sample with kept probabilities q_1..q_k at classes c_1..c_k and s = sum q: t[c_i] = q_i
    and every other class gets (1 - s) / (K - k), the remaining mass spread uniformly. Per batch
    the B x K target is filled with each row's uniform share and the k kept values scattered in;
    no N x K table exists. Deviation: q is stored in float16, so s may exceed 1 by rounding; such
    a row's q is divided by s (and its remainder is 0) so that every target row sums to 1.
    :meth:`loss_terms` computes the same cross-entropy from the kept entries alone
    (:func:`teachers.proxy.sparse_soft_cross_entropy`); with mixup / cutmix (``MixedIndex``) it is
    lam * H(t_i, p_i) + (1 - lam) * H(t_perm(i), p_i), the cross-entropy with the mixed target.
    """

    name = CachedTeacher.name
    summary = CachedTeacher.summary
    spec_arg = CachedTeacher.spec_arg
    needs_index = True
    augmentation_warning = CachedTeacher.augmentation_warning
    mixes_index = True

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "CachedTeacher | TopKCached":
        return CachedTeacher.from_spec(arg, ctx)

    @classmethod
    def bench_rows(cls):
        return {}  # not in the default `kd bench` rows: benchmarks/large_k.py builds it directly

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "TopKCached":
        """N = ``num_train`` (default 10,000) random rows: k distinct classes (``top_k`` option, default
        10) holding a random mass in [0.5, 1), without ever drawing an N x K table."""
        n, k_classes = ctx.num_train or 10_000, ctx.num_classes
        top_k = check_top_k(int(ctx.options.get("top_k") or min(10, k_classes - 1)), k_classes, "top_k")
        g = torch.Generator().manual_seed(0)
        indices = distinct_random_indices(n, top_k, k_classes, g)
        q = torch.rand(n, top_k, generator=g) + 1e-3
        q = q / q.sum(1, keepdim=True) * (0.5 + 0.5 * torch.rand(n, 1, generator=g))
        return cls(q.half(), indices.to(index_dtype(k_classes)), k_classes)

    def __init__(self, probs: torch.Tensor, indices: torch.Tensor, num_classes: int, meta: dict | None = None):
        if probs.ndim != 2 or probs.shape != indices.shape:
            raise ValueError(f"probs and indices must both be N x k, got {tuple(probs.shape)} and {tuple(indices.shape)}")
        super().__init__(num_classes)
        self.top_k = probs.shape[1]
        if not 1 <= self.top_k < self.num_classes:
            raise ValueError(f"top_k must lie in [1, K), got {self.top_k} with K={self.num_classes}")
        self.meta = dict(meta or {})
        # Kept as stored (float16, int16/int32): converted per batch, after the gather.
        self.register_buffer("probs", probs.contiguous(), persistent=False)
        self.register_buffer("indices", indices.contiguous(), persistent=False)

    def _rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept probabilities (B x k float32), their classes (B x k int64) and the uniform share (B)."""
        q = self.probs.index_select(0, index).float()
        cols = self.indices.index_select(0, index).long()
        s = q.sum(1)
        q = q / s.clamp_min(1.0).unsqueeze(1)  # float16 rounding can push s above 1
        share = (1.0 - s).clamp_min(0.0) / (self.num_classes - self.top_k)
        return q, cols, share

    def _dense(self, index: torch.Tensor) -> torch.Tensor:
        q, cols, share = self._rows(index)
        t = share.unsqueeze(1).expand(-1, self.num_classes).contiguous()
        return t.scatter_(1, cols, q)

    def targets(self, labels, *, inputs=None, index=None):
        if index is None:
            raise ValueError("a cached teacher needs the sample indices of the batch")
        if isinstance(index, MixedIndex):  # mixup / cutmix: the two samples' rows mixed with the batch's lam
            return index.mix_rows(self._dense(index.index))
        return self._dense(index)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if index is None:
            raise ValueError("a cached teacher needs the sample indices of the batch")
        if isinstance(index, MixedIndex):
            q, cols, share = self._rows(index.index)
            w = q - share.unsqueeze(1)
            perm = index.perm
            ce = sparse_soft_cross_entropy(logits, w, cols, share) * index.lam
            if index.lam < 1.0:
                ce = ce + sparse_soft_cross_entropy(logits, w.index_select(0, perm), cols.index_select(0, perm),
                                                    share.index_select(0, perm)) * (1.0 - index.lam)
            return {"ce": ce}
        q, cols, share = self._rows(index)
        return {"ce": sparse_soft_cross_entropy(logits, q - share.unsqueeze(1), cols, share)}


def top_k_probabilities(logits: torch.Tensor, top_k: int, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest softmax probabilities (float16) and classes (int16 / int32), a chunk of rows at a time."""
    k_classes = logits.shape[1]
    check_top_k(top_k, k_classes)
    probs, indices = [], []
    for part in logits.split(chunk):
        v, i = part.float().softmax(-1).topk(top_k, dim=1)
        probs.append(v.half())
        indices.append(i.to(index_dtype(k_classes)))
    return torch.cat(probs), torch.cat(indices)


def save_topk_cache(path: Path, logits: torch.Tensor, top_k: int, dataset: str, teacher_run: str) -> None:
    """The top-k form of a teacher cache (see the module docstring) from N x K teacher logits."""
    probs, indices = top_k_probabilities(logits.detach().cpu(), top_k)
    write_topk_cache(path, probs, indices, logits.shape[1], dataset, teacher_run)


def write_topk_cache(path: Path, probs: torch.Tensor, indices: torch.Tensor, num_classes: int, dataset: str,
                     teacher_run: str) -> None:
    """Write kept probabilities (N x k, stored float16) and classes (N x k, int16 / int32) as a top-k cache."""
    meta = {"format": TOPK_FORMAT, "dataset": dataset, "teacher_run": teacher_run,
            "num_samples": str(probs.shape[0]), "num_classes": str(num_classes), "top_k": str(probs.shape[1])}
    runs.save_safetensors(path, {"topk_probs": probs.detach().cpu().half().contiguous(),
                                 "topk_indices": indices.detach().cpu().to(index_dtype(num_classes)).contiguous()}, meta)


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
    if path.is_file() and artifact_format(path) == TOPK_FORMAT:
        return _load_topk_cache(path, dataset, num_samples, num_classes)
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


def _load_topk_cache(path: Path, dataset: str | None, num_samples: int | None,
                     num_classes: int | None) -> TopKCached:
    tensors = runs.load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    redo = f"re-create it with `kd teacher cache RUN_DIR --top-k K --out {path}`"
    missing = [n for n in ("topk_probs", "topk_indices") if n not in tensors]
    if missing:
        raise KDError(f"{path} is a top-k teacher cache without tensor '{missing[0]}'; {redo}")
    probs, indices = tensors["topk_probs"], tensors["topk_indices"]
    try:
        n, k_classes, top_k = int(meta["num_samples"]), int(meta["num_classes"]), int(meta["top_k"])
    except (KeyError, ValueError):
        raise KDError(f"{path}: a top-k teacher cache must record num_samples, num_classes and top_k; {redo}") from None
    if probs.shape != (n, top_k) or indices.shape != (n, top_k):
        raise KDError(f"{path}: topk_probs and topk_indices must both be N x k = {n} x {top_k}, got "
                      f"{tuple(probs.shape)} and {tuple(indices.shape)}; {redo}")
    if dataset is not None and meta.get("dataset") not in (None, dataset):
        raise KDError(f"{path} caches outputs for data set '{meta['dataset']}', not '{dataset}'")
    if num_samples is not None and n != num_samples:
        raise KDError(f"{path} has {n} rows but the training set has {num_samples} samples")
    if num_classes is not None and k_classes != num_classes:
        raise KDError(f"{path} has K={k_classes} classes but the data set has {num_classes}")
    if not probs.is_floating_point() or indices.is_floating_point() or indices.is_complex():
        raise KDError(f"{path}: topk_probs must hold floats and topk_indices integers; {redo}")
    if not 1 <= top_k < k_classes or (indices < 0).any() or (indices >= k_classes).any() or _has_duplicates(indices):
        raise KDError(f"{path}: topk_indices must hold 1 <= k < K distinct classes in [0, {k_classes}) per row; {redo}")
    q = probs.float()
    if not torch.isfinite(q).all() or (q < 0).any() or (q.sum(1) > 1.0 + 1e-2).any():
        raise KDError(f"{path}: topk_probs must be non-negative probabilities summing to at most 1 per row; {redo}")
    if indices.dtype not in (torch.int16, torch.int32):
        indices = indices.to(index_dtype(k_classes))
    return TopKCached(probs.half() if probs.dtype != torch.float16 else probs, indices, k_classes, dict(meta))
