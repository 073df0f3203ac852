"""The training side: a network trained from labels (:func:`train_teacher`) or from any target source
(:func:`distill`). Both are one call of the engine, :func:`kd.engine.fit`; they differ only in where
the targets come from: a label-only method named in the config (1-hot, LS, LS++, ...) or a teacher.

These are the Python API. Every ``TrainConfig`` field either acts here or is refused in one line:
the fields that name what the command line loads (``dataset``, ``model``, ``teacher``, ...) are
handed over as objects instead. Data may be ImageTensors, a map-style Dataset of (input, label)
pairs, a TensorDataset or an (inputs, labels) pair of NumPy arrays or tensors; a model may be a
module or a function that builds one, which is then built under ``config.seed``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kd.checkpoints import load_into
from kd.config import TrainConfig
from kd.data import DatasetInfo, ImageTensors, as_dataset, infer_num_classes, split_off_validation
from kd.engine import FitResult, fit, input_dtype_of
from kd.errors import KDError
from kd.seeding import seeded
from kd.sources import TargetSource
from teachers import SOURCES, make_source, option_names

ModelLike = nn.Module | Callable[[], nn.Module]

#: Why each command-line field is refused by the Python API, and what to do instead.
_CLI_FIELDS = {
    "teacher": "distill takes the teacher source as its second argument (teachers.make_source(NAME, K, ...))",
    "model": "pass the model itself (or a function that builds it)",
    "dataset": "pass the data itself; kd.data.load_dataset(NAME) loads a named data set",
    "preprocess": "prepare the data yourself; kd.data.load_dataset(NAME, preprocess=...) prepares a named one",
    "data_root": "pass the data itself; kd.data.load_dataset(NAME, ROOT) reads one from a folder",
    "image_size": "pass the data itself; kd.data.load_dataset('imagefolder:PATH', image_size=...) sizes a folder",
    "download": "kd.data.load_dataset(NAME, download=True) fetches a named data set",
    "pretrained": "build the model with kd.models.build_model(NAME, K, pretrained=True)",
    **{name: "encode the text yourself, or load a text folder with kd.data.load_dataset('text:PATH', "
       "text=kd.data.text.TextOptions(...))" for name in ("text_column", "label_column", "tokenizer", "max_length",
                                                     "hash_buckets", "word_ngrams", "char_ngrams", "max_vocab")},
}


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _check_config(config: TrainConfig | None, who: str, train_data, info: DatasetInfo | None) -> TrainConfig:
    """The config checked for the Python API: fields that act here pass, the others are refused in one line."""
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise KDError(f"{who}'s config must be a kd.config.TrainConfig, got {type(config).__name__}")
    cfg = config.validate()
    for name, instead in _CLI_FIELDS.items():
        value = getattr(cfg, name)
        if value not in (None, False):
            raise KDError(f"TrainConfig.{name}={value!r} is a command-line setting that {who} does not read; {instead}")
    if who == "distill" and cfg.method is not None:
        raise KDError(f"TrainConfig.method={cfg.method!r} names the targets train_teacher trains with; distill takes "
                      f"them from its teacher argument: drop method")
    if cfg.augment and info is None:
        raise KDError("TrainConfig.augment=True turns on the batch augmentation of proxykd's image sets, and this data "
                      "has none (no info=DatasetInfo): augment in your Dataset, or use mixup=/cutmix=")
    if cfg.num_workers and isinstance(train_data, (ImageTensors, torch.utils.data.TensorDataset, tuple, list)) \
            and not cfg.aa:
        raise KDError("TrainConfig.num_workers starts loader processes for map-style Datasets (and aa=); tensors in "
                      "memory are sliced in the training process: drop num_workers")
    if cfg.val_seed and not cfg.val_fraction:
        raise KDError("TrainConfig.val_seed picks the share val_fraction holds out; give val_fraction too")
    if cfg.reset_head and not cfg.init:
        raise KDError("TrainConfig.reset_head re-initialises the classifier of init= weights; give init=FILE")
    known = set(option_names())
    stray = [k for k in cfg.options if k not in known]
    if stray:
        raise KDError(f"TrainConfig has no field '{stray[0]}', and no source takes an option of that name")
    return cfg


def _evaluation(train_data, test_data, cfg: TrainConfig, eval_name: str | None):
    """(training data, evaluation data, its name): with ``val_fraction`` a stratified share of the training data."""
    train_data = as_dataset(train_data, "training")
    if cfg.val_fraction:
        if test_data is not None:
            raise KDError(f"TrainConfig.val_fraction={cfg.val_fraction} evaluates on a share held out of the training "
                          f"data; pass test_data=None (evaluate on the test set once the settings are chosen)")
        train_data, test_data = split_off_validation(train_data, cfg.val_fraction, cfg.val_seed, "val_fraction")
        return train_data, test_data, eval_name or "val"
    if test_data is None:
        raise KDError("give evaluation data (test_data), or TrainConfig(val_fraction=F) to hold a share of the "
                      "training data out for it")
    return train_data, test_data, eval_name or "test"


def _first_input(data) -> torch.Tensor | None:
    """One training input as a batch of one, or None when it cannot be had without decoding much."""
    if isinstance(data, ImageTensors):
        return data.images[:1].float() / data.scale
    if isinstance(data, torch.utils.data.TensorDataset):
        return data.tensors[0][:1]
    try:
        item = data[0]
    except Exception:  # any Dataset: its own errors surface when training reads it
        return None
    x = item[0] if isinstance(item, (tuple, list)) else item
    return torch.utils.data.default_collate([x]) if torch.is_tensor(x) or hasattr(x, "__array__") else None


def _outputs(model: nn.Module, data) -> int | None:
    """How many logits the model gives for one training input (None when that cannot be tried)."""
    x = _first_input(data)
    if x is None:
        return None
    x = torch.as_tensor(x)
    if x.is_floating_point():
        x = x.to(input_dtype_of(model))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(x.to(next(model.parameters(), torch.zeros(0)).device))
    except Exception:  # a shape error here is reported by the engine's own check, with the source's K
        return None
    finally:
        model.train(was)
    return int(out.shape[1]) if torch.is_tensor(out) and out.ndim == 2 else None


def _num_classes(model: nn.Module, train_data, test_data, num_classes: int | None, info: DatasetInfo | None) -> int:
    """K: given, the data set's, or the model's number of outputs checked against the labels."""
    if num_classes:
        return int(num_classes)
    if info is not None:
        return info.num_classes
    k_model = _outputs(model, train_data)
    try:
        k_labels = infer_num_classes(train_data, test_data)
    except KDError:
        if k_model is None:
            raise
        return k_model
    if k_model is None:
        return k_labels
    if k_labels > k_model:
        raise KDError(f"the model gives {k_model} outputs per sample but the labels go up to {k_labels - 1}; build it "
                      f"with {k_labels} outputs (or pass num_classes=K)")
    return k_model


def _build(model: ModelLike, cfg: TrainConfig) -> nn.Module:
    """The model: built under ``cfg.seed`` when given as a function, then started from ``cfg.init`` weights."""
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise KDError(f"the model must be an nn.Module or a function that builds one, got {type(model).__name__}")
        with seeded(cfg.seed):
            model = model()
        if not isinstance(model, nn.Module):
            raise KDError(f"the model function returned {type(model).__name__}, not an nn.Module")
    return model


def _start_weights(model: nn.Module, cfg: TrainConfig, k: int) -> None:
    if cfg.init:
        with seeded(cfg.seed):  # a re-initialised classifier keeps the model's own (seeded) initialisation
            load_into(model, cfg.init, reset_head=cfg.reset_head, num_classes=k)


def train_teacher(model: ModelLike, train_data, test_data=None, config: TrainConfig | None = None, *,
                  num_classes: int | None = None, info: DatasetInfo | None = None, run_dir: Path | None = None,
                  meta: dict[str, Any] | None = None, progress: bool = True, log=print, resume: bool = False,
                  eval_name: str | None = None) -> FitResult:
    """Train ``model`` with ``config.method`` targets (LS++ by default) on (input, label) data.

    Returns the engine's FitResult: ``.model`` is the network teacher and, for LS++,
    ``.source.c_matrix()`` its learned C-matrix (a detached copy) and ``.summary`` the final
    epoch's metrics with how far C moved from uniform. K is ``num_classes``, the data set's, or the
    model's number of outputs. ``model`` may be a function that builds the network: it is then built
    under ``config.seed``, so the run is reproducible from the seed alone.
    """
    cfg = _check_config(config, "train_teacher", train_data, info)
    train_data, test_data, eval_name = _evaluation(train_data, test_data, cfg, eval_name)
    model = _build(model, cfg)
    k = _num_classes(model, train_data, test_data, num_classes, info)
    _start_weights(model, cfg, k)
    source = teacher_source(cfg, k, info, len(train_data))
    return run_teacher(model, source, train_data, test_data, cfg, info=info, run_dir=run_dir, meta=meta,
                       progress=progress, log=log, resume=resume, eval_name=eval_name)


def teacher_source(cfg: TrainConfig, num_classes: int, info: DatasetInfo | None = None,
                   num_train: int | None = None) -> TargetSource:
    """The label-only source a teacher network trains with: ``cfg.method`` (LS++ where unset) built with the
    config's source options (an option the method does not declare is refused in one line)."""
    return make_source(cfg.method or "lspp", num_classes, label_only=True, dataset=info.name if info else None,
                       num_train=num_train, info=info, **cfg.options)


def _run_meta(kind: str, model: nn.Module, source: TargetSource, meta: dict[str, Any] | None) -> dict[str, Any]:
    """A run's summary entries: what trained, from which source, with the option values the source resolved
    (its defaults and what it read from its files), then the caller's (the command line's data and model)."""
    own = {"kind": kind, ("method" if kind == "teacher" else "teacher"): source.name, "source": source.name,
           "model": _model_name(model)}
    return {**own, **source.resolved_options(), **(meta or {})}


def run_teacher(model: nn.Module, source: TargetSource, train_data, test_data, cfg: TrainConfig, *,
                info: DatasetInfo | None = None, run_dir: Path | None = None, meta: dict[str, Any] | None = None,
                progress: bool = True, log=print, resume: bool = False, eval_name: str = "test") -> FitResult:
    """The engine call behind :func:`train_teacher` and `kd train-teacher` (no API checks: the command line
    resolved its config)."""
    return fit(model, source, train_data, test_data, cfg, info=info, run_dir=run_dir,
               meta=_run_meta("teacher", model, source, meta), progress=progress, log=log, resume=resume,
               eval_name=eval_name)


def _checked_teacher(teacher: Any) -> TargetSource:
    if isinstance(teacher, TargetSource):
        return teacher
    if isinstance(teacher, str):
        hint = f"teachers.make_source({teacher.partition(':')[0]!r}, K)" if teacher.partition(":")[0] in SOURCES \
            else "teachers.make_source(NAME, K)"
        raise KDError(f"distill's teacher must be a target source, got the string {teacher!r}; build it with {hint}")
    if isinstance(teacher, nn.Module):
        raise KDError("distill's teacher must be a target source; for a network use teachers.make_source('network', "
                      "K, model=net) (or teachers.network.NetworkTeacher(net, K))")
    if torch.is_tensor(teacher):
        raise KDError("distill's teacher must be a target source; for a C-matrix use teachers.make_source('proxy', K, "
                      "c_matrix=C) (or teachers.proxy.ProxyTeacher(C))")
    raise KDError(f"distill's teacher must be a target source (teachers.make_source(NAME, K, ...)), got "
                  f"{type(teacher).__name__}")


def distill(student: ModelLike, teacher: TargetSource, train_data, test_data=None, config: TrainConfig | None = None,
            *, info: DatasetInfo | None = None, run_dir: Path | None = None, meta: dict[str, Any] | None = None,
            progress: bool = True, log=print, resume: bool = False, eval_name: str | None = None) -> FitResult:
    """Train ``student`` on the targets ``teacher`` emits; data sets yield (input, label) pairs.

    ``teacher`` is any target source: ``teachers.make_source('onehot', K)``,
    ``make_source('proxy', K, c_matrix=C)`` (PT-LS++), ``make_source('network', K, model=net)``
    (online KD; the network is frozen in place), ``make_source('cached', K, logits=L)``, ...
    ``student`` may be a function that builds the network under ``config.seed``.
    """
    teacher = _checked_teacher(teacher)
    cfg = _check_config(config, "distill", train_data, info)
    train_data, test_data, eval_name = _evaluation(train_data, test_data, cfg, eval_name)
    student = _build(student, cfg)
    _start_weights(student, cfg, teacher.num_classes)
    return run_distill(student, teacher, train_data, test_data, cfg, info=info, run_dir=run_dir, meta=meta,
                       progress=progress, log=log, resume=resume, eval_name=eval_name)


def run_distill(student: nn.Module, teacher: TargetSource, train_data, test_data, cfg: TrainConfig, *,
                info: DatasetInfo | None = None, run_dir: Path | None = None, meta: dict[str, Any] | None = None,
                progress: bool = True, log=print, resume: bool = False, eval_name: str = "test") -> FitResult:
    """The engine call behind :func:`distill` and `kd distill` (no API checks: the command line resolved its config)."""
    warning = getattr(teacher, "augmentation_warning", None)
    if warning and cfg.augment is not False and info is not None and (info.crop_padding or info.flip):
        warnings.warn(warning, stacklevel=2)
    return fit(student, teacher, train_data, test_data, cfg, info=info, run_dir=run_dir,
               meta=_run_meta("student", student, teacher, meta), progress=progress, log=log, resume=resume,
               eval_name=eval_name)


__all__ = ["train_teacher", "distill", "teacher_source", "run_teacher", "run_distill", "seeded"]
