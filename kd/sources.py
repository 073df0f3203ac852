"""The target-source contract: every teacher emits a B x K probability matrix for a batch.

A source is an ``nn.Module`` so that learnable sources (LS++'s C logits) live inside the
module that accelerate prepares. Label-only sources are a K x K table T: integer labels y
give T[y], soft labels m (mixup, cutmix) give m @ T.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.losses import soft_cross_entropy


@dataclass(frozen=True)
class Option:
    """A setting a source reads, declared once on the source: its name is the YAML key and, with
    dashes, the CLI flag; ``check`` is the one place its type and bounds are enforced (sources call
    it when they are built, whichever way the value came: flag, YAML key, SPEC argument or API).

    An option given as None is not given: :meth:`resolve` gives its ``default`` instead, the one rule for
    unset values. ``default`` None means the source decides at build time (a proxy takes its
    artifact's alpha). Bounds are ``low``/``high``, open or closed.
    """

    name: str
    help: str
    default: Any = None
    type: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds(self) -> str:
        """The allowed range in words: "in (0, 1)", "positive", "non-negative", "> 2" or ""."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low == 0:
            return "positive" if self.low_open else "non-negative"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def resolve(self, value: Any) -> Any:
        """The value a source is built with: ``value``, or the default where it is None (not given)."""
        return self.default if value is None else value

    def check(self, value: Any, source: str = "") -> Any:
        """``value`` as the option's type, or a one-line KDError saying what is allowed."""
        who = f" for '{source}'" if source else ""
        if self.type is str:  # text (a file, a name); in Python also a structured value (a list, a tensor)
            if isinstance(value, Path):
                return str(value)
            if (isinstance(value, str) and value.strip()) or isinstance(value, (list, tuple, torch.Tensor)):
                return value
            raise KDError(f"{self.flag}{who} takes text, got {value!r}")
        try:
            if isinstance(value, bool):
                raise ValueError
            v = self.type(value)
        except (TypeError, ValueError):
            raise KDError(f"{self.flag}{who} takes a number, got {value!r}") from None
        low_bad = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        high_bad = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if low_bad or high_bad or v != v:
            raise KDError(f"{self.flag} must lie {self.bounds()}{who}, got {value}" if self.low is not None
                          and self.high is not None else f"{self.flag} must be {self.bounds()}{who}, got {value}")
        return v

    def describe(self) -> str:
        """The help line: what it does, its default and its range."""
        extra = [f"default {self.default:g}" if isinstance(self.default, (int, float)) else "",
                 self.bounds()]
        extra = [e for e in extra if e]
        return self.help + (f" ({'; '.join(extra)})" if extra else "")


def fraction(name: str, help: str, default: float | None = 0.1) -> Option:
    """An option that lies strictly between 0 and 1 (alpha: a share of the target's mass)."""
    return Option(name, help, default, float, 0.0, 1.0, True, True)


@dataclass
class SourceContext:
    """What a source may need to build itself from a SPEC argument (see :meth:`TargetSource.from_spec`).

    ``options`` holds the source's options (alpha, temperature, hard_weight, ...), each declared one
    resolved by ``teachers.make_source`` (:meth:`TargetSource.given_options`); `kd bench` adds the
    settings its stand-ins read (``fused``, ``top_k``). ``info`` is the data set's
    :class:`kd.data.DatasetInfo` when there is one (a network teacher reads its normalisation).
    ``teacher_model`` is set by `kd bench`, which times sources on stand-in artifacts, and by
    ``make_source("network", K, model=net)`` for a network in memory; ``artifacts`` holds the other
    in-memory artifacts ``make_source`` was handed (``c_matrix``, ``logits``).
    """

    num_classes: int
    dataset: str | None = None
    num_train: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    info: Any = None
    teacher_model: nn.Module | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)


class TargetSource(nn.Module):
    """Base class. Subclasses implement :meth:`targets`; :meth:`loss_terms` trains on them.

    A source module also describes itself to the source table (``teachers.SOURCES``): its
    ``name``, whether labels alone build it (``label_only``: usable as `kd train-teacher
    --method NAME`), what its SPEC argument is (``spec_arg``, for help text) and how a SPEC
    builds it (:meth:`from_spec`).
    """

    #: The name in `--teacher NAME[:ARG]`, `--method NAME` and `kd bench` rows.
    name: ClassVar[str] = ""
    #: One line for the CLI help.
    summary: ClassVar[str] = ""
    #: What follows "NAME:" in a SPEC, for help text ("" when the source takes no argument).
    spec_arg: ClassVar[str] = ""
    #: True when labels alone build it: the source can train a network (`kd train-teacher --method`).
    label_only: ClassVar[bool] = False
    #: Printed as a warning when the student trains with random augmentation (None: no warning).
    augmentation_warning: ClassVar[str | None] = None
    #: True when the source needs the batch inputs (a network teacher).
    needs_inputs: ClassVar[bool] = False
    #: True when the source needs the sample indices (cached teacher outputs).
    needs_index: ClassVar[bool] = False
    #: For ``needs_index`` sources: True when ``index`` may be a ``kd.data.augment.MixedIndex`` (mixup/cutmix).
    mixes_index: ClassVar[bool] = False
    #: Options the source reads from ``SourceContext.options`` (CLI flags, YAML keys and checks come from these).
    options: ClassVar[tuple[Option, ...]] = ()
    #: True when the engine must call :meth:`on_step` after every training step (stateful sources).
    observes_steps: ClassVar[bool] = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    @classmethod
    def option(cls, name: str) -> Option:
        """The declared option ``name`` (a KeyError is a programming error: the source reads what it declares)."""
        return next(o for o in cls.options if o.name == name)

    @classmethod
    def value(cls, ctx: "SourceContext", name: str) -> Any:
        """Declared option ``name`` as the source is built with it: given in the context, or its default."""
        return cls.option(name).resolve(ctx.options.get(name))

    @classmethod
    def given_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Every declared option, given or at its default; an option given a value that this source does not
        declare is a one-line KDError (a flag meant for another source is a mistake, not a no-op)."""
        declared = {o.name for o in cls.options}
        stray = sorted(k for k, v in options.items() if v is not None and k not in declared)
        if stray:
            flags = ", ".join(o.flag for o in cls.options) or "none"
            raise KDError(f"source '{cls.name}' has no option --{stray[0].replace('_', '-')} (its options: {flags}); "
                          f"drop it")
        return {o.name: o.resolve(options.get(o.name)) for o in cls.options}

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "TargetSource":
        """Build the source from the text after "NAME:" in a SPEC and the run's context. The default suits a
        source whose constructor takes (K, its options by name) and whose SPEC has no argument."""
        if arg:
            flags = ", ".join(o.flag for o in cls.options)
            raise KDError(f"teacher '{cls.name}' takes no argument, got '{cls.name}:{arg}'" +
                          (f"; use {flags}" if flags else ""))
        return cls(ctx.num_classes, **{o.name: cls.value(ctx, o.name) for o in cls.options})

    def resolved_options(self) -> dict[str, Any]:
        """The option values this source trains with (defaults and values read from its files included), for the
        run's config.yaml and summary: each declared option the instance holds under its name, unless None."""
        out = {o.name: getattr(self, o.name, None) for o in self.options}
        return {k: v for k, v in out.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}

    @classmethod
    def bench_rows(cls) -> dict[str, dict[str, Any]]:
        """`kd bench` rows this source adds: row name -> options its stand-in is built with."""
        return {cls.name: {}}

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "TargetSource":
        """An instance with artifacts of the right shape and random values, for `kd bench` rows."""
        return cls.from_spec("", ctx)

    def write_artifacts(self, run_dir: Path, class_names: list[str], meta: dict[str, Any]) -> None:
        """Files the source leaves in a finished run directory beside the weights (default: none)."""

    # Hooks for sources that keep state across steps and epochs (online label smoothing).
    # The engine calls them; nothing elsewhere checks a source's class.

    def on_step(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """After each training step (only when ``observes_steps``): the batch's detached logits and labels."""

    def on_epoch_end(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """At the end of each training epoch. ``all_reduce`` sums a tensor over processes (identity alone)."""

    def epoch_stats(self) -> dict[str, float]:
        """Readings of the source's own state after each epoch, logged beside the metrics (default: none;
        LS++ reports how far C moved from uniform). Keys are :meth:`epoch_stats_keys`."""
        return {}

    @classmethod
    def epoch_stats_keys(cls) -> tuple[str, ...]:
        """The keys :meth:`epoch_stats` returns (metrics.csv columns and summary keys)."""
        return ()

    def describe_stats(self, stats: dict[str, float]) -> str:
        """:meth:`epoch_stats` in a few words for the per-epoch log line ("" for none)."""
        return ""

    def end_note(self, last: dict[str, Any]) -> str | None:
        """One line to say at the end of a run, from its last epoch's row (default: nothing)."""
        return None

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep to resume exactly: by default the trainable parameters (LS++'s C)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state`."""
        with torch.no_grad():
            own = dict(self.named_parameters())
            for n, v in state.items():
                if n not in own:
                    raise KDError(f"the checkpoint holds source state '{n}' that this source does not have")
                own[n].copy_(v)

    def targets(
        self,
        labels: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return B x K target probabilities (no gradient) for a batch."""
        raise NotImplementedError

    def loss_terms(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named loss terms for the trainer to sum and log; default: CE against the targets."""
        t = self.targets(labels, inputs=inputs, index=index)
        return {"ce": soft_cross_entropy(logits, t)}


def spec_number(arg: str, ctx: SourceContext, option: Option, source: str) -> Any:
    """An option's value from a SPEC argument (``ls:0.2``) when there is one, else from the options."""
    if not arg:
        return option.resolve(ctx.options.get(option.name))
    try:
        return float(arg)
    except ValueError:
        raise KDError(f"bad teacher '{source}:{arg}': give a number, e.g. {source}:0.1") from None


class TableSource(TargetSource):
    """A label-only source given by a fixed K x K row-stochastic table T (targets = T[y])."""

    def __init__(self, table: torch.Tensor):
        table = torch.as_tensor(table, dtype=torch.float32)
        if table.ndim != 2 or table.shape[0] != table.shape[1]:
            raise ValueError(f"a target table must be K x K, got shape {tuple(table.shape)}")
        super().__init__(table.shape[0])
        self.register_buffer("table", table, persistent=False)

    def targets(self, labels, *, inputs=None, index=None):
        if labels.is_floating_point():  # soft labels m: B x K
            return labels.to(self.table.dtype) @ self.table
        return self.table.index_select(0, labels)  # 2.1 vs 3.0 us for table[labels] (benchmarks.micro, B=128, K=10)


def label_matrix(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x K float32 labels: onehot(y) for integer labels, the soft labels m themselves (mixup, cutmix)."""
    if labels.is_floating_point():
        return labels.float()
    return F.one_hot(labels, num_classes).float()


def smoothing_table(num_classes: int, alpha: float) -> torch.Tensor:
    """(1 - alpha) * I + alpha / K: alpha spread uniformly over all K classes."""
    return (1.0 - alpha) * torch.eye(num_classes) + alpha / num_classes
