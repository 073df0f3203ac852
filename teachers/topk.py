"""The sparse (top-k) forms of two sources, for a large K: the proxy's C and the cached teacher's outputs,
each kept as the k largest entries of a row and their classes (never a K x K or N x K table).

:class:`TopKProxy` reads a top-k C-matrix file (:mod:`kd.cmatrix`); :class:`TopKCached` a top-k teacher cache
(``proxykd-teacher-cache-topk-v1``, written here: per sample the k largest softmax probabilities
``topk_probs``, N x k float16, and their classes ``topk_indices``, int16 when K <= 32,768, else int32;
the targets are rebuilt FKD-style: Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", 2022). Each is its dense sibling's sparse form (:class:`SparseForm`): the same name, help,
SPEC and options, and the dense source's SPEC reader builds whichever form a file holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open

from kd import runs
from kd.cmatrix import check_top_k, has_duplicates, index_dtype, proxy_alpha
from kd.data.augment import MixedIndex
from kd.errors import KDError
from kd.sources import SourceContext, TargetSource

CACHE_TOPK_FORMAT = "proxykd-teacher-cache-topk-v1"


class SparseForm(TargetSource):
    """The sparse form of a dense source: it takes the dense one's name, help, SPEC, options and flags
    (:meth:`share`, called where the dense source is defined), and a SPEC is read by the dense source,
    which builds the sparse form when the file holds one. Not a `kd bench` row of its own
    (benchmarks/large_k.py times it)."""

    dense: ClassVar[type[TargetSource]]

    @classmethod
    def share(cls, dense: type[TargetSource]) -> None:
        cls.dense = dense
        for attr in ("name", "summary", "spec_arg", "options", "needs_index", "mixes_index", "augmentation_warning"):
            setattr(cls, attr, getattr(dense, attr))

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> TargetSource:
        return cls.dense.from_spec(arg, ctx)

    @classmethod
    def bench_rows(cls):
        return {}


def stand_in_top_k(ctx: SourceContext) -> int:
    """k of a stand-in artifact: the ``top_k`` setting of `kd bench`, default 10 (K - 1 below 11 classes)."""
    k_classes = ctx.num_classes
    return check_top_k(int(ctx.options.get("top_k") or min(10, k_classes - 1)), k_classes, "top_k")


def distinct_random_indices(rows: int, k: int, num_classes: int, generator: torch.Generator,
                            skip: torch.Tensor | None = None) -> torch.Tensor:
    """rows x k random class indices, distinct within each row (for stand-in artifacts, no rows x K draw).

    k sorted draws r_1 <= ... <= r_k from [0, K' - k], then r_j + j: strictly increasing, in [0, K').
    With ``skip`` (one class per row) K' = K - 1 and indices at or above skip[i] move up by one,
    so row i never names class skip[i] (C's zero diagonal).
    """
    span = num_classes - (1 if skip is not None else 0)
    r = torch.randint(0, span - k + 1, (rows, k), generator=generator).sort(dim=1).values + torch.arange(k)
    if skip is not None:
        r = r + (r >= skip.view(-1, 1)).long()
    return r


def sparse_soft_cross_entropy(logits: torch.Tensor, weights: torch.Tensor, cols: torch.Tensor,
                              uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of H(t, softmax(logits)) for t = uniform[b] on every class + scatter-add of ``weights`` at ``cols``.

    H(t, p) = -sum_j t_j log p_j = -uniform * sum_j log p_j - sum_i weights_i log p_{cols_i}, with
    log p_j = z_j - logsumexp(z): the B x K target is never built. ``weights``, ``cols``: B x m
    (a class named twice adds up); ``uniform``: B, or None for 0. Equals
    ``soft_cross_entropy(logits, t)`` (tests/test_large_k.py checks it).
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    picked = (z.gather(1, cols) - lse.unsqueeze(1)).mul(weights.float()).sum(1)
    loss = picked
    if uniform is not None:
        loss = loss + uniform.float() * (z.sum(1) - z.shape[1] * lse)
    return -loss.mean()


class TopKProxy(SparseForm):
    """Sparse C-matrix source: targets = (1 - alpha) * onehot(y) + alpha * C_k[y].

    C_k keeps the k largest entries of each row of C, renormalised to sum to 1 (values and
    column indices, K x k). Per batch the B x K targets are built by zero-fill and a scatter of
    row y's k entries (never a K x K table); with soft labels m (mixup / cutmix) the target is
    (1 - alpha) m + alpha m @ C_k, the product taken with C_k as a sparse matrix. The loss for
    integer labels is computed from the kept entries alone (:func:`sparse_soft_cross_entropy`).
    """

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "TopKProxy":
        """Random rows of k distinct off-diagonal classes (``top_k`` option, default 10), summing to 1."""
        k_classes, top_k = ctx.num_classes, stand_in_top_k(ctx)
        g = torch.Generator().manual_seed(0)
        indices = distinct_random_indices(k_classes, top_k, k_classes, g, skip=torch.arange(k_classes))
        values = torch.rand(k_classes, top_k, generator=g) + 1e-3
        return cls(values / values.sum(1, keepdim=True), indices, proxy_alpha(cls.value(ctx, "alpha")))

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, alpha: float = 0.1, meta: dict | None = None):
        values = torch.as_tensor(values, dtype=torch.float32)
        indices = torch.as_tensor(indices).long()
        if values.ndim != 2 or values.shape != indices.shape:
            raise ValueError(f"values and indices must both be K x k, got {tuple(values.shape)} and {tuple(indices.shape)}")
        super().__init__(values.shape[0])
        self.top_k = values.shape[1]
        self.alpha = self.option("alpha").check(alpha, self.name)
        self.meta = dict(meta or {})
        self.register_buffer("c_values", values.clone(), persistent=False)
        self.register_buffer("c_indices", indices.clone(), persistent=False)
        self._sparse_t: torch.Tensor | None = None  # C_k transposed, as a sparse K x K matrix (soft labels only)
        # The loss's (k + 1) weights and columns per class, [1 - alpha, alpha * C_k[y]] at [y, cols of C_k[y]],
        # made once: a batch then costs two row gathers instead of building them per step.
        k_classes = values.shape[0]
        self.register_buffer("loss_weights", torch.cat([torch.full((k_classes, 1), 1.0 - self.alpha),
                                                        values * self.alpha], dim=1), persistent=False)
        self.register_buffer("loss_cols", torch.cat([torch.arange(k_classes).view(-1, 1), indices], dim=1),
                             persistent=False)

    def _soft_product(self, m: torch.Tensor) -> torch.Tensor:
        """m @ C_k for B x K soft labels, through sparse C_k^T (K x K, K*k entries)."""
        if self._sparse_t is None or self._sparse_t.device != self.c_values.device:
            k_classes = self.num_classes
            rows = torch.arange(k_classes, device=self.c_values.device).repeat_interleave(self.top_k)
            coo = torch.sparse_coo_tensor(torch.stack([self.c_indices.reshape(-1), rows]), self.c_values.reshape(-1),
                                          (k_classes, k_classes), check_invariants=True)
            self._sparse_t = coo.coalesce()
        with torch.autocast(m.device.type, enabled=False):  # float32 throughout, like the dense table
            return torch.sparse.mm(self._sparse_t, m.t()).t()

    def targets(self, labels, *, inputs=None, index=None):
        a = self.alpha
        if labels.is_floating_point():  # soft labels m: (1 - alpha) m + alpha m @ C_k
            m = labels.float()
            return self._soft_product(m).mul(a).add_(m, alpha=1.0 - a)
        t = torch.zeros(labels.shape[0], self.num_classes, device=self.c_values.device)
        t.scatter_(1, self.c_indices.index_select(0, labels), self.c_values.index_select(0, labels) * a)
        t.scatter_add_(1, labels.view(-1, 1), t.new_full((labels.shape[0], 1), 1.0 - a))
        return t

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if labels.is_floating_point():
            return super().loss_terms(logits, labels)
        return {"ce": sparse_soft_cross_entropy(logits, self.loss_weights.index_select(0, labels),
                                                self.loss_cols.index_select(0, labels))}


class TopKCached(SparseForm):
    """Targets rebuilt from each sample's top-k teacher probabilities, FKD's scheme.

    For a sample with kept probabilities q_1..q_k at classes c_1..c_k and s = sum q: t[c_i] = q_i
    and every other class gets (1 - s) / (K - k), the remaining mass spread uniformly. Per batch
    the B x K target is filled with each row's uniform share and the k kept values scattered in;
    no N x K table exists. Deviation: q is stored in float16, so s may exceed 1 by rounding; such
    a row's q is divided by s (and its remainder is 0) so that every target row sums to 1.
    :meth:`loss_terms` computes the same cross-entropy from the kept entries alone
    (:func:`sparse_soft_cross_entropy`); with mixup / cutmix (``MixedIndex``) it is
    lam * H(t_i, p_i) + (1 - lam) * H(t_perm(i), p_i), the cross-entropy with the mixed target.
    """

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "TopKCached":
        """N = ``num_train`` (default 10,000) random rows: k distinct classes (``top_k`` option, default
        10) holding a random mass in [0.5, 1), without ever drawing an N x K table."""
        n, k_classes, top_k = ctx.num_train or 10_000, ctx.num_classes, stand_in_top_k(ctx)
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
    meta = {"format": CACHE_TOPK_FORMAT, "dataset": dataset, "teacher_run": teacher_run,
            "num_samples": str(probs.shape[0]), "num_classes": str(num_classes), "top_k": str(probs.shape[1])}
    runs.save_safetensors(path, {"topk_probs": probs.detach().cpu().half().contiguous(),
                                 "topk_indices": indices.detach().cpu().to(index_dtype(num_classes)).contiguous()}, meta)


def load_topk_cache(path: Path, dataset: str | None, num_samples: int | None,
                    num_classes: int | None) -> TopKCached:
    """A top-k teacher cache, checked against the data set it will be used with."""
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
    if not 1 <= top_k < k_classes or (indices < 0).any() or (indices >= k_classes).any() or has_duplicates(indices):
        raise KDError(f"{path}: topk_indices must hold 1 <= k < K distinct classes in [0, {k_classes}) per row; {redo}")
    q = probs.float()
    if not torch.isfinite(q).all() or (q < 0).any() or (q.sum(1) > 1.0 + 1e-2).any():
        raise KDError(f"{path}: topk_probs must be non-negative probabilities summing to at most 1 per row; {redo}")
    if indices.dtype not in (torch.int16, torch.int32):
        indices = indices.to(index_dtype(k_classes))
    return TopKCached(probs.half() if probs.dtype != torch.float16 else probs, indices, k_classes, dict(meta))
