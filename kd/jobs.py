"""What the CLI verbs do, built on the engine: resolve data and model, fill a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kd import runs
from kd.config import TrainConfig
from kd.data import DataSplit, load_dataset
from kd.engine import FitResult, fit
from kd.models import create_model


def model_meta(cfg: TrainConfig, split: DataSplit, model_name: str) -> dict[str, Any]:
    """What a later job needs to rebuild and feed this run's network (see ``network:`` teachers)."""
    info = split.info
    return {
        "dataset": info.name, "model": model_name, "num_classes": info.num_classes,
        "in_channels": info.channels, "image_size": info.image_size,
        "mean": list(info.mean), "std": list(info.std), "class_names": info.class_names,
        "seed": cfg.seed,
    }


def build_model(cfg: TrainConfig, split: DataSplit):
    from accelerate.utils import set_seed

    name = cfg.model or split.info.default_model
    set_seed(cfg.seed)
    info = split.info
    return name, create_model(name, info.num_classes, info.channels, info.image_size)


def train_teacher_job(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print) -> FitResult:
    """`kd train-teacher`: train a network with 1-hot, LS or LS++ targets into run directory ``out``."""
    from teachers import DEFAULT_ALPHA, label_source

    cfg.validate()
    runs.check_new_run_dir(out)
    split = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    name, model = build_model(cfg, split)
    alpha = cfg.alpha if cfg.alpha is not None else DEFAULT_ALPHA
    source = label_source(cfg.method, split.info.num_classes, alpha)
    run_dir = runs.prepare_run_dir(out)
    resolved = cfg.updated({"model": name, "alpha": alpha if cfg.method != "onehot" else None})
    runs.write_config(run_dir, resolved.to_dict())
    meta = {"kind": "teacher", "method": cfg.method, "alpha": resolved.alpha, **model_meta(cfg, split, name)}
    return fit(model, source, split.train, split.test, resolved, info=split.info, run_dir=run_dir,
               meta=meta, progress=progress, log=log)
