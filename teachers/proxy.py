"""PT-LS++: a K x K C-matrix standing in for the teacher network (paper Section 5.3).

Targets are (1 - alpha) * onehot(y) + alpha * C[y]: one row gather per batch. The matrix is
frozen. Any trained network yields one with :func:`measure_c_matrix` (class-conditional mean
of its softmax over the training set, diagonal removed, rows renormalised), so 1-hot and LS
teachers have proxies too; an LS++ run also carries the C it learned.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kd import runs
from kd.errors import KDError
from kd.sources import SourceContext, TableSource, proxy_table


class ProxyTeacher(TableSource):
    """Frozen C-matrix source: targets = (1 - alpha) * onehot(y) + alpha * C[y]."""

    name = "proxy"
    summary = "PT-LS++: a frozen C-matrix (a c_matrix.safetensors, or an LS++ run directory holding one)"
    spec_arg = "PATH"
    options = {"alpha": "weight of C in the target (default: the alpha the C-matrix records)"}

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "ProxyTeacher":
        if not arg:
            raise KDError("teacher 'proxy' needs a path: proxy:PATH (a c_matrix.safetensors or an LS++ run directory)")
        src = load_proxy(arg, alpha=ctx.option("alpha"), num_classes=ctx.num_classes)
        ds = src.meta.get("dataset")
        if ds and ctx.dataset and ds != ctx.dataset:
            raise KDError(f"{arg}: the C-matrix was made on data set '{ds}', not '{ctx.dataset}'")
        return src

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "ProxyTeacher":
        k = ctx.num_classes
        c = torch.rand(k, k, generator=torch.Generator().manual_seed(0)).fill_diagonal_(0)
        return cls(c / c.sum(1, keepdim=True), ctx.option("alpha", 0.1))

    def __init__(self, c_matrix: torch.Tensor, alpha: float = 0.1, meta: dict | None = None):
        c = torch.as_tensor(c_matrix, dtype=torch.float32)
        super().__init__(proxy_table(c, alpha))
        self.alpha = float(alpha)
        self.meta = dict(meta or {})  # the artifact's metadata (data set, class names, ...)
        self.register_buffer("c_matrix", c.clone(), persistent=False)


def load_proxy(path: str | Path, alpha: float | None = None, num_classes: int | None = None) -> ProxyTeacher:
    """A proxy teacher from a ``c_matrix.safetensors`` or a run directory holding one.

    ``alpha`` overrides the artifact's; ``num_classes`` is checked against the matrix.
    """
    c, meta = runs.load_c_matrix(path)
    if num_classes is not None and c.shape[0] != num_classes:
        raise KDError(f"{path}: the C-matrix has K={c.shape[0]} classes but the data set has {num_classes}")
    a = alpha if alpha is not None else meta.get("alpha")
    if a is None:
        raise KDError(f"{path} records no alpha; pass --alpha")
    if not 0.0 < float(a) < 1.0:
        raise KDError(f"alpha must lie in (0, 1), got {a}")
    return ProxyTeacher(c, float(a), meta)


def off_diagonal_normalised(m: torch.Tensor) -> torch.Tensor:
    """Zero the diagonal of a K x K matrix and renormalise each row to sum to 1."""
    m = m.double().clone()
    m.fill_diagonal_(0.0)
    sums = m.sum(1, keepdim=True)
    if (sums <= 0).any():
        raise KDError("a class has no off-diagonal probability mass; cannot build its proxy row")
    return (m / sums).float()


@torch.no_grad()
def class_mean_probabilities(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K x K matrix whose row k is the mean of ``probs`` over the samples of class k."""
    probs = probs.double()
    sums = torch.zeros(num_classes, probs.shape[1], dtype=torch.float64, device=probs.device).index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).double().unsqueeze(1)
    if (counts == 0).any():
        missing = int((counts.squeeze(1) == 0).nonzero()[0])
        raise KDError(f"class {missing} has no training samples; cannot measure its proxy row")
    return sums / counts


def measure_c_matrix(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Proxy C from a teacher's softmax outputs: class means, diagonal removed, rows renormalised."""
    return off_diagonal_normalised(class_mean_probabilities(probs, labels, num_classes))
