"""The training side: a network trained from labels (:func:`train_teacher`) or from any target source
(:func:`distill`). Both are one call of the engine, :func:`kd.engine.fit`; they differ only in where
the targets come from: a label-only method named in the config (1-hot, LS, LS++, ...) or a teacher.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from kd.config import TrainConfig
from kd.data import DatasetInfo, infer_num_classes
from kd.engine import FitResult, fit
from kd.sources import TargetSource
from teachers import make_source


def train_teacher(model: nn.Module, train_data, test_data, config: TrainConfig | None = None, *,
                  num_classes: int | None = None, info: DatasetInfo | None = None, run_dir: Path | None = None,
                  meta: dict[str, Any] | None = None, progress: bool = True, log=print, resume: bool = False,
                  eval_name: str = "test") -> FitResult:
    """Train ``model`` with ``config.method`` targets (LS++ by default) on (input, label) data.

    Returns the engine's FitResult: ``.model`` is the network teacher and, for LS++,
    ``.source.c_matrix()`` its learned C-matrix.
    """
    cfg = (config or TrainConfig()).validate()
    k = num_classes or (info.num_classes if info is not None else infer_num_classes(train_data))
    source = make_source(cfg.method, k, label_only=True, dataset=info.name if info else None,
                         num_train=len(train_data), info=info, **cfg.source_options())
    return fit(model, source, train_data, test_data, cfg, info=info, run_dir=run_dir, meta=meta,
               progress=progress, log=log, resume=resume, eval_name=eval_name)


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


__all__ = ["train_teacher", "distill"]
