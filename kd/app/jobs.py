"""What the CLI verbs do, built on the engine: resolve data and model, fill a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import warnings

import torch
from accelerate.utils import set_seed

from kd import runs
from kd.config import TrainConfig
from kd.data import DataSplit, load_dataset, load_dataset_of_run, validation_split
from kd.engine import FitResult, fit, predict, resolve_device
from kd.errors import KDError
from kd.lock import run_lock
from kd.models import create_model
from students import distill
from teachers import DEFAULT_ALPHA, make_source, teacher_from_spec
from teachers.cached import save_cache, save_topk_cache
from teachers.network import load_teacher_network
from teachers.proxy import ProxyTeacher, check_top_k, measure_c_matrix, save_topk_c_matrix, top_k_rows


def model_meta(cfg: TrainConfig, split: DataSplit, model_name: str) -> dict[str, Any]:
    """What a later job needs to rebuild and feed this run's network (see ``network:`` teachers)."""
    info = split.info
    return {
        "dataset": info.name, "preprocess": info.preprocess, "model": model_name, "num_classes": info.num_classes,
        "in_channels": info.channels, "image_size": info.image_size,
        "mean": list(info.mean), "std": list(info.std), "class_names": info.class_names,
        "seed": cfg.seed, "lr": cfg.lr,
        **({"val_fraction": cfg.val_fraction, "val_seed": cfg.val_seed} if cfg.val_fraction else {}),
    }


def load_split(cfg: TrainConfig) -> tuple[DataSplit, int, str]:
    """The run's data: (split, size of the full training set, what the split's ``test`` part is).

    With ``cfg.val_fraction`` the split is (training set minus a stratified share, that share) and
    the evaluation is named ``val``: the test set is not loaded into the run at all.
    """
    split = load_dataset(cfg.dataset, cfg.data_root, cfg.download, image_size=cfg.image_size,
                         preprocess=cfg.preprocess)
    num_train = len(split.train)
    if cfg.val_fraction:
        return validation_split(split, cfg.val_fraction, cfg.val_seed), num_train, "val"
    return split, num_train, "test"


def build_model(cfg: TrainConfig, split: DataSplit):
    name = cfg.model or split.info.default_model
    set_seed(cfg.seed)
    info = split.info
    return name, create_model(name, info.num_classes, info.channels, info.image_size)


def _open_run(out: str | Path, resume: bool) -> None:
    """A new run must get an empty directory; a resumed one must be an unfinished run."""
    if runs.launch_rank() != 0:  # other ranks never touch the run directory
        return
    if resume:
        runs.resumable_config(out)
    else:
        runs.check_new_run_dir(out)


def _start_or_continue(out: str | Path, resolved: TrainConfig, resume: bool) -> Path:
    if not resume:
        return runs.start_run(out, resolved.to_dict())
    if runs.launch_rank() == 0:  # `--resume --lr` changes the run's settings: its config.yaml says so
        runs.write_config(Path(out), resolved.to_dict())
    return Path(out)


def train_teacher_job(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print,
                      resume: bool = False) -> FitResult:
    """`kd train-teacher`: train a network with a label-only source (1-hot, LS, LS++, ...) into ``out``."""
    cfg.validate()
    _open_run(out, resume)
    split, num_train, eval_name = load_split(cfg)
    source = make_source(cfg.method, split.info.num_classes, label_only=True, dataset=split.info.name,
                         num_train=num_train, info=split.info, **cfg.source_options())
    name, model = build_model(cfg, split)
    resolved = cfg.updated({"model": name}).with_options(alpha=getattr(source, "alpha", None))
    meta = {"kind": "teacher", "method": cfg.method, "alpha": resolved.options.get("alpha"), **model_meta(cfg, split, name)}
    with run_lock(out, runs.launch_rank()):  # a second run on the same --out refuses instead of interleaving
        run_dir = _start_or_continue(out, resolved, resume)
        return fit(model, source, split.train, split.test, resolved, info=split.info, run_dir=run_dir,
                   meta=meta, progress=progress, log=log, resume=resume, eval_name=eval_name)


def distill_job(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print,
                resume: bool = False) -> FitResult:
    """`kd distill`: train a student (cfg.model) from the teacher SPEC cfg.teacher into ``out``."""
    cfg.validate()
    if not cfg.teacher:
        raise KDError("--teacher SPEC is required")
    _open_run(out, resume)
    split, num_train, eval_name = load_split(cfg)
    teacher = teacher_from_spec(cfg.teacher, split.info, num_train, **cfg.source_options())
    name, student = build_model(cfg, split)
    resolved = cfg.updated({"model": name}).with_options(alpha=getattr(teacher, "alpha", None))
    meta = {"kind": "student", "teacher": cfg.teacher, "teacher_kind": cfg.teacher.partition(":")[0],
            "alpha": resolved.options.get("alpha"), **model_meta(cfg, split, name)}
    with run_lock(out, runs.launch_rank()), warnings.catch_warnings():
        run_dir = _start_or_continue(out, resolved, resume)
        warnings.simplefilter("always")
        return distill(student, teacher, split.train, split.test, resolved, info=split.info, run_dir=run_dir,
                       meta=meta, progress=progress, log=log, resume=resume, eval_name=eval_name)


def _teacher_train_logits(run_dir: Path, dataset: str | None, data_root: str | None, device: str):
    model, meta = load_teacher_network(run_dir)
    name = dataset or meta["dataset"]
    split = load_dataset_of_run(meta, data_root) if name == meta["dataset"] else load_dataset(name, data_root)
    if meta["dataset"] != split.info.name:
        raise KDError(f"teacher run {run_dir} was trained on '{meta['dataset']}', not '{split.info.name}'")
    logits, labels = predict(model, split.train, split.info, device=resolve_device(device))
    return logits.cpu(), labels.cpu(), meta, split


def export_proxy_job(run_dir: str | Path, out: str | Path, source: str = "auto", alpha: float | None = None,
                     data_root: str | None = None, device: str = "auto", top_k: int | None = None) -> Path:
    """`kd proxy export`: write a C-matrix artifact for any trained network run.

    ``source``: ``learned`` (an LS++ run's own C), ``measured`` (class means of the
    network's training-set softmax, diagonal removed, rows renormalised) or ``auto``
    (learned where there is one). ``top_k``: keep only the k largest entries of each row,
    renormalised to sum to 1, stored sparsely (``teachers.proxy.save_topk_c_matrix``).
    """
    run_dir, out = Path(run_dir), runs.check_new_file(out)
    meta = runs.read_summary(run_dir)
    if top_k is not None:  # these checks come before the pass over the data a measured proxy takes
        top_k = check_top_k(top_k, meta["num_classes"])
    if alpha is not None:
        alpha = ProxyTeacher.option("alpha").check(alpha, "proxy")
    has_learned = (run_dir / runs.C_MATRIX).is_file()
    if source == "auto":
        source = "learned" if has_learned else "measured"
    if source == "learned":
        if not has_learned:
            raise KDError(f"{run_dir} has no learned C-matrix (not an LS++ run); use --from measured")
        c, cmeta = runs.load_c_matrix(run_dir)
        a = alpha if alpha is not None else cmeta["alpha"]
        names = cmeta.get("class_names") or meta.get("class_names")
    else:
        logits, labels, meta, split = _teacher_train_logits(run_dir, None, data_root, device)
        c = measure_c_matrix(logits.softmax(-1), labels, split.info.num_classes)
        a = alpha if alpha is not None else (meta.get("alpha") or DEFAULT_ALPHA)
        names = split.info.class_names
    extra = {"source": f"lspp-{source}" if source == "learned" else "measured",
             "dataset": meta.get("dataset", ""), "teacher_run": str(run_dir)}
    if top_k is not None:
        values, indices = top_k_rows(c, top_k)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_topk_c_matrix(out, values, indices, a, names, extra)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.save_c_matrix(out, c, a, names, extra)
    return out


def cache_job(run_dir: str | Path, dataset: str | None, out: str | Path, data_root: str | None = None,
              device: str = "auto", top_k: int | None = None) -> Path:
    """`kd teacher cache`: the teacher's logits for every training sample, in data set order.

    ``top_k``: store each sample's k largest probabilities and their classes instead
    (FKD-style, ``teachers.cached.TopKCached``).
    """
    out = runs.check_new_file(out)
    if top_k is not None:  # before the pass over the data
        top_k = check_top_k(top_k, runs.read_summary(Path(run_dir))["num_classes"])
    logits, _, meta, split = _teacher_train_logits(Path(run_dir), dataset, data_root, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    if top_k is not None:
        save_topk_cache(out, logits, top_k, split.info.name, str(run_dir))
    else:
        save_cache(out, logits, split.info.name, str(run_dir))
    return out
