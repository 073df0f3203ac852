"""The student side: train any model from any target source (the distillation entry point)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from kd.config import TrainConfig
from kd.data import DatasetInfo
from kd.engine import FitResult, fit
from kd.sources import TargetSource


def distill(student: nn.Module, teacher: TargetSource, train_data, test_data, config: TrainConfig | None = None, *,
            info: DatasetInfo | None = None, run_dir: Path | None = None, meta: dict[str, Any] | None = None,
            progress: bool = True, log=print, resume: bool = False, eval_name: str = "test") -> FitResult:
    """Train ``student`` on the targets ``teacher`` emits; data sets yield (input, label) pairs.

    ``teacher`` is any target source: ``teachers.make_source('onehot', K)``,
    ``teachers.proxy.ProxyTeacher(C, alpha)``, ``teachers.network.NetworkTeacher(net, K)``,
    ``teachers.cached.CachedTeacher(logits)``, ...
    """
    cfg = (config or TrainConfig()).validate()
    warning = getattr(teacher, "augmentation_warning", None)
    if warning and cfg.augment and info is not None and (info.crop_padding or info.flip):
        warnings.warn(warning, stacklevel=2)
    return fit(student, teacher, train_data, test_data, cfg, info=info, run_dir=run_dir, meta=meta,
               progress=progress, log=log, resume=resume, eval_name=eval_name)
