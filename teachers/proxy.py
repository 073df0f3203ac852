"""PT-LS++: a K x K C-matrix standing in for the teacher network (paper Section 5.3).

Targets are (1 - alpha) * onehot(y) + alpha * C[y]: one row gather per batch. The matrix is
frozen. Any trained network yields one with :func:`measure_c_matrix` (class-conditional mean
of its softmax over the training set, diagonal removed, rows renormalised), so 1-hot and LS
teachers have proxies too; an LS++ run also carries the C it learned.

For a large K (ImageNet-21k: K = 21,841, a dense C is 1.9 GB float32) :class:`TopKProxy` keeps
only the k largest entries of each row of C, renormalised to sum to 1, stored sparsely
(``c_values`` and ``c_indices``, K x k; format ``proxykd-c-matrix-topk-v1``, written by
:func:`save_topk_c_matrix`, made by `kd proxy export --top-k K`). :func:`load_proxy` reads
both forms.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kd import runs
from kd.errors import KDError
from kd.sources import SourceContext, TableSource, TargetSource, fraction

TOPK_FORMAT = "proxykd-c-matrix-topk-v1"
#: A proxy's alpha where neither the user nor the C-matrix's file gives one (a matrix in memory, a stand-in).
DEFAULT_ALPHA = 0.1


def proxy_alpha(given: float | None, recorded: float | None = None) -> float:
    """The one rule for a proxy's alpha: the one given (``--alpha``), else the one its C-matrix's file (or the run
    it comes from) records, else :data:`DEFAULT_ALPHA`; checked against the option's bounds."""
    alpha = given if given is not None else recorded if recorded is not None else DEFAULT_ALPHA
    return ProxyTeacher.option("alpha").check(alpha, ProxyTeacher.name)


class ProxyTeacher(TableSource):
    """Frozen C-matrix source: targets = (1 - alpha) * onehot(y) + alpha * C[y]."""

    name = "proxy"
    summary = "PT-LS++: a frozen C-matrix (a c_matrix.safetensors, or an LS++ run directory holding one)"
    spec_arg = "PATH"
    options = (fraction("alpha", "weight of C in the target (unset: the alpha the C-matrix records)", None),)

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "ProxyTeacher":
        if "c_matrix" in ctx.artifacts:  # a matrix in memory (Python)
            return cls(ctx.artifacts["c_matrix"], proxy_alpha(cls.value(ctx, "alpha")))
        if not arg:
            raise KDError("teacher 'proxy' needs a path: proxy:PATH (a c_matrix.safetensors or an LS++ run directory)")
        src = load_proxy(arg, alpha=cls.value(ctx, "alpha"), num_classes=ctx.num_classes)
        ds = src.meta.get("dataset")
        if ds and ctx.dataset and ds != ctx.dataset:
            raise KDError(f"{arg}: the C-matrix was made on data set '{ds}', not '{ctx.dataset}'")
        return src

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "ProxyTeacher":
        k = ctx.num_classes
        c = torch.rand(k, k, generator=torch.Generator().manual_seed(0)).fill_diagonal_(0)
        return cls(c.div_(c.sum(1, keepdim=True)), proxy_alpha(cls.value(ctx, "alpha")))  # in place: K x K is 1.9 GB at K=21,841

    def __init__(self, c_matrix: torch.Tensor, alpha: float = 0.1, meta: dict | None = None):
        """``c_matrix``: K x K, rows probability vectors (a detached copy is kept: the C of an LS++ source that
        is still training can be handed over as it is)."""
        alpha = self.option("alpha").check(alpha, self.name)
        c = torch.as_tensor(c_matrix).detach().to(torch.float32)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise KDError(f"a C-matrix must be K x K, got shape {tuple(c.shape)}")
        rows = c.sum(1)  # reductions only: no K x K temporaries (1.9 GB each at K = 21,841); min() propagates NaN
        if not bool(torch.isfinite(rows).all()) or not bool(c.min() >= 0) \
                or not torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
            raise KDError("a C-matrix's rows must be probability vectors (non-negative, summing to 1)")
        # (1 - alpha) I + alpha C without the two extra K x K temporaries of writing it so
        table = c * float(alpha)
        table.diagonal().add_(1.0 - float(alpha))
        super().__init__(table)
        self.alpha = float(alpha)
        self.meta = dict(meta or {})  # the artifact's metadata (data set, class names, ...)
        self.register_buffer("c_matrix", c.clone(), persistent=False)


def load_proxy(path: str | Path, alpha: float | None = None,
               num_classes: int | None = None) -> "ProxyTeacher | TopKProxy":
    """A proxy teacher from a ``c_matrix.safetensors`` or a run directory holding one.

    Reads both forms: a dense K x K C-matrix gives a :class:`ProxyTeacher`, a top-k one (its
    metadata says format ``proxykd-c-matrix-topk-v1``) a :class:`TopKProxy`. ``alpha``
    overrides the artifact's; ``num_classes`` is checked against the matrix.
    """
    file = Path(path) / runs.C_MATRIX if Path(path).is_dir() else Path(path)
    if file.is_file() and artifact_format(file) == TOPK_FORMAT:
        values, indices, meta = load_topk_c_matrix(file)
        k_classes = values.shape[0]
    else:
        c, meta = runs.load_c_matrix(path)
        k_classes = c.shape[0]
    if num_classes is not None and k_classes != num_classes:
        raise KDError(f"{path}: the C-matrix has K={k_classes} classes but the data set has {num_classes}")
    if alpha is None and meta.get("alpha") is None:
        raise KDError(f"{path} records no alpha; pass --alpha")
    a = proxy_alpha(alpha, meta.get("alpha"))
    if meta.get("format") == TOPK_FORMAT:
        return TopKProxy(values, indices, a, meta)
    return ProxyTeacher(c, a, meta)


# ---- sparse (top-k) proxies ---------------------------------------------------------------

def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest stored dtype for class indices: int16 when every index fits (K <= 32,768), else int32."""
    return torch.int16 if num_classes <= 2 ** 15 else torch.int32


def check_top_k(top_k: int, num_classes: int, what: str = "--top-k") -> int:
    """``top_k`` must lie in [1, K): k = K is the dense form."""
    top_k = int(top_k)
    if not 1 <= top_k < num_classes:
        raise KDError(f"{what} must lie in [1, K) = [1, {num_classes}), got {top_k}; "
                      f"leave it out for the dense form")
    return top_k


def artifact_format(path: str | Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (None when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError) as e:
        raise KDError(f"{path} is not a readable safetensors file ({e}); it may be truncated, re-create it") from None


def top_k_rows(c_matrix: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of a K x K C-matrix, renormalised to sum to 1.

    Returns (values K x k float32, indices K x k int64), values in descending order.
    """
    c = torch.as_tensor(c_matrix, dtype=torch.float32)
    check_top_k(top_k, c.shape[1])
    values, indices = c.topk(top_k, dim=1)
    sums = values.double().sum(1, keepdim=True)
    if (sums <= 0).any():
        raise KDError("a row of the C-matrix has no mass in its top-k entries; cannot renormalise it")
    return (values.double() / sums).float(), indices


def save_topk_c_matrix(path: Path, values: torch.Tensor, indices: torch.Tensor, alpha: float,
                       class_names: list[str] | None, extra: dict[str, str] | None = None) -> None:
    """A sparse C-matrix artifact: ``c_values`` (K x k float32, rows summing to 1) and ``c_indices``
    (K x k column indices, int16 or int32), metadata ``format``, ``top_k``, ``num_classes``, alpha."""
    k_classes, top_k = values.shape
    meta = {"alpha": repr(float(alpha)), "class_names": json.dumps(list(class_names or [])), "format": TOPK_FORMAT,
            "top_k": str(top_k), "num_classes": str(k_classes)}
    meta.update(extra or {})
    tensors = {"c_values": values.detach().float().cpu().contiguous(),
               "c_indices": indices.detach().cpu().to(index_dtype(k_classes)).contiguous()}
    runs.save_safetensors(path, tensors, meta)


def load_topk_c_matrix(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read and check a top-k C-matrix; returns (values K x k, indices K x k int64, metadata)."""
    path = Path(path)
    tensors = runs.load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    redo = "re-export it with `kd proxy export RUN --top-k K`"
    missing = [n for n in ("c_values", "c_indices") if n not in tensors]
    if missing:
        raise KDError(f"{path} is a top-k C-matrix without tensor '{missing[0]}'; {redo}")
    values, indices = tensors["c_values"].float(), tensors["c_indices"]
    try:
        k_classes, top_k = int(raw["num_classes"]), int(raw["top_k"])
    except (KeyError, ValueError):
        raise KDError(f"{path}: a top-k C-matrix must record num_classes and top_k in its metadata; {redo}") from None
    if values.shape != (k_classes, top_k) or indices.shape != (k_classes, top_k):
        raise KDError(f"{path}: c_values and c_indices must both be K x k = {k_classes} x {top_k}, got "
                      f"{tuple(values.shape)} and {tuple(indices.shape)}; {redo}")
    if indices.is_floating_point() or indices.is_complex():
        raise KDError(f"{path}: c_indices must hold integers, got {indices.dtype}; {redo}")
    indices = indices.long()
    if top_k >= k_classes or (indices < 0).any() or (indices >= k_classes).any() or _has_duplicates(indices):
        raise KDError(f"{path}: c_indices must hold k < K distinct classes in [0, {k_classes}) per row; {redo}")
    if not torch.isfinite(values).all() or (values < 0).any() \
            or not torch.allclose(values.sum(1), torch.ones(k_classes), atol=1e-3):
        raise KDError(f"{path}: c_values rows must be probability vectors (non-negative, summing to 1); {redo}")
    meta = runs.c_matrix_metadata(path, raw)
    meta["top_k"], meta["num_classes"] = top_k, k_classes
    return values, indices, meta


def _has_duplicates(indices: torch.Tensor) -> bool:
    """True when some row of an R x k index tensor names a class twice."""
    if indices.shape[1] < 2:
        return False
    s = indices.sort(dim=1).values
    return bool((s[:, 1:] == s[:, :-1]).any())


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


class TopKProxy(TargetSource):
    """Sparse C-matrix source: targets = (1 - alpha) * onehot(y) + alpha * C_k[y].

    C_k keeps the k largest entries of each row of C, renormalised to sum to 1 (values and
    column indices, K x k). Per batch the B x K targets are built by zero-fill and a scatter of
    row y's k entries (never a K x K table); with soft labels m (mixup / cutmix) the target is
    (1 - alpha) m + alpha m @ C_k, the product taken with C_k as a sparse matrix. The loss for
    integer labels is computed from the kept entries alone (:func:`sparse_soft_cross_entropy`).
    """

    name = "proxy"
    summary = ProxyTeacher.summary
    spec_arg = "PATH"
    options = ProxyTeacher.options

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "ProxyTeacher | TopKProxy":
        return ProxyTeacher.from_spec(arg, ctx)

    @classmethod
    def bench_rows(cls):
        return {}  # not in the default `kd bench` rows: benchmarks/large_k.py builds it directly

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "TopKProxy":
        """Random rows of k distinct off-diagonal classes (``top_k`` option, default 10), summing to 1."""
        k_classes = ctx.num_classes
        top_k = check_top_k(int(ctx.options.get("top_k") or min(10, k_classes - 1)), k_classes, "top_k")
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


def off_diagonal_normalised(m: torch.Tensor) -> torch.Tensor:
    """Zero the diagonal of a K x K matrix and renormalise each row to sum to 1."""
    m = m.double().clone()
    m.fill_diagonal_(0.0)
    sums = m.sum(1, keepdim=True)
    if (sums <= 0).any():
        raise KDError("a class has no off-diagonal probability mass; cannot build its proxy row")
    return (m / sums).float()


@torch.no_grad()
def class_mean_probabilities(probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                             empty_rows: bool = False) -> torch.Tensor:
    """K x K matrix (float64) whose row k is the mean of ``probs`` over the samples of class k. A class without
    samples is a one-line KDError, or with ``empty_rows`` a row of zeros (a figure shows it empty)."""
    probs, labels = probs.double(), labels.long()
    sums = torch.zeros(num_classes, probs.shape[1], dtype=torch.float64, device=probs.device).index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).double().unsqueeze(1)
    if (counts == 0).any() and not empty_rows:
        missing = int((counts.squeeze(1) == 0).nonzero()[0])
        raise KDError(f"class {missing} has no training samples; cannot measure its proxy row")
    return sums / counts.clamp(min=1)


def measure_c_matrix(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Proxy C from a teacher's softmax outputs: class means, diagonal removed, rows renormalised."""
    return off_diagonal_normalised(class_mean_probabilities(probs, labels, num_classes))
