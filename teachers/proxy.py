"""PT-LS++: a K x K C-matrix standing in for the teacher network (paper Section 5.3).

Targets are (1 - alpha) * onehot(y) + alpha * C[y]: one row gather per batch. The matrix is
frozen. Any trained network yields one with :func:`measure_c_matrix` (class-conditional mean
of its softmax over the training set, diagonal removed, rows renormalised), so 1-hot and LS
teachers have proxies too; an LS++ run also carries the C it learned.

For a large K (ImageNet-21k: K = 21,841, a dense C is 1.9 GB float32) its sparse form,
:class:`teachers.topk.TopKProxy`, keeps only the k largest entries of each row of C
(`kd proxy export --top-k K`). :func:`load_proxy` reads both file forms (:mod:`kd.cmatrix`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from kd import runs
from kd.cmatrix import ALPHA, DEFAULT_ALPHA, TOPK_FORMAT, artifact_format, load_c_matrix, load_topk_c_matrix, proxy_alpha
from kd.errors import KDError
from kd.sources import SourceContext, TableSource
from teachers.topk import TopKProxy


class ProxyTeacher(TableSource):
    """Frozen C-matrix source: targets = (1 - alpha) * onehot(y) + alpha * C[y]."""

    name = "proxy"
    summary = "PT-LS++: a frozen C-matrix (a c_matrix.safetensors, or an LS++ run directory holding one)"
    spec_arg = "PATH"
    options = (ALPHA,)

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "ProxyTeacher":
        if "c_matrix" in ctx.artifacts:  # a matrix in memory (Python)
            src = cls(ctx.artifacts["c_matrix"], proxy_alpha(cls.value(ctx, "alpha")))
            if src.num_classes != ctx.num_classes:
                raise KDError(f"c_matrix= is {src.num_classes} x {src.num_classes} but the source was asked for "
                              f"K={ctx.num_classes} classes; pass the C of a run on these classes")
            return src
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


TopKProxy.share(ProxyTeacher)


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
        c, meta = load_c_matrix(path)
        k_classes = c.shape[0]
    if num_classes is not None and k_classes != num_classes:
        raise KDError(f"{path}: the C-matrix has K={k_classes} classes but the data set has {num_classes}")
    if alpha is None and meta.get("alpha") is None:
        raise KDError(f"{path} records no alpha; pass --alpha")
    a = proxy_alpha(alpha, meta.get("alpha"))
    if meta.get("format") == TOPK_FORMAT:
        return TopKProxy(values, indices, a, meta)
    return ProxyTeacher(c, a, meta)


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


__all__ = ["ProxyTeacher", "TopKProxy", "load_proxy", "measure_c_matrix", "class_mean_probabilities",
           "off_diagonal_normalised", "proxy_alpha", "DEFAULT_ALPHA"]
