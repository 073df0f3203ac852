"""Target sources, one module per kind: onehot, smoothing (LS), lspp (LS++ and its trainer)."""
from __future__ import annotations

from kd.errors import KDError
from kd.sources import TargetSource

DEFAULT_ALPHA = 0.1


def label_source(method: str, num_classes: int, alpha: float | None = None) -> TargetSource:
    """The source a teacher is trained with: ``onehot``, ``ls`` or ``lspp``."""
    from teachers.lspp import LSPPLoss
    from teachers.onehot import OneHot
    from teachers.smoothing import LabelSmoothing

    a = DEFAULT_ALPHA if alpha is None else float(alpha)
    if method == "onehot":
        return OneHot(num_classes)
    if method == "ls":
        return LabelSmoothing(num_classes, a)
    if method == "lspp":
        return LSPPLoss(num_classes, a)
    raise KDError(f"unknown method '{method}'; choose onehot, ls or lspp")
