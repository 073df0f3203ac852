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


@dataclass
class SourceContext:
    """What a source may need to build itself from a SPEC argument (see :meth:`TargetSource.from_spec`).

    ``options`` holds the CLI / config options (alpha, temperature, hard_weight, ...); a value
    of None means "not given": the source takes its own default. ``info`` is the data set's
    :class:`kd.data.DatasetInfo` when there is one (a network teacher reads its normalisation).
    ``teacher_model`` is only set by `kd bench`, which times sources on stand-in artifacts.
    """

    num_classes: int
    dataset: str | None = None
    num_train: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    info: Any = None
    teacher_model: nn.Module | None = None

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


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
    #: For ``needs_index`` sources: True when ``index`` may be a ``kd.augment.MixedIndex`` (mixup/cutmix).
    mixes_index: ClassVar[bool] = False
    #: Options the source reads from ``SourceContext.options``: name -> help with its default.
    options: ClassVar[dict[str, str]] = {}
    #: True when the engine must call :meth:`on_step` after every training step (stateful sources).
    observes_steps: ClassVar[bool] = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "TargetSource":
        """Build the source from the text after "NAME:" in a SPEC and the run's context."""
        if arg:
            raise KDError(f"teacher '{cls.name}' takes no argument, got '{cls.name}:{arg}'")
        return cls(ctx.num_classes)

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


def option_alpha(ctx: SourceContext, arg: str = "", default: float = 0.1, what: str = "alpha") -> float:
    """alpha from a SPEC argument ("ls:0.2") or the options, checked to lie in (0, 1)."""
    value: Any = ctx.option("alpha", default)
    if arg:
        try:
            value = float(arg)
        except ValueError:
            raise KDError(f"bad {what} '{arg}': give a number, e.g. 0.1") from None
    value = float(value)
    if not 0.0 < value < 1.0:
        raise KDError(f"alpha must lie in (0, 1), got {value}")
    return value


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


def one_hot_table(num_classes: int) -> torch.Tensor:
    return torch.eye(num_classes)


def smoothing_table(num_classes: int, alpha: float) -> torch.Tensor:
    """(1 - alpha) * I + alpha / K: alpha spread uniformly over all K classes."""
    return (1.0 - alpha) * torch.eye(num_classes) + alpha / num_classes


def proxy_table(c_matrix: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * I + alpha * C: row y is the PT-LS++ target for class y."""
    c = torch.as_tensor(c_matrix, dtype=torch.float32)
    return (1.0 - alpha) * torch.eye(c.shape[0]) + alpha * c
