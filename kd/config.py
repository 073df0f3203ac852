"""Run configuration: one dataclass whose fields mirror the CLI flags and the YAML keys.

Target-source options (alpha, temperature, ...) are not fields: each source declares its own
(``kd.sources.Option``), and a config holds the given ones in ``options``. They read and write
as top-level keys like the fields (``alpha: 0.1``); which names are known comes from the source
table, so :meth:`TrainConfig.updated` is told them by its caller (``teachers.option_names()``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from kd.errors import KDError
from kd.tracking import parse_trackers


#: --compile-mode: none, or torch.compile's mode for the step (reduce-overhead replays CUDA graphs)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


#: What the command line takes for the fields left at None (the Python API reads None as "not given").
CLI_DEFAULTS = {"method": "lspp", "dataset": "digits", "preprocess": "matched", "augment": True, "num_workers": 4}
#: Fields that name things the command line loads or builds: the Python API is handed those objects instead.
#: Types of the fields whose default is None, for coercing YAML scalars.
_OPTIONAL_TYPES = {"image_size": int, "num_workers": int}


@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` means "not given": the data set's or the verb's default.

    Source options (``alpha``, ``temperature``, ...) may be passed as keywords, ``TrainConfig(alpha=0.2)``;
    they are kept in ``options``, read back as attributes (``cfg.alpha``), and refused by a source
    that does not declare them.
    """

    method: str | None = None     # teacher training: a label-only source (onehot | ls | lspp | ...); None: lspp
    teacher: str | None = None    # student training: a teacher SPEC (see `kd distill --help`)
    model: str | None = None
    dataset: str | None = None    # None: digits
    preprocess: str | None = None  # matched (None) | paper (the authors' released pipeline; fashion-mnist)
    data_root: str | None = None
    image_size: int | None = None  # imagefolder: side of the square images (default: the first image's)
    download: bool = False
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    c_weight_decay: bool = True   # apply weight decay to LS++'s C logits too
    c_lr_scale: float = 1.0       # C's learning rate = lr x this (1: the paper's one optimizer for both)
    optimizer: str = "sgd"        # sgd | adamw
    schedule: str = "cosine"      # cosine | step | constant
    warmup_epochs: float = 1.0
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of the run
    lr_gamma: float = 0.1         # step schedule: learning-rate factor at each milestone
    augment: bool | None = None   # the data set's batch augmentation (pad-and-crop, flip); None: on where it has one
    mixup: float = 0.0            # Mixup Beta parameter (0: off)
    cutmix: float = 0.0           # CutMix Beta parameter (0: off); with mixup: switch per batch, p = 0.5
    cutout: int = 0               # Cutout square size in pixels (0: off)
    aa: str | None = None         # RandAugment, "rand-mM-nN" (drawn per image, applied per batch, in loader workers)
    seed: int = 0
    val_fraction: float = 0.0     # > 0: train on the rest, evaluate on this stratified share of the training set
    val_seed: int = 0             # which stratified share (the split's seed, apart from the run's seed)
    device: str = "auto"          # auto | cpu | cuda
    amp: str = "none"             # none | bf16 | fp16
    channels_last: bool = False
    compile_mode: str = "none"    # none | default | reduce-overhead (CUDA graphs) | max-autotune: torch.compile the step
    compile_backend: str = "inductor"  # torch.compile backend (tests use aot_eager, which needs no C++ compiler)
    num_workers: int | None = None  # loader workers (folder data sets, --aa); None: 4 on the CLI, 0 in the API
    init: str | None = None       # weights to start from (safetensors, or a PyTorch file read with weights_only)
    init_sha256: str | None = None  # recorded by the command line: the SHA-256 of the init file the run started from
    reset_head: bool = False      # re-initialise the classifier of --init / --pretrained weights for this K
    pretrained: bool = False      # timm: / torchvision: names: the library's own pretrained weights
    log_with: str | None = None   # experiment trackers through accelerate, comma-separated (tensorboard, mlflow, ...)
    log_every: int = 50           # with log_with: the training loss every this many optimizer steps (0: epochs only)
    log_dir: str | None = None    # with log_with: where the trackers' files go (default: the run directory)
    # -- text data sets (text:PATH) --
    text_column: str | None = None   # the column holding the text (None: text)
    label_column: str | None = None  # the column holding the label, a name or an integer (None: label)
    tokenizer: str | None = None     # a tokenizer.json (a text run's) or hf:DIR; None: built from the training split
    max_length: int | None = None    # tokens kept per sample, cut in the collate (None: 256)
    hash_buckets: int | None = None  # hash n-grams into this many ids instead of a vocabulary (None or 0: vocabulary)
    word_ngrams: int | None = None   # word n-grams up to this order (None: 2)
    char_ngrams: int | None = None   # also each word's character n-grams of length 3..N (None or 0: none)
    max_vocab: int | None = None     # the vocabulary keeps the most frequent this many n-grams (None: 100000)
    options: dict[str, Any] = field(default_factory=dict)  # the target source's options that were given

    def __getattr__(self, name: str) -> Any:
        """A given source option read as an attribute (``cfg.alpha``)."""
        if name != "options" and not name.startswith("__"):
            options = self.__dict__.get("options") or {}
            if name in options:
                return options[name]
        raise AttributeError(f"TrainConfig has no field or given source option '{name}'")

    def with_cli_defaults(self) -> "TrainConfig":
        """A copy with the command line's defaults (:data:`CLI_DEFAULTS`) in the fields left at None."""
        return replace(self, **{k: v for k, v in CLI_DEFAULTS.items() if getattr(self, k) is None})

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise KDError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise KDError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise KDError(f"--lr must be positive, got {self.lr}")
        if not self.c_lr_scale > 0:
            raise KDError(f"--c-lr-scale must be positive (C's learning rate is lr x this), got {self.c_lr_scale}")
        if self.log_every < 0:
            raise KDError(f"--log-every must be >= 0 (0: epochs only), got {self.log_every}")
        parse_trackers(self.log_with)  # an unknown or uninstalled tracker is refused before a run starts
        if self.num_workers is not None and self.num_workers < 0:
            raise KDError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.weight_decay < 0:
            raise KDError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise KDError(f"--val-fraction must lie in [0, 1) (0: train on the whole training set), got {self.val_fraction}")
        if self.compile_mode == "reduce-overhead" and not self._cuda():
            raise KDError("--compile-mode reduce-overhead captures CUDA graphs and needs a CUDA device; "
                          "on the CPU use --compile-mode default")
        for key, allowed in (("optimizer", ("sgd", "adamw")), ("compile_mode", COMPILE_MODES),
                             ("schedule", ("cosine", "step", "constant")), ("amp", ("none", "bf16", "fp16")),
                             ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, key) not in allowed:
                raise KDError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        if self.mixup < 0 or self.cutmix < 0 or self.cutout < 0:
            raise KDError("--mixup, --cutmix (Beta parameters) and --cutout (pixels) must be >= 0 (0: off)")
        return self

    def _cuda(self) -> bool:
        """Whether this run trains on CUDA (``auto`` where a device is visible)."""
        if self.device == "cpu":
            return False
        import torch

        return torch.cuda.is_available()

    def with_options(self, **options: Any) -> "TrainConfig":
        """A copy with these source options set (None removes one)."""
        return replace(self, options=_given({**self.options, **options}))

    def to_dict(self) -> dict[str, Any]:
        """Fields and source options as one flat mapping of keys (the YAML form)."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return {**{k: v for k, v in d.items() if k != "options"}, **self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config", option_names=()) -> "TrainConfig":
        return cls().updated(d, where, option_names)

    def updated(self, d: dict[str, Any], where: str = "config", option_names=()) -> "TrainConfig":
        """A copy with the keys of ``d`` (dashes or underscores) replacing these values; keys in
        ``option_names`` (the source table's options) set source options, any other key is refused."""
        known = {f.name: f for f in fields(self) if f.name != "options"}
        values = {k: getattr(self, k) for k in known}
        options = dict(self.options)
        for key, value in d.items():
            k = str(key).replace("-", "_")
            if k in known:
                values[k] = value
            elif k in option_names:
                options[k] = value
            else:
                raise KDError(f"{where}: unknown key '{key}'; valid keys are {', '.join([*known, *option_names])}")
        values["milestones"] = tuple(values["milestones"])
        values["options"] = _given(options)
        try:
            out = type(self)(**values)
            for f in fields(out):  # coerce YAML scalars (e.g. "1e-3" strings) to the field's type
                v = getattr(out, f.name)
                default = f.default  # (source options are checked by their source)
                kind = _OPTIONAL_TYPES.get(f.name) or (type(default) if isinstance(default, (int, float)) and not
                                                       isinstance(default, bool) else None)
                if v is not None and kind is not None:
                    setattr(out, f.name, kind(v))
        except (TypeError, ValueError) as e:
            raise KDError(f"{where}: bad value ({e})") from None
        return out


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The source options that were given: a config keeps no None (None means "not given"; the source then takes
    its default, :meth:`kd.sources.Option.resolve`)."""
    return {k: v for k, v in options.items() if v is not None}


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys; a missing or malformed file is a KDError."""
    p = Path(path)
    if not p.is_file():
        raise KDError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise KDError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KDError(f"config file {p} must hold a mapping of keys to values")
    return data


_dataclass_init = TrainConfig.__init__


def _init(self, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """The dataclass's own __init__, plus source options as keywords: ``TrainConfig(method="lspp", alpha=0.2)``."""
    names = TrainConfig.__dataclass_fields__
    given = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    _dataclass_init(self, *args, options=_given({**(options or {}), **given}), **kwargs)


_init.__doc__ = TrainConfig.__doc__
TrainConfig.__init__ = _init  # type: ignore[method-assign]
