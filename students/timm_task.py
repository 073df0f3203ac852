"""A proxykd target source as a timm training task: timm's loop, optimizer factory and checkpoints, proxykd's targets.

timm (>= the releases with ``timm.task``) trains through a task: ``task(input, target)`` returns a dict with
``loss`` and ``output``, only ``task.trainable_module`` is wrapped in DistributedDataParallel, and state
outside the model travels as the checkpoint's ``task_state``. :class:`SourceTask` is such a task for any
label-level proxykd source (``teachers.make_source('proxy', K, c_matrix=C)``, ``'ls'``, ``'lspp'``, ...)::

    task = SourceTask(timm.create_model('resnet18', num_classes=K), make_source('lspp', K), device=device)
    optimizer = timm.optim.create_optimizer_v2(task.trainable_module, 'sgd', lr=0.1, weight_decay=5e-4)
    out = task(x, y); out['loss'].backward(); optimizer.step()
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from kd.engine import total_loss
from kd.errors import KDError
from kd.sources import TargetSource

try:
    from timm.models import group_parameters
    from timm.optim import auto_group_layers
    from timm.task import TrainingTask
    from timm.utils import unwrap_model
except ImportError as e:  # timm.task came with timm's task-based training (timm 1.0.31 has it)
    raise ImportError(f"students.timm_task needs a timm release with timm.task (task-based training): {e}") from e

#: Keys of the task's output dict that a source's term names must leave alone.
RESERVED = ("loss", "output")


def refusal(source: TargetSource) -> str | None:
    """Why timm's training loop cannot feed ``source`` (one line), or None when it can."""
    if not isinstance(source, TargetSource):
        return f"SourceTask takes a proxykd target source (teachers.make_source(NAME, K, ...)), got {type(source).__name__}"
    name = source.name or type(source).__name__
    if source.needs_index:
        return (f"source '{name}' reads each sample's cached teacher outputs by its index, and timm's training loop "
                f"passes no sample index; train it with proxykd (`kd distill`) instead")
    if source.needs_inputs:
        return (f"source '{name}' runs a teacher network on the batch inputs; in timm use "
                f"timm.task.LogitDistillationTask for a network teacher")
    if source.observes_steps:
        return (f"source '{name}' rebuilds its targets from every step and at each epoch's end, hooks timm's training "
                f"loop does not call; train it with proxykd (`kd train-teacher --method {name}`) instead")
    return None


def source_terms(source: TargetSource, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The source's named loss terms for a batch, after checking the logits have the source's K columns."""
    if output.ndim != 2 or output.shape[1] != source.num_classes:
        raise KDError(f"the model outputs logits of shape {tuple(output.shape)} but source '{source.name}' has "
                      f"K={source.num_classes} classes; build the model with num_classes={source.num_classes}")
    terms = source.loss_terms(output, target)
    clash = [k for k in RESERVED if k in terms]
    if clash:
        raise KDError(f"source '{source.name}' names a loss term '{clash[0]}', a key the task's output dict keeps "
                      f"for itself; rename the term")
    return terms


def _wrapped(module: nn.Module | None, kind: type) -> nn.Module | None:
    """The ``kind`` module inside DDP, torch.compile and EMA wrappers of ``module`` (None when there is none)."""
    seen = 0
    while module is not None and seen < 16:
        if isinstance(module, kind):
            return module
        inner = module.__dict__.get("_modules", {})
        module = inner["_orig_mod"] if inner.get("_orig_mod") is not None else inner.get("module")
        seen += 1
    return None


class SourceTrainableModule(nn.Module):
    """The student and a learnable source (LS++'s C) as one module whose forward computes the loss terms,
    so that DDP averages C's gradient with the student's and timm's optimizer factory sees C."""

    def __init__(self, student: nn.Module, source: TargetSource):
        super().__init__()
        self.student = student
        self.source = source

    def no_weight_decay(self) -> set[str]:
        """The student's own exclusions (prefixed) and every source parameter: C is a distribution, not a weight."""
        student = unwrap_model(self.student)
        own = student.no_weight_decay() if hasattr(student, "no_weight_decay") else set()
        return {f"student.{n}" for n in own} | {f"source.{n}" for n, _ in self.source.named_parameters()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer ids for timm's layer-wise decay: the student's own grouping, the source in the top (head) group."""
        student = unwrap_model(self.student)
        if hasattr(student, "group_matcher"):
            layers = group_parameters(student, student.group_matcher(coarse=coarse), reverse=True)
        else:
            layers = auto_group_layers(student)
        top = max(layers.values(), default=0)

        def layer_of(name: str) -> int:
            if name.startswith("student."):
                return layers.get(name[len("student."):], top)
            return top

        return layer_of

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = self.student(input)
        return output, source_terms(self.source, output, target)


class SourceTask(TrainingTask):
    """Train a student on a proxykd target source inside timm's task-based training.

    ``forward(input, target)`` returns ``loss`` (the sum of the source's terms, as proxykd's engine sums
    them), ``output`` (the student's logits) and each named term of the source (``ce`` for a table source,
    ``lspp_net`` and ``lspp_c`` for LS++), so the parts can be logged apart. Targets are class indices, or
    dense soft labels from timm's Mixup / CutMix, which become m @ T exactly as in proxykd's engine:
    build ``timm.data.Mixup`` with ``label_smoothing=0`` (train.py: ``--smoothing 0``), since the source
    does the smoothing and timm's would be applied on top of it.

    A frozen source (proxy, label smoothing, ...) stays outside ``trainable_module``: DDP never
    broadcasts its tables. A source with trainable parameters (LS++'s C) is placed inside it
    (:class:`SourceTrainableModule`), so DDP averages C's gradient, ``create_optimizer_v2(task.trainable_module,
    ...)`` optimises C without weight decay (``no_weight_decay()``), and C is saved in the checkpoint's
    ``task_state`` (the source's ``checkpoint_state()``) while ``state_dict`` holds the student alone.
    Sources that need sample indices (cached outputs), the inputs (a network teacher; timm has
    ``LogitDistillationTask`` for that) or per-step hooks (OLS) are refused with a one-line KDError.

    Args:
        model: the student network, with K outputs.
        source: a proxykd target source for K classes.
        device: where the source's tables and parameters go (the student is placed by the caller, as in timm).
        dtype: recorded as timm's tasks do; the source keeps float32 (its tables and C are float32).
        verbose: timm's flag for info logging (this task logs nothing).
    """

    def __init__(
            self,
            model: nn.Module,
            source: TargetSource,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        why = refusal(source)
        if why is not None:
            raise KDError(why)
        source.to(device=self.device)
        self.learns_source = any(p.requires_grad for p in source.parameters())
        # ``source`` is registered on the task in both cases (``task.source`` is always the live source); a
        # learnable one is also inside the trainable module, the only part DDP and the optimizer see.
        self.source = source
        self.trainable_module = SourceTrainableModule(model, source) if self.learns_source else model
        self._soft_labels_checked = False

    def train(self, mode: bool = True) -> "SourceTask":
        """Set training mode while a frozen source, like a distillation teacher, stays in evaluation mode."""
        super().train(mode)
        if not self.learns_source:
            self.source.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> "SourceTask":
        """Wrap the trainable module in DDP; the source's constant buffers (LS++'s index tables) are kept
        out of DDP's per-step buffer broadcast, and a frozen source is not in the wrapped module at all."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = self.trainable_module
        own = {id(b) for b in self.source.buffers()}
        skip = {n for n, b in module.named_buffers() if id(b) in own}
        if skip:
            skip |= set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
            DDP._set_params_and_buffers_to_ignore_for_model(module, sorted(skip))
        self.trainable_module = DDP(module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the training forward (student and, for a learnable source, its terms) and the eval student."""
        if self.learns_source:
            student = _wrapped(self.trainable_module, SourceTrainableModule).student
            self.eval_model = torch.compile(student, backend=backend, mode=mode, **compile_kwargs)
            self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
            return self.eval_model
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module  # the same student forward trains and evaluates
        return self.trainable_module

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """The student (validation and ``state_dict``), never the wrapper that holds C."""
        resolved = super().get_eval_model(module=module, ema=ema)
        wrapper = _wrapped(resolved, SourceTrainableModule)
        return wrapper.student if wrapper is not None else resolved

    def get_clip_parameters(self, exclude_head: bool = False):
        """The student's parameters (less its head's last two with ``exclude_head``) and the source's trainable ones."""
        wrapper = _wrapped(self.trainable_module, SourceTrainableModule)
        if wrapper is None:
            return super().get_clip_parameters(exclude_head=exclude_head)
        params = list(wrapper.student.parameters())
        if exclude_head:
            params = params[:-2]
        return params + [p for p in wrapper.source.parameters() if p.requires_grad]

    def _source_of(self, module: nn.Module | None, ema: bool) -> TargetSource | None:
        """The source whose state a checkpoint keeps: the EMA copy's for ``ema``, else the live one."""
        if not self.learns_source:
            return self.source
        module = module if module is not None else self.get_trainable_module(ema=ema)
        wrapper = _wrapped(module, SourceTrainableModule)
        return wrapper.source if wrapper is not None else None

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """The source's ``checkpoint_state()`` (LS++'s C logits) and its name; empty for a source with none."""
        source = self._source_of(module, ema)
        state = source.checkpoint_state() if source is not None else {}
        if not state:
            return {}
        return {"source": source.name, "source_state": {k: v.detach().clone() for k, v in state.items()}}

    def load_task_state(
            self,
            state: dict[str, Any] | None,
            strict: bool = True,
            module: nn.Module | None = None,
            ema: bool = False,
    ) -> None:
        """Restore :meth:`get_task_state`; with ``strict`` a state of another source or shape is a one-line KDError."""
        if not state:
            return
        source = self._source_of(module, ema)
        if source is None:
            raise RuntimeError("Cannot load EMA task state before setup_ema()." if ema
                               else "Cannot load task state without a trainable module.")
        name, values = state.get("source"), state.get("source_state")
        if name != source.name or not isinstance(values, dict):
            if strict:
                raise KDError(f"the checkpoint's task state belongs to source '{name}', not to this task's "
                              f"'{source.name}'; resume with the source it was trained with")
            return
        own = source.checkpoint_state()
        fits = {k: v for k, v in values.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if strict and len(fits) != len(values):
            bad = next(k for k in values if k not in fits)
            raise KDError(f"the checkpoint's source state '{bad}' does not fit this '{source.name}' source "
                          f"(K={source.num_classes}); resume with the source it was trained with")
        source.load_checkpoint_state(fits)

    def _check_soft_labels(self, target: torch.Tensor) -> None:
        """Once per task: warn when soft labels carry mass on every class, the mark of timm's Mixup smoothing."""
        self._soft_labels_checked = True
        if target.ndim == 2 and target.shape[1] > 2 and bool((target > 0).all()):
            warnings.warn("SourceTask: the soft labels give every class some mass, as timm's Mixup does with "
                          "label_smoothing > 0; build Mixup with label_smoothing=0 (train.py --smoothing 0): the "
                          "source smooths the targets itself", stacklevel=3)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's logits, the source's named terms on them and their sum, ``loss``."""
        if target.is_floating_point() and not self._soft_labels_checked and not torch.compiler.is_compiling():
            self._check_soft_labels(target)
        if self.learns_source:
            output, terms = self.trainable_module(input, target)
        else:
            output = self.trainable_module(input)
            terms = source_terms(self.source, output, target)
        return {"loss": total_loss(terms), "output": output, **terms}


__all__ = ["SourceTask", "SourceTrainableModule", "refusal", "source_terms"]
