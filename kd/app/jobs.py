"""What the CLI verbs do, built on the engine: resolve data and model, fill a run directory."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import warnings

import torch
import yaml

from kd import models, runs
from kd.calibration import CALIBRATION, calibrate_logits, read_calibration
from kd.cmatrix import check_top_k, load_c_matrix, proxy_alpha, save_c_matrix, save_topk_c_matrix, top_k_rows
from kd.config import TrainConfig
from kd.data import DataSplit, load_dataset, load_dataset_of_run, validation_split
from kd.data.text import (TOKENIZER_FILE, check_model_fits, check_teacher_tokenizer, hf_path, save_run_tokenizer,
                          text_meta, text_options, text_path)
from kd.engine import FitResult, predict, resolve_device
from kd.errors import KDError
from kd.lock import run_lock
from kd.seeding import seeded
from students import run_distill, run_teacher, teacher_source
from teachers import make_source, teacher_from_spec
from teachers.cached import save_cache
from teachers.network import NetworkTeacher, load_teacher_network
from teachers.proxy import measure_c_matrix
from teachers.topk import save_topk_cache


def model_meta(cfg: TrainConfig, split: DataSplit, model_name: str) -> dict[str, Any]:
    """What a later job needs to rebuild and feed this run's network (see ``network:`` teachers)."""
    info = split.info
    return {
        "dataset": info.name, "preprocess": info.preprocess, "model": model_name, "num_classes": info.num_classes,
        "in_channels": info.channels, "image_size": info.image_size,
        "mean": list(info.mean), "std": list(info.std), "class_names": info.class_names,
        "seed": cfg.seed, "lr": cfg.lr,
        **({"val_fraction": cfg.val_fraction, "val_seed": cfg.val_seed} if cfg.val_fraction else {}),
        **text_meta(cfg, split),  # text: in_channels is the vocabulary size, image_size the longest sequence
    }


def load_split(cfg: TrainConfig) -> tuple[DataSplit, int, str]:
    """The run's data: (split, size of the full training set, what the split's ``test`` part is).

    With ``cfg.val_fraction`` the split is (training set minus a stratified share, that share) and
    the evaluation is named ``val``: the test set is not loaded into the run at all.
    """
    split = load_dataset(cfg.dataset, cfg.data_root, cfg.download, image_size=cfg.image_size,
                         preprocess=cfg.preprocess, text=text_options(cfg))
    num_train = len(split.train)
    if cfg.val_fraction:
        return validation_split(split, cfg.val_fraction, cfg.val_seed), num_train, "val"
    return split, num_train, "test"


def build_model(cfg: TrainConfig, split: DataSplit, resume: bool = False, log=print):
    """The run's network, built under its seed, started from ``--init`` or ``--pretrained`` weights (not when
    resuming: the checkpoint holds the weights). Returns (name, model, the config with the init file's SHA-256)."""
    name = cfg.model or split.info.default_model
    if hf_path(name) is not None:  # recorded absolute: a later job rebuilds the network from another directory
        name = f"hf:{hf_path(name).resolve()}"
    info = split.info
    check_model_fits(name, info)
    with seeded(cfg.seed):
        model, record = models.build_model(name, info.num_classes, info.channels, info.image_size,
                                           init=None if resume else cfg.init, pretrained=cfg.pretrained and not resume,
                                           reset_head=cfg.reset_head and not resume, log=log)
    if "init_sha256" in record:
        cfg = cfg.updated({"init_sha256": record["init_sha256"]})
    return name, model, cfg


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
    cfg = cfg.with_cli_defaults().validate()
    _open_run(out, resume)
    own = Path(out) / TOKENIZER_FILE  # a resumed text run encodes with the tokenizer it started with
    split, num_train, eval_name = load_split(cfg.updated({"tokenizer": str(own)}) if resume and own.is_file()
                                             and cfg.tokenizer is None and hf_path(cfg.model) is None else cfg)
    source = teacher_source(cfg, split.info.num_classes, split.info, num_train)
    name, model, cfg = build_model(cfg, split, resume, log)
    resolved = cfg.updated({"model": name}).with_options(**source.resolved_options())
    with run_lock(out, runs.launch_rank()):  # a second run on the same --out refuses instead of interleaving
        run_dir = _start_or_continue(out, resolved, resume)
        if runs.launch_rank() == 0:
            save_run_tokenizer(run_dir, split)  # text: the students, cache and proxy of this run encode with it
        return run_teacher(model, source, split.train, split.test, resolved, info=split.info, run_dir=run_dir,
                           meta=model_meta(cfg, split, name), progress=progress, log=log, resume=resume,
                           eval_name=eval_name)


def distill_job(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print,
                resume: bool = False) -> FitResult:
    """`kd distill`: train a student (cfg.model) from the teacher SPEC cfg.teacher into ``out``.

    Without ``--dataset`` the data set is the teacher's where its files name one (a run directory, a
    proxy or a cache made by proxykd), prepared as the teacher's was; else digits."""
    if not cfg.teacher:
        raise KDError("--teacher SPEC is required")
    if cfg.dataset is None:
        cfg = cfg.updated(teacher_data(cfg.teacher))
    cfg = cfg.with_cli_defaults().validate()
    run = teacher_run_dir(cfg.teacher)
    cfg = teacher_text(cfg, run)
    _open_run(out, resume)
    split, num_train, eval_name = load_split(cfg)
    teacher = teacher_from_spec(cfg.teacher, split.info, num_train, **cfg.options)
    if teacher.needs_inputs and run is not None:  # a network teacher reads the student's token ids
        check_teacher_tokenizer(cfg.teacher, split, run)
    name, student, cfg = build_model(cfg, split, resume, log)
    resolved = cfg.updated({"model": name}).with_options(**teacher.resolved_options())
    meta = {"teacher": cfg.teacher, "teacher_kind": cfg.teacher.partition(":")[0], **model_meta(cfg, split, name)}
    with run_lock(out, runs.launch_rank()), warnings.catch_warnings():
        run_dir = _start_or_continue(out, resolved, resume)
        if runs.launch_rank() == 0:
            save_run_tokenizer(run_dir, split)
        warnings.simplefilter("always")
        return run_distill(student, teacher, split.train, split.test, resolved, info=split.info, run_dir=run_dir,
                           meta=meta, progress=progress, log=log, resume=resume, eval_name=eval_name)


def teacher_run_dir(spec: str) -> Path | None:
    """The finished teacher run a SPEC names: its RUN_DIR, or the run a proxy or cache file was made from (the
    file's ``teacher_run`` entry); None for anything else."""
    kind, _, arg = spec.partition(":")
    if not arg or "@" in arg:
        return None
    path = Path(arg)
    if path.is_file() and path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                path = Path((f.metadata() or {}).get("teacher_run") or "")
        except Exception:  # an unreadable file is reported, in one line, by the source that reads it
            return None
    return path if str(path) not in ("", ".") and (path / runs.SUMMARY).is_file() else None


def teacher_text(cfg: TrainConfig, run: Path | None) -> TrainConfig:
    """A text student reads its data as its teacher run did: the run's columns, and the run's tokenizer.json
    (an hf:DIR student keeps its own tokenizer); settings given explicitly stay."""
    if run is None or text_path(cfg.dataset) is None or not (run / TOKENIZER_FILE).is_file():
        return cfg
    meta = runs.read_summary(run)
    if meta.get("dataset") != cfg.dataset and text_path(meta.get("dataset")) != text_path(cfg.dataset).resolve():
        return cfg
    given = {k: meta[k] for k in ("text_column", "label_column") if getattr(cfg, k) is None and meta.get(k)}
    own = cfg.tokenizer is not None or hf_path(cfg.model) is not None or cfg.max_length is not None \
        or any(getattr(cfg, k) is not None for k in ("hash_buckets", "word_ngrams", "char_ngrams", "max_vocab"))
    if not own:
        given["tokenizer"] = str(run / TOKENIZER_FILE)
    return cfg.updated(given) if given else cfg


def teacher_data(spec: str) -> dict[str, Any]:
    """The data set (and preparation) a teacher SPEC's files name: a run directory's summary, a proxy's or a
    cache's metadata; {} where they name none (a checkpoint of the user's own, a label-only source)."""
    kind, _, arg = spec.partition(":")
    if not arg or "@" in arg:
        return {}
    path = Path(arg)
    if path.is_dir() and (path / runs.SUMMARY).is_file():
        meta = runs.read_summary(path)
        return {k: meta[k] for k in ("dataset", "preprocess") if meta.get(k)}
    if path.is_file() and path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                name = (f.metadata() or {}).get("dataset")
        except Exception:  # an unreadable file is reported, in one line, by the source that reads it
            return {}
        return {"dataset": name} if name else {}
    return {}


class _TeacherOutputs(torch.nn.Module):
    """A network teacher's logits for the data set's classes, on inputs normalised as the data set's."""

    def __init__(self, teacher: NetworkTeacher):
        super().__init__()
        self.source = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.teacher_logits(x)


def _finished_run(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a teacher run directory; a weights file given in its place gets the flags it needs."""
    path = Path(run_dir)
    if path.is_file():
        raise KDError(f"{path} is a file, not a run directory: give a network's weights as --model MODEL "
                      f"--weights {path} --dataset NAME")
    return runs.read_summary(path)


def teacher_network(run_dir: str | Path | None, dataset: str | None, data_root: str | None = None, *,
                    model: str | None = None, weights: str | None = None, pretrained: bool = False,
                    class_map: str | None = None, teacher_norm: str | None = None):
    """(teacher source, data split, description) for `kd proxy export` and `kd teacher cache`: a finished run's
    network, or network ``model`` with ``weights`` (or the library's pretrained ones) on data set ``dataset``."""
    if run_dir is not None and (model or weights or pretrained):
        raise KDError("give a teacher run directory, or --model MODEL with --weights FILE (or --pretrained), not both")
    if run_dir is None:
        if not model:
            raise KDError("give a teacher run directory, or --model MODEL with --weights FILE (or --pretrained)")
        if bool(weights) == bool(pretrained):
            raise KDError(f"--model {model} needs its weights: --weights FILE or --pretrained (one of them)")
        if not dataset:
            raise KDError(f"--model {model} needs --dataset NAME: the data the teacher runs on")
        split = load_dataset(dataset, data_root)
        spec, described = f"{model}@{weights or 'pretrained'}", f"{model}@{weights or 'pretrained'}"
    else:
        meta = _finished_run(run_dir)
        name = dataset or meta["dataset"]
        split = load_dataset_of_run(meta, data_root, run_dir) if name == meta["dataset"] else load_dataset(name, data_root)
        if meta["dataset"] != split.info.name and class_map is None:
            raise KDError(f"teacher run {run_dir} was trained on '{meta['dataset']}', not '{split.info.name}'; drop "
                          f"--dataset, or connect the classes with --class-map")
        spec, described = str(run_dir), str(run_dir)
    options = {k: v for k, v in (("class_map", class_map), ("teacher_norm", teacher_norm)) if v is not None}
    teacher = make_source("network", split.info.num_classes, arg=spec, dataset=split.info.name,
                          num_train=len(split.train), info=split.info, **options)
    return teacher, split, described


def _teacher_train_logits(teacher: NetworkTeacher, split, device: str):
    logits, labels = predict(_TeacherOutputs(teacher), split.train, split.info, device=resolve_device(device))
    return logits.cpu(), labels.cpu()


def export_proxy_job(run_dir: str | Path | None, out: str | Path, source: str = "auto", alpha: float | None = None,
                     data_root: str | None = None, device: str = "auto", top_k: int | None = None, *,
                     model: str | None = None, weights: str | None = None, pretrained: bool = False,
                     dataset: str | None = None, class_map: str | None = None, teacher_norm: str | None = None) -> Path:
    """`kd proxy export`: write a C-matrix artifact for any trained network.

    The network is a finished run (``run_dir``) or ``model`` with ``weights`` from a file (or the library's
    ``pretrained`` ones) on ``dataset``; ``class_map`` connects a teacher trained on other classes.
    ``source``: ``learned`` (an LS++ run's own C), ``measured`` (class means of the
    network's training-set softmax, diagonal removed, rows renormalised) or ``auto``
    (learned where there is one). ``top_k``: keep only the k largest entries of each row,
    renormalised to sum to 1, stored sparsely (``teachers.proxy.save_topk_c_matrix``).
    """
    out = runs.check_new_file(out)
    run = Path(run_dir) if run_dir is not None else None
    proxy_alpha(alpha)  # a bad --alpha is refused before the pass over the data
    has_learned = run is not None and (run / runs.C_MATRIX).is_file()
    if source == "auto":
        source = "learned" if has_learned and class_map is None else "measured"
    if source == "learned":
        if run is None:
            raise KDError("--from learned reads the C an LS++ run learned: give its run directory")
        if class_map is not None:
            raise KDError("a learned C is over the run's own classes; use --from measured with --class-map")
        meta = _finished_run(run)
        if top_k is not None:
            top_k = check_top_k(top_k, meta["num_classes"])
        if not has_learned:
            raise KDError(f"{run} has no learned C-matrix (not an LS++ run); use --from measured")
        c, cmeta = load_c_matrix(run)
        a = proxy_alpha(alpha, cmeta.get("alpha"))
        names = cmeta.get("class_names") or meta.get("class_names")
        data_name, extra = meta.get("dataset", ""), {"teacher_run": str(run)}
    else:
        teacher, split, described = teacher_network(run, dataset, data_root, model=model, weights=weights,
                                                    pretrained=pretrained, class_map=class_map,
                                                    teacher_norm=teacher_norm)
        if top_k is not None:  # before the pass over the data a measured proxy takes
            top_k = check_top_k(top_k, split.info.num_classes)
        logits, labels = _teacher_train_logits(teacher, split, device)
        c = measure_c_matrix(logits.softmax(-1), labels, split.info.num_classes)
        a = proxy_alpha(alpha, runs.read_summary(run).get("alpha") if run is not None else None)
        names = split.info.class_names
        data_name = split.info.name
        extra = {"teacher_run": described} if run is not None else {"teacher": described}
        if class_map is not None:
            extra["class_map"] = str(class_map)
    extra = {"source": f"lspp-{source}" if source == "learned" else "measured", "dataset": data_name, **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    if top_k is not None:
        values, indices = top_k_rows(c, top_k)
        save_topk_c_matrix(out, values, indices, a, names, extra)
    else:
        save_c_matrix(out, c, a, names, extra)
    return out


def cache_job(run_dir: str | Path | None, dataset: str | None, out: str | Path, data_root: str | None = None,
              device: str = "auto", top_k: int | None = None, *, model: str | None = None,
              weights: str | None = None, pretrained: bool = False, class_map: str | None = None,
              teacher_norm: str | None = None) -> Path:
    """`kd teacher cache`: the teacher's logits for every training sample, in data set order (a finished run's
    network, or ``model`` with ``weights`` on ``dataset``; ``class_map``: the outputs for the data's classes).

    ``top_k``: store each sample's k largest probabilities and their classes instead
    (FKD-style, ``teachers.cached.TopKCached``).
    """
    out = runs.check_new_file(out)
    teacher, split, described = teacher_network(run_dir, dataset, data_root, model=model, weights=weights,
                                                pretrained=pretrained, class_map=class_map, teacher_norm=teacher_norm)
    if top_k is not None:  # before the pass over the data
        top_k = check_top_k(top_k, split.info.num_classes)
    logits, _ = _teacher_train_logits(teacher, split, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    if top_k is not None:
        save_topk_cache(out, logits, top_k, split.info.name, described)
    else:
        save_cache(out, logits, split.info.name, described)
    return out


def calibrate_run(run_dir: str | Path, data_root: str | None = None, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Fit a finished run's temperature and write ``RUN/calibration.json``; a run already calibrated keeps
    its file (returned as it is)."""
    run_dir = Path(run_dir)
    done = read_calibration(run_dir)
    if done is not None:
        return done
    if not (run_dir / runs.SUMMARY).is_file():
        raise KDError(f"{run_dir} is not a finished run (no {runs.SUMMARY}); calibrate a run directory that "
                      f"`kd train-teacher` or `kd distill` finished")
    model, meta = load_teacher_network(run_dir)
    cfg = (yaml.safe_load((run_dir / runs.CONFIG).read_text()) or {}) if (run_dir / runs.CONFIG).is_file() else {}
    split = load_dataset_of_run(meta, data_root, run_dir)
    dev = resolve_device(device)
    model = model.eval()
    test_logits, test_labels = predict(model, split.test, split.info, device=dev)
    vf, vs = float(cfg.get("val_fraction") or 0.0), int(cfg.get("val_seed", 0))
    if vf > 0:  # trained on a validation split: T is fitted there, and the whole test set is measured
        val_logits, val_labels = predict(model, validation_split(split, vf, vs).test, split.info, device=dev)
        out = calibrate_logits(test_logits.cpu(), test_labels.cpu(), val_logits.cpu(), val_labels.cpu())
        out.update(val_fraction=vf, val_seed=vs)
    else:
        out = calibrate_logits(test_logits.cpu(), test_labels.cpu(), seed=seed)
    out["made"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    runs.atomic_write(run_dir / CALIBRATION, json.dumps(out, indent=2) + "\n")
    return out
