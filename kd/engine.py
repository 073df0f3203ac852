"""The one training engine: any model, any target source, under accelerate from the start.

One step, top to bottom, in :meth:`Training.step`: autocast -> model(x) -> the source's named
loss terms -> their sum -> backward -> optimiser step -> schedule step. Teacher training (the
source is LS++ with its learnable C) and student training (the source is a frozen teacher)
run the same loop. Only the model is wrapped for data-parallel training; a source's
trainable parameters (LS++'s C logits) have their gradients averaged across processes in
the step, and frozen teachers and tables stay outside the wrapper, never broadcast.
"""
from __future__ import annotations

import inspect
import math
import platform
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from kd import runs
from kd.data.augment import BatchMix, WorkerAugmentLoader
from kd.config import TrainConfig
from kd.data import DatasetInfo, TensorLoader, as_dataset, check_labels, make_loader
from kd.errors import KDError, NonFiniteError
from kd.metrics import classification_metrics
from kd.seeding import seeded
from kd.tracking import RunTracking, parse_trackers
from kd.sources import TargetSource


@dataclass
class FitResult:
    model: nn.Module
    source: TargetSource
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(device: str) -> str:
    """``--device``: auto is cuda where a CUDA device is visible, else cpu; cuda without one is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KDError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return device


def make_accelerator(cfg: TrainConfig, log_dir: Path | None = None):
    """accelerate places the model and launches processes; mixed precision is the step's own autocast. With
    ``cfg.log_with`` it also holds the run's experiment trackers (:mod:`kd.tracking`), writing under ``log_dir``."""
    trackers = parse_trackers(cfg.log_with)
    if trackers and log_dir is None:
        raise KDError("--log-with needs a folder for the trackers' files: a run directory, or log_dir=")
    return Accelerator(cpu=resolve_device(cfg.device) == "cpu", mixed_precision="no", log_with=trackers or None,
                       project_dir=str(log_dir) if trackers else None)


def machine_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model and the threads torch uses: what a timing ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step s: linear warm-up, then the schedule."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.lr_gamma ** sum(step >= m * total for m in cfg.milestones)

    return f


def build_optimizer(model: nn.Module, source: TargetSource, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Network parameters with weight decay; the source's learnable parameters (C) with or without, at
    ``cfg.c_lr_scale`` times the network's learning rate (1: one rate for both, the paper's setting)."""
    model_params = [p for p in model.parameters() if p.requires_grad]
    source_params = [p for p in source.parameters() if p.requires_grad]
    groups = [{"params": model_params, "weight_decay": cfg.weight_decay}]
    if source_params:
        groups.append({"params": source_params, "weight_decay": cfg.weight_decay if cfg.c_weight_decay else 0.0,
                       "lr": cfg.lr * cfg.c_lr_scale})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def predict(model: nn.Module, data, info: DatasetInfo | None, batch_size: int = 512,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``model`` over ``data`` in the data set's order, un-augmented."""
    cfg = TrainConfig(batch_size=batch_size, augment=False, num_workers=0)
    model = model.to(device)
    dtype = input_dtype_of(model)
    return evaluate(model, make_loader(as_dataset(data, "evaluation"), info, cfg, train=False, device=device,
                                       input_dtype=dtype), device)


def input_dtype_of(model: nn.Module) -> torch.dtype:
    """The floating dtype the model's parameters hold (float32 unless the user chose another)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def cast_inputs(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating inputs of another dtype (a Dataset of float64 arrays) as ``dtype``; integer inputs (token ids) as they are."""
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, model in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    dtype = input_dtype_of(model)
    for x, y, _ in loader:
        x, y = cast_inputs(x.to(device, non_blocking=True), dtype), y.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        outs.append(model(x).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Training:
    """What one training step needs: the (possibly data-parallel) model, the source, optimiser, schedule."""

    model: nn.Module            # the student or teacher network; DDP-wrapped under several processes
    source: TargetSource        # never wrapped: frozen tables and teachers are not broadcast per step
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device_type: str
    amp_dtype: torch.dtype | None
    scaler: Any = None          # a GradScaler for fp16, else None
    shared_params: list[nn.Parameter] = field(default_factory=list)  # source parameters to average across ranks
    world_size: int = 1
    mix: BatchMix | None = None  # mixup / cutmix
    forward_loss: Callable | None = None    # :meth:`forward`, or its torch.compile'd form (see compile_step)
    optimizer_step: Callable | None = None  # ``optimizer.step``, or its compiled form
    logits: torch.Tensor | None = None      # the last step's logits, detached (for the running train accuracy)

    def __post_init__(self):
        self.forward_loss = self.forward_loss or self.forward
        self.optimizer_step = self.optimizer_step or self.optimizer.step

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place (nothing to do in one process)."""
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def forward(self, x, y, idx) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Under autocast: the network's logits, the source's named loss terms, and their sum."""
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
            terms = self.source.loss_terms(logits, y, inputs=x if self.source.needs_inputs else None,
                                           index=idx if self.source.needs_index else None)
        return logits, terms, total_loss(terms)

    def step(self, x, y, idx) -> dict[str, torch.Tensor]:
        """One optimiser step on one batch; returns the named loss terms (no host sync)."""
        if self.mix is not None:  # mixup / cutmix: labels become soft labels m, indices a MixedIndex
            x, y, idx = self.mix(x, y, idx)
        logits, terms, loss = self.forward_loss(x, y, idx)  # forward, source terms, their sum
        self.logits = logits.detach()
        if self.source.observes_steps:  # a stateful source (OLS) collects statistics from the same forward
            self.source.on_step(logits.detach(), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.shared_params:  # DDP averages the model's gradients; the source's are averaged here
            average_gradients(self.shared_params, self.world_size)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer_step()
        self.scheduler.step()
        return terms

    def tensor_learning_rates(self) -> None:
        """Each group's learning rate as a 0-dim tensor on its parameters' device, updated in place by the
        schedule: a compiled optimiser step then reads it instead of baking in (or recompiling for) a float."""
        for g in self.optimizer.param_groups:
            if not torch.is_tensor(g["lr"]):
                g["lr"] = torch.tensor(float(g["lr"]), device=g["params"][0].device)


def compile_options(mode: str, backend: str) -> dict:
    """torch.compile's keywords for a --compile-mode and backend (a mode is inductor's; other backends take none)."""
    if backend != "inductor":
        return {"backend": backend}
    return {"mode": None if mode == "default" else mode}


def compile_step(training: Training, mode: str = "default", backend: str = "inductor") -> None:
    """``torch.compile`` the step's forward (network, source terms, their sum; the backward follows from it)
    and the optimiser step. ``mode="reduce-overhead"`` captures each as CUDA graphs replayed every step,
    which takes small GPU steps out of kernel-launch overhead; it needs CUDA. Learning rates become tensors
    (:meth:`Training.tensor_learning_rates`). Compilation happens on the first step."""
    options = compile_options(mode, backend)
    training.forward_loss = torch.compile(own_code(training.forward), dynamic=False, **options)
    if training.scaler is None:  # fp16's GradScaler runs the optimiser step itself
        training.tensor_learning_rates()
        training.optimizer_step = compiled_optimizer_step(training.optimizer, options)


def compiled_optimizer_step(optimizer: torch.optim.Optimizer, options: dict) -> Callable[[], Any]:
    """``optimizer.step`` compiled as one frame of its own: the class's undecorated step (``SGD.step``,
    ``AdamW.step``) under its own code object, run without autograd as its decorator would. Compiling
    ``optimizer.step`` itself goes through a schedule's wrapper (which dynamo skips) and a decorator with graph
    breaks, and the step behind them is then a frame whose compiled cache every optimizer of the class shares:
    from the fifth optimizer in a process on it ran eagerly. What the wrappers did that a training step needs
    (the flag the schedule checks) is done here; proxykd registers no optimizer step hooks."""
    step = torch.compile(own_code(types.MethodType(inspect.unwrap(type(optimizer).step), optimizer)), **options)

    def optimizer_step():
        optimizer._opt_called = True  # what LRScheduler's wrapper of optimizer.step records
        with torch.no_grad():
            return step()

    return optimizer_step


def own_code(fn: Callable) -> Callable:
    """``fn`` (a function or bound method) with a code object of its own. torch.compile keeps its compiled
    entries per code object, so every Training would otherwise share one cache for ``Training.forward`` and
    ``Optimizer.step``: in a process that compiles many steps (`kd bench --compile`), the later ones hit
    dynamo's recompile limit and run eagerly under a compiled label. With its own code each compiles once."""
    bound = getattr(fn, "__self__", None)
    f = getattr(fn, "__func__", fn)
    if not isinstance(f, types.FunctionType):
        return fn
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__, copy.__dict__ = f.__kwdefaults__, dict(f.__dict__)
    return types.MethodType(copy, bound) if bound is not None else copy


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the named loss terms, without the extra add of 0 that ``sum`` starts with.

    1.4 vs 3.3 us for ``sum(terms.values())`` on CPU (``python -m benchmarks.micro``).
    """
    values = iter(terms.values())
    loss = next(values)
    for v in values:
        loss = loss + v
    return loss


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce and average the gradients of ``params`` in one flat buffer (one collective)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g)
        offset += g.numel()


def prepare_training(accelerator, model: nn.Module, source: TargetSource, cfg: TrainConfig,
                     steps_per_epoch: int) -> Training:
    """What `fit` and the benchmarks share: model and source on the device, optimiser, schedule, DDP."""
    device = accelerator.device
    model.to(device)
    source.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, source, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    prepared = accelerator.prepare_model(model)  # DDP under several processes; the module itself otherwise
    prepared.train()
    source.train()
    amp_dtype = AMP_DTYPES[cfg.amp]
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    world = accelerator.num_processes
    shared = [p for p in source.parameters() if p.requires_grad] if world > 1 else []
    mix = None
    if cfg.mixup or cfg.cutmix:
        if source.needs_index and not source.mixes_index:
            raise KDError(f"source '{source.name}' reads per-sample rows and cannot follow --mixup/--cutmix; "
                          "drop those flags")
        mix = BatchMix(source.num_classes, cfg.mixup, cfg.cutmix, seed=cfg.seed, rank=accelerator.process_index)
    training = Training(prepared, source, optimizer, scheduler, device.type, amp_dtype, scaler, shared, world, mix)
    if cfg.compile_mode != "none":
        compile_step(training, cfg.compile_mode, cfg.compile_backend)
    return training


def _one_test_batch(test_loader, test_data):
    """Inputs of one un-augmented test sample (a 1-sample batch), or None when there is none."""
    if isinstance(test_loader, TensorLoader):
        for x, _, _ in test_loader:
            return x[:1]
        return None
    if len(test_data) == 0:
        return None
    item = test_data[0]
    x = item[0] if isinstance(item, (tuple, list)) else item
    return torch.utils.data.default_collate([x]) if torch.is_tensor(x) else None


def check_output_size(model: nn.Module, source: TargetSource, test_loader, test_data, device,
                      channels_last: bool = False) -> None:
    """One forward of one test sample (eval mode, no grad, train mode restored): K must match the source's."""
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws a seed from the global RNG; keep runs unchanged
        x = _one_test_batch(test_loader, test_data)
    if x is None:
        return
    x = x.to(device)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    if torch.is_tensor(out) and out.ndim == 2 and out.shape[1] != source.num_classes:
        raise KDError(f"the model outputs {out.shape[1]} logits per sample but the source '{source.name}' has "
                      f"K={source.num_classes} classes; build the model with {source.num_classes} outputs")


def _nonfinite_parts(model: nn.Module, source: TargetSource, term_sums: dict[str, torch.Tensor],
                     all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
    """Which of the epoch's loss terms, the source's parameters or the model's are NaN/Inf (one host sync).

    Called once per epoch: the per-step term sums are non-finite as soon as one step's loss was.
    The flags are summed over processes, so every rank stops at the same epoch.
    """
    names = [f"loss term '{k}'" for k in term_sums]
    checks = [torch.isfinite(v).all() for v in term_sums.values()]
    src = [(n, p) for n, p in source.named_parameters()]
    names += [f"source parameter '{n}'" for n, _ in src]
    checks += [torch.isfinite(p.detach()).all() for _, p in src]
    params = list(model.parameters())
    if params:
        names.append("model weights")
        # one reading pass, no mask: a sum is NaN/Inf when any element is (or when weights near 1e38 overflow it)
        checks.append(torch.isfinite(torch.stack([p.detach().float().sum() for p in params]).sum()))
    if not checks:
        return []
    flags = all_reduce((~torch.stack(checks)).float())
    return [n for n, f in zip(names, flags.tolist()) if f > 0]


def _nonfinite_message(epoch: int, bad: list[str], cfg: TrainConfig, kept: int | None, run_dir: Path | None) -> str:
    """One line: what went NaN/Inf, in which epoch, the likely causes and what is left on disk."""
    what = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    msg = (f"training diverged at some step of epoch {epoch}: {what} became NaN/Inf; likely causes: NaN/Inf "
           f"in the inputs, or the learning rate too high (--lr {cfg.lr:g}): check the data or lower --lr")
    if run_dir is None:
        return msg + "; nothing was kept"
    if kept is None:
        return msg + f" and start a new run; {run_dir} holds no finished epoch and no weights were written"
    return msg + (f"; no weights or summary were written and the checkpoint of epoch {kept} in {run_dir} is kept "
                  "(--resume --lr LOWER continues from it)")


def rescale_learning_rate(training: Training, lr: float) -> None:
    """After a restore: make ``lr`` the peak learning rate (`--resume --lr`), keeping the schedule's position."""
    base = training.scheduler.base_lrs[0]
    if base == lr:
        return
    scale = lr / base
    training.scheduler.base_lrs = [b * scale for b in training.scheduler.base_lrs]
    for g in training.optimizer.param_groups:
        g["initial_lr"] = g.get("initial_lr", base) * scale
        if torch.is_tensor(g["lr"]):
            g["lr"].mul_(scale)
        else:
            g["lr"] = g["lr"] * scale


def fit(model: nn.Module, source: TargetSource, train_data, test_data, cfg: TrainConfig, *,
        info: DatasetInfo | None = None, run_dir: Path | None = None, meta: dict[str, Any] | None = None,
        progress: bool = True, log: Callable[[str], None] | None = print, resume: bool = False,
        eval_name: str = "test") -> FitResult:
    """Train ``model`` on the targets of ``source``; evaluate on ``test_data`` after every epoch.

    ``eval_name`` names what ``test_data`` is in the metrics and summary keys: ``test``, or ``val``
    for a validation split held out of the training set (``val_acc``, ``val_nll``, ...).

    The run is seeded with ``cfg.seed`` (:func:`kd.seeding.seeded`) and the caller's random states
    are put back when it returns. Data: ImageTensors, a map-style Dataset of (input, label) pairs,
    a TensorDataset or an (inputs, labels) pair of arrays (:func:`kd.data.as_dataset`); floating
    inputs of another dtype (float64) are cast to the model's.

    With ``run_dir`` the run directory is filled as the run goes (metrics.csv and a
    checkpoint after each epoch; weights, the source's artifacts (LS++'s C-matrix) and
    summary.json at the end, when the checkpoint is removed). With ``resume`` a run killed
    between epochs continues from its checkpoint; in a single process the result is the one
    the uninterrupted run gives.

    Every epoch records the training loss and each named term, the running training accuracy
    (the training steps' own outputs against each sample's label: augmented inputs), the
    evaluation metrics and the source's own readings (``TargetSource.epoch_stats``: how far
    LS++'s C moved from uniform); the summary holds the last epoch's, and a source's end note
    (C that stayed uniform) is logged.

    Checked at the door, once per run and not per step: every label of ``train_data`` and
    ``test_data`` lies in [0, K) with K = ``source.num_classes`` (read from
    ``ImageTensors.labels``, ``TensorDataset.tensors[1]`` or a map-style set's ``targets``; a
    data set whose labels cannot be read without decoding every item is not checked), and one
    forward of one test sample gives K logits. Either failing raises a one-line KDError.

    A non-finite training loss, source parameter (LS++'s C) or model weight stops the run with
    a KDError naming the epoch ("at some step of epoch E": the check reads the epoch's summed
    loss terms and the parameters once per epoch, so no step pays a host synchronisation, and
    the failing step is not pinned down). It runs before that epoch's metrics and checkpoint are
    written: no weights, C-matrix or summary are written, and the checkpoint on disk stays the
    one of the last good epoch.
    """
    with seeded(cfg.seed):
        return _fit(model, source, as_dataset(train_data, "training"),
                    as_dataset(test_data, "evaluation", evaluation=True), cfg, info=info, run_dir=run_dir,
                    meta=meta, progress=progress, log=log, resume=resume, eval_name=eval_name)


def _fit(model, source, train_data, test_data, cfg, *, info, run_dir, meta, progress, log, resume, eval_name):
    log_dir = Path(cfg.log_dir) if cfg.log_dir else (Path(run_dir) / "trackers" if run_dir is not None else None)
    accelerator = make_accelerator(cfg, log_dir)
    device = accelerator.device
    dtype = input_dtype_of(model)
    train_loader = make_loader(train_data, info, cfg, train=True, device=device, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, accelerator=accelerator, input_dtype=dtype)
    test_loader = make_loader(test_data, info, cfg, train=False, device=device, input_dtype=dtype)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise KDError(f"the training set ({len(train_data)} samples) is smaller than one batch ({cfg.batch_size}); lower --batch-size")
    check_labels(train_data, source.num_classes, "training")
    check_labels(test_data, source.num_classes, "test" if eval_name == "test" else eval_name)
    training = prepare_training(accelerator, model, source, cfg, steps_per_epoch)
    if training.mix is not None and _soft_labels(train_data):
        raise KDError("--mixup/--cutmix mix class labels, but this training set holds soft labels; drop them")
    check_output_size(model, source, test_loader, test_data, device, cfg.channels_last)
    tracking = None
    if cfg.log_with:
        tracking = RunTracking(accelerator, parse_trackers(cfg.log_with), log_dir,
                               Path(run_dir).name if run_dir is not None else "run",
                               {**(meta or {}), **cfg.to_dict()}, cfg.log_every)
    try:
        return _train(model, source, train_data, cfg, info=info, run_dir=run_dir, meta=meta, progress=progress,
                      log=log, resume=resume, eval_name=eval_name, accelerator=accelerator, device=device,
                      train_loader=train_loader, test_loader=test_loader, training=training, tracking=tracking)
    finally:  # on every way out: the run's end, a non-finite stop, Ctrl-C
        if tracking is not None:
            tracking.finish()


def train_one_epoch(training: Training, train_loader, epoch: int, cfg: TrainConfig, *, device, tracking=None,
                    progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, float]:
    """One pass over ``train_loader``: (summed loss terms, correct predictions, samples seen, seconds).

    Sums stay on the device (no per-step host synchronisation); the source's epoch-end hook runs before the
    clock stops (online label smoothing updates its table there)."""
    steps_per_epoch = len(train_loader)
    dtype = input_dtype_of(training.model)
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(epoch)
    if training.mix is not None:
        training.mix.set_epoch(epoch)
    training.model.train()
    term_sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), dtype=torch.long, device=device)  # running train accuracy, no per-step sync
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
               disable=None if progress else True, leave=False, dynamic_ncols=True)
    for i, (x, y, idx) in enumerate(bar):
        if x.dtype != dtype and x.is_floating_point():
            x = x.to(dtype)
        if cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        terms = training.step(x, y, idx)
        step = (epoch - 1) * steps_per_epoch + i + 1
        if tracking is not None and tracking.every and step % tracking.every == 0:
            tracking.log_step(step, terms, float(training.optimizer.param_groups[0]["lr"]))
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0.0) + v.detach()
        correct += (training.logits.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
        seen += y.shape[0]
    training.source.on_epoch_end(training.all_reduce)
    return term_sums, correct, seen, time.perf_counter() - t0


def _train(model, source, train_data, cfg, *, info, run_dir, meta, progress, log, resume, eval_name, accelerator,
           device, train_loader, test_loader, training, tracking) -> FitResult:
    """The epochs of :func:`fit` (after its checks): train, check, evaluate, record, and the final files."""
    steps_per_epoch = len(train_loader)
    main = accelerator.is_main_process
    loader_rng = train_loader.generator if isinstance(train_loader, (TensorLoader, WorkerAugmentLoader)) else None
    ckpt_path = run_dir / runs.CHECKPOINT if run_dir is not None else None
    history: list[dict[str, Any]] = []
    total_seconds, first_epoch = 0.0, 1
    if resume and ckpt_path is not None and ckpt_path.is_file():
        done, history, total_seconds = runs.restore_checkpoint(ckpt_path, model, source, training.optimizer,
                                                               training.scheduler, loader_rng,
                                                               rank=accelerator.process_index)
        first_epoch = done + 1
        if cfg.compile_mode != "none" and training.scaler is None:  # the checkpoint's learning rates are floats
            training.tensor_learning_rates()
        rescale_learning_rate(training, cfg.lr)
        if main and log is not None:
            log(f"resuming after epoch {done} from {ckpt_path}")
    for epoch in range(first_epoch, cfg.epochs + 1):
        term_sums, correct, seen, seconds = train_one_epoch(training, train_loader, epoch, cfg, device=device,
                                                            tracking=tracking, progress=progress and main)
        total_seconds += seconds
        bad = _nonfinite_parts(model, training.source, term_sums, training.all_reduce)  # before anything is written
        if bad:
            raise NonFiniteError(_nonfinite_message(epoch, bad, cfg, kept=history[-1]["epoch"] if history else None,
                                             run_dir=run_dir))
        counts = training.all_reduce(torch.stack([correct.double(), torch.tensor(float(seen), device=device,
                                                                                 dtype=torch.float64)]))
        logits, labels = evaluate(model, test_loader, device, cfg.channels_last)
        m = classification_metrics(logits, labels)
        terms_mean = {f"loss_{k}": float(v) / steps_per_epoch for k, v in term_sums.items()}
        stats = training.source.epoch_stats()
        row = {"epoch": epoch, "train_loss": sum(terms_mean.values()), "train_acc": float(counts[0] / counts[1]),
               **{f"{eval_name}_{k}": v for k, v in m.items()}, "seconds": seconds, **terms_mean, **stats}
        history.append(row)
        if tracking is not None:
            tracking.log_epoch(row, eval_name, [float(g["lr"]) for g in training.optimizer.param_groups])
        # every rank's own RNG states (a collective: all ranks, before rank 0 writes)
        rank_rng = runs.gather_rng_states(loader_rng) if run_dir is not None else None
        if main and run_dir is not None:
            runs.write_metrics(run_dir, history)
            runs.save_checkpoint(ckpt_path, epoch, history, total_seconds, model, source, training.optimizer,
                                 training.scheduler, loader_rng, rank_rng)
        if main and log is not None:
            log(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"{eval_name} acc {m['acc']:.4f}  nll {m['nll']:.4f}  ece {m['ece']:.4f}  {seconds:.1f}s"
                + "".join(f"  {line}" for line in [training.source.describe_stats(stats)] if line))
    return _finish(model, source, training, cfg, history, total_seconds, info=info, run_dir=run_dir, meta=meta,
                   log=log, eval_name=eval_name, accelerator=accelerator, device=device)


def _finish(model, source, training, cfg, history, total_seconds, *, info, run_dir, meta, log, eval_name, accelerator,
            device) -> FitResult:
    """The summary of a finished run (its last epoch's metrics), and its final files: weights, the source's
    artifacts (LS++'s C-matrix), summary.json; the checkpoint goes."""
    main = accelerator.is_main_process
    last = history[-1]
    note = training.source.end_note(last)
    summary = {
        **(meta or {}),
        "train_acc": last.get("train_acc"),
        **{k: last[k] for k in last if k.startswith(eval_name + "_")}, "evaluated_on": eval_name,
        **{k: last[k] for k in training.source.epoch_stats_keys() if k in last},
        **({"note": note} if note else {}),
        "epochs": cfg.epochs, "train_seconds": total_seconds, "seconds_per_epoch": total_seconds / cfg.epochs,
        "device": str(device), "machine": machine_name(device), "num_processes": accelerator.num_processes,
    }
    if main and run_dir is not None:
        runs.save_weights(run_dir / runs.WEIGHTS, model)
        class_names = (info.class_names if info else None) or [str(i) for i in range(source.num_classes)]
        source.write_artifacts(run_dir, class_names, meta or {})
        runs.write_summary(run_dir, summary)
        runs.remove_checkpoint(run_dir / runs.CHECKPOINT)  # the finished run no longer needs it
    if main and log is not None and note:
        log(f"note: {note}")
    accelerator.wait_for_everyone()
    return FitResult(model, source, summary, history)


def _soft_labels(data) -> bool:
    """Whether a TensorDataset's labels are soft labels (an N x K float matrix)."""
    return isinstance(data, torch.utils.data.TensorDataset) and data.tensors[1].is_floating_point()
