"""What each target source costs per training step, measured side by side in one run.

Every source trains its own copy of the same student (same initial weights, same batches,
same optimiser) through the engine's real training step; ``bare`` is a hand-written PyTorch
loop with no framework code, the floor. Warm-up steps are not timed; sources are interleaved
over the repeats in a fresh random order each repeat, so machine drift hits all alike and no row
always follows the same neighbour; in step mode each row first takes one untimed step, so its
timed steps run with its own weights and batch in the caches, as every step of a training run
does. Rows that run a network on the inputs (a ResNet teacher online) are timed in a phase of
their own after the others: a 60x step between two small ones evicts their caches, and the
slow-down would be billed to its neighbours. Garbage collection is frozen while
timing; each repeat times ``steps`` steps between two host clock reads, with a device
synchronise before each read on CUDA and no host sync inside the steps.
"""
from __future__ import annotations

import copy
import gc
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import teachers
from kd.config import TrainConfig
from kd.data import ImageTensors, dataset_info, load_dataset
from kd.data import make_loader
from kd.engine import (AMP_DTYPES, compile_options, compile_step, compiled_optimizer_step, machine_name,
                       make_accelerator, prepare_training, resolve_device)
from kd.errors import KDError
from kd.models import create_model
from kd.sources import SourceContext, TargetSource

def bench_rows() -> list[str]:
    """``bare`` (a hand-written loop, the floor), then the rows of every source in ``teachers.SOURCES``."""
    return ["bare", *_row_table()]


def _row_table() -> dict[str, tuple[type[TargetSource], dict]]:
    return {row: (cls, opts) for cls in teachers.SOURCES.values() for row, opts in cls.bench_rows().items()}


@dataclass(frozen=True)
class Preset:
    name: str
    channels: int
    size: int
    num_classes: int
    teacher: str
    student: str
    dataset: str | None  # the real data set `--data` defaults to
    batch_cpu: int
    batch_cuda: int


PRESETS = {p.name: p for p in (
    Preset("tinyimagenet-r101-shufflenet", 3, 64, 200, "resnet101", "shufflenetv2", "tinyimagenet", 16, 256),
    Preset("cifar100-r34-r18", 3, 32, 100, "resnet34", "resnet18", "cifar100", 32, 256),
    Preset("fmnist-lenet", 1, 28, 10, "resnet18", "lenet", "fashion-mnist", 128, 256),
    Preset("digits", 1, 8, 10, "resnet18", "lenet", "digits", 128, 128),
)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_source(row: str, k: int, teacher: nn.Module | None, n_cached: int) -> TargetSource:
    """The target source behind a row, with stand-in artifacts of the right shape (``stand_in``)."""
    table = _row_table()
    if row not in table:
        raise KDError(f"unknown source '{row}'; choose from {', '.join(bench_rows())}")
    cls, options = table[row]
    return cls.stand_in(SourceContext(k, num_train=n_cached, options=dict(options), teacher_model=teacher))


class _Runner:
    """One row: a student, its optimiser and a step function over a batch stream."""

    def __init__(self, name: str, step: Callable, batches, compiled: bool = False):
        self.name, self.step, self.batches, self.compiled = name, step, batches, compiled
        self.times: list[float] = []
        self.compile_s = float("nan")
        self.graphs = 0  # graphs torch.compile made in the row's first step (0: it fell back to eager)
        self.phase = "main"  # "heavy": the row runs a network on the inputs, timed apart (see phases)


def _bare_runner(student: nn.Module, cfg, device, amp_dtype, batches, compiled: bool = False,
                 backend: str = "inductor", mode: str = "default") -> _Runner:
    """The plain PyTorch loop: forward, cross-entropy, backward, SGD. Compiled, the forward-and-loss and
    the optimiser step are compiled as the engine's are (:func:`kd.engine.compile_step`)."""
    model = student.to(device)
    lr = torch.tensor(cfg.lr, device=device) if compiled else cfg.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)

    def forward_loss(x, y):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    options = compile_options(mode, backend)
    fwd = torch.compile(forward_loss, dynamic=False, **options) if compiled else forward_loss
    opt_step = compiled_optimizer_step(opt, options) if compiled else opt.step

    def step(x, y, idx):
        loss = fwd(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()

    return _Runner("bare" + compiled_suffix(mode) * compiled, step, batches, compiled)


#: the row-name suffix of a compiled row, by --compile-mode
SUFFIXES = {"default": "+compile", "reduce-overhead": "+graphs", "max-autotune": "+autotune"}


def compiled_suffix(mode: str) -> str:
    return SUFFIXES[mode]


def compile_training(training, backend: str = "inductor", mode: str = "default") -> None:
    """The engine's compiled step (:func:`kd.engine.compile_step`: forward, source terms and their sum,
    and the optimiser step) and, for sources that run a network on the inputs (``network``,
    ``tfkd-self``), that network compiled too. Compilation happens on the first step; later rows of
    the same architecture compile their own step afresh (:func:`kd.engine.own_code`), sped up by inductor's
    cache of generated code, so the first compiled row bears most of the cost."""
    compile_step(training, mode, backend)
    source = training.source
    if source.needs_inputs:
        options = compile_options(mode, backend)
        for name, child in list(source.named_children()):
            if any(True for _ in child.parameters()):
                setattr(source, name, torch.compile(child, **options))


def framework_runner(name, student, source, cfg, batches, compiled: bool = False,
                     backend: str = "inductor", mode: str = "default") -> _Runner:
    training = prepare_training(make_accelerator(cfg), student, source, cfg, steps_per_epoch=10**6)
    if compiled:
        compile_training(training, backend, mode)
    r = _Runner(name + compiled_suffix(mode) * compiled, training.step, batches, compiled)
    if source.needs_inputs:
        r.phase = "heavy"
    return r


def synthetic_batches(preset: Preset, batch: int, device, channels_last: bool, n_cached: int, count: int = 4):
    """A few fixed batches already on the device: the timing covers compute, not loading."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(batch, preset.channels, preset.size, preset.size, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, preset.num_classes, (batch,), generator=g).to(device)
        idx = torch.randint(0, n_cached, (batch,), generator=g).to(device)
        out.append((x, y, idx))
    return out


def synthetic_split(preset: Preset, num_samples: int):
    """Random uint8 images of the preset's shape, described as the preset's data set (its mean, std,
    crop padding and flips), so an epoch over them goes through the same loader and batch
    augmentation as the real in-memory data set would."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (num_samples, preset.channels, preset.size, preset.size), generator=g,
                           dtype=torch.uint8)
    labels = torch.randint(0, preset.num_classes, (num_samples,), generator=g)
    info = dataset_info(preset.dataset)
    return ImageTensors(images, labels), info


class Cycle:
    """Endless iteration over a list of batches, or over a real loader restarted each epoch."""

    def __init__(self, batches=None, loader=None, channels_last=False):
        self.batches, self.loader, self.channels_last = batches, loader, channels_last
        self.it = iter(())
        self.i = 0

    def next(self):
        if self.batches is not None:
            b = self.batches[self.i % len(self.batches)]
            self.i += 1
            return b
        try:
            x, y, idx = next(self.it)
        except StopIteration:
            self.loader.set_epoch(self.i)
            self.i += 1
            self.it = iter(self.loader)
            x, y, idx = next(self.it)
        return self._layout(x), y, idx

    def _layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def epoch(self, epoch: int):
        """One whole pass of the loader (a fresh iterator), batches in the layout the step expects."""
        self.loader.set_epoch(epoch)
        for x, y, idx in self.loader:
            yield self._layout(x), y, idx


def warm_up(r: _Runner, warmup: int, dev) -> None:
    """Untimed steps. A compiled row's first step compiles: its wall time is reported as ``compile_s``."""
    from torch._dynamo.utils import counters

    for i in range(max(warmup, 2) if r.compiled else warmup):
        sync(dev)
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        r.step(*r.batches.next())
        sync(dev)
        if r.compiled and i == 0:
            r.compile_s = time.perf_counter() - t0
            r.graphs = counters["stats"]["unique_graphs"] - graphs


def phases(runners: list[_Runner]) -> tuple[list[_Runner], list[_Runner]]:
    """(main rows, heavy rows): a heavy row runs a network on the inputs each step (``network``,
    ``tfkd-self``: tens of times a small student's step), and its phase is set by the runner that
    made it. Decided by what the row does, not by timing its warm-up, which a busy machine skews."""
    return [r for r in runners if r.phase != "heavy"], [r for r in runners if r.phase == "heavy"]


def _load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS does not say): a noisy run shows in the CSV."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def timed_repeats(runners: list[_Runner], repeats: int, steps: int, mode: str, dev, log, seed: int = 0) -> None:
    """``repeats`` rounds over the rows, each round in a fresh random order (seeded), so no row
    always follows the same neighbour. In step mode every row takes one untimed step right before
    its timed ones: a step then finds its own weights, gradients and batch in the caches, as each
    step of a training run finds its predecessor's. Heavy rows (see :func:`phases`) run in a second
    phase, after every main-phase round, so their cache eviction is not billed to small rows.
    Garbage collection is frozen meanwhile: a full collection walks every live object and would
    land in whichever step crosses the threshold."""
    main, heavy = phases(runners)
    rng = random.Random(seed)
    gc.collect()
    gc.freeze()
    try:
        for group in (main, heavy):
            if group:
                _rounds(group, repeats, steps, mode, dev, log, rng)
    finally:
        gc.unfreeze()


def timing_columns(r: _Runner, base: _Runner | None, batch: int) -> dict:
    """A row's timing columns: median, min, max, throughput, and two ratios to ``base`` (1-hot):
    of the medians, and the median of the ratios taken within each repeat (adjacent in time, so
    drift between repeats cancels: steadier than the ratio of medians on a busy machine)."""
    med = statistics.median(r.times)
    nan = float("nan")
    return {
        "source": r.name, "step_ms_median": med, "step_ms_min": min(r.times), "step_ms_max": max(r.times),
        "images_per_s": batch / med * 1000.0,
        "ratio_vs_onehot": med / statistics.median(base.times) if base else nan,
        "paired_ratio_vs_onehot": paired_ratio(r, base) if base else nan,
        "phase": r.phase,
    }


def paired_ratio(a: _Runner, b: _Runner) -> float:
    """Median over repeats of a's time over b's in the same round; rows timed in different phases
    (see :func:`phases`) were not adjacent in time, so theirs is the ratio of the medians."""
    if a.phase != b.phase:
        return statistics.median(a.times) / statistics.median(b.times)
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def _rounds(runners: list[_Runner], repeats: int, steps: int, mode: str, dev, log, rng: random.Random) -> None:
    for rep in range(repeats):
        order = list(runners)
        rng.shuffle(order)
        for r in order:
            if mode == "step":  # untimed: the caches hold this row's data, not the previous row's
                r.step(*r.batches.next())
            sync(dev)
            t0 = time.perf_counter()
            if mode == "epoch":
                n = 0
                for b in r.batches.epoch(1000 + rep):
                    r.step(*b)
                    n += 1
                assert n == steps, (n, steps)
            else:
                for _ in range(steps):
                    r.step(*r.batches.next())
            sync(dev)
            r.times.append((time.perf_counter() - t0) / steps * 1000.0)
        if log and (rep + 1) % max(1, repeats // 10) == 0:
            log(f"{runners[0].phase} phase: repeat {rep + 1}/{repeats} done")


def run_bench(preset: str, device: str = "cpu", batch_size: int | None = None, steps: int | None = None,
              repeats: int = 5, warmup: int = 3, amp: str = "none", channels_last: bool = False,
              sources: tuple[str, ...] | None = None, data: str | None = None, data_root: str | None = None,
              log=print, mode: str = "step", compile: bool = False, epoch_size: int | None = None,
              compile_backend: str = "inductor", compile_mode: str = "default") -> pd.DataFrame:
    """Time the preset's student for each source; one row per source (and per compiled variant).

    ``mode="step"``: ``steps`` steps per repeat on batches already on the device (or drawn from
    ``data``'s loader). ``mode="epoch"``: each repeat is one whole epoch through the real loader
    (batch slicing and augmentation included) of ``data``, or, without ``data``, of
    ``epoch_size`` synthetic uint8 images of the preset's shape. ``compile=True`` adds a
    ``SOURCE+compile`` row per source (see :func:`compile_training`; ``compile_mode``
    reduce-overhead makes them ``SOURCE+graphs`` rows, replayed as CUDA graphs); its first warm-up
    step, which compiles, is timed apart as ``compile_s`` and never inside the timed repeats
    (``compile_backend``: torch.compile's backend; the tests use ``aot_eager``, which needs no C++ compiler).
    """
    rows = bench_rows()
    sources = tuple(sources or rows)
    if preset not in PRESETS:
        raise KDError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if mode not in ("step", "epoch"):
        raise KDError(f"unknown --mode '{mode}'; choose step or epoch")
    p = PRESETS[preset]
    unknown = [s for s in sources if s not in rows]
    if unknown:
        raise KDError(f"unknown source '{unknown[0]}'; choose from {', '.join(rows)}")
    resolve_device(device)
    if compile and compile_mode == "reduce-overhead" and device != "cuda":
        raise KDError("--compile-mode reduce-overhead replays CUDA graphs and needs --device cuda; on the CPU use "
                      "--compile-mode default")
    if repeats < 1 or (steps is not None and steps < 1 and data is None) or warmup < 0:
        raise KDError("--repeats and --steps must be at least 1, --warmup at least 0")
    if mode == "epoch" and steps is not None:
        raise KDError("--mode epoch times whole epochs; set their length with --epoch-size (synthetic) instead of --steps")
    dev = torch.device(device)
    batch = batch_size or (p.batch_cuda if dev.type == "cuda" else p.batch_cpu)
    if mode == "epoch" and data is None and epoch_size is not None and epoch_size < batch:
        raise KDError(f"--epoch-size {epoch_size} is smaller than one batch ({batch}); give at least {batch} samples")
    amp_dtype = AMP_DTYPES[amp]
    cfg = TrainConfig(device=device, amp=amp, channels_last=channels_last, batch_size=batch, augment=True)

    n_cached = 10_000
    real = None
    if data is not None:
        split = load_dataset(data, data_root)
        info = split.info
        if (info.channels, info.image_size, info.num_classes) != (p.channels, p.size, p.num_classes):
            raise KDError(f"data set '{data}' does not match preset '{preset}' "
                          f"({info.channels}x{info.image_size}x{info.image_size}, K={info.num_classes})")
        real = (split.train, info)
    elif mode == "epoch":
        real = synthetic_split(p, epoch_size or batch * (50 if dev.type == "cuda" else 8))
    if real is not None:
        n_cached = len(real[0])
        loader = make_loader(real[0], real[1], cfg, train=True, device=dev)
        steps = len(loader) if mode == "epoch" else (steps or len(loader))
    steps = steps or (20 if dev.type == "cuda" else 10)

    torch.manual_seed(0)
    student0 = create_model(p.student, p.num_classes, p.channels, p.size)
    teacher = None
    table = _row_table()
    if any(table[s][0].needs_inputs for s in sources if s != "bare"):  # network, tfkd-self, ...
        teacher = create_model(p.teacher, p.num_classes, p.channels, p.size).to(dev).eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
    if channels_last:
        student0.to(memory_format=torch.channels_last)

    synthetic = None if real else synthetic_batches(p, batch, dev, channels_last, n_cached)
    runners = []
    for name in sources:
        for compiled in ((False, True) if compile else (False,)):
            batches = Cycle(synthetic) if real is None else Cycle(
                loader=make_loader(real[0], real[1], cfg, train=True, device=dev), channels_last=channels_last)
            student = copy.deepcopy(student0)
            if name == "bare":
                runners.append(_bare_runner(student, cfg, dev, amp_dtype, batches, compiled, compile_backend,
                                            compile_mode))
            else:
                # a compiled teacher is its own copy, so the eager network row keeps an eager teacher
                t = copy.deepcopy(teacher) if (compiled and teacher is not None) else teacher
                runners.append(framework_runner(name, student, make_source(name, p.num_classes, t, n_cached), cfg,
                                                batches, compiled, compile_backend, compile_mode))

    for r in runners:  # warm-up: allocator, autotuning, lazy init, compilation
        warm_up(r, warmup, dev)
        if log and r.compiled:
            log(f"{r.name}: first step (compilation) {r.compile_s:.1f}s, {r.graphs} graph(s)"
                + ("" if r.graphs else ": nothing was compiled, the row runs eagerly (marked 'fell back')"))
    sync(dev)
    load_start = _load_average()
    timed_repeats(runners, repeats, steps, mode, dev, log)
    load_end = _load_average()

    by_name = {r.name: r for r in runners}
    rows = []
    for r in runners:
        row = {
            # ratios to 1-hot with the same compilation
            **timing_columns(r, by_name.get("onehot" + compiled_suffix(compile_mode) * r.compiled), batch),
            "preset": p.name, "teacher": p.teacher, "student": p.student,
            "input_shape": f"{p.channels}x{p.size}x{p.size}", "num_classes": p.num_classes,
            "batch_size": batch, "amp": amp, "channels_last": channels_last, "steps": steps, "repeats": repeats,
            "data": data or "synthetic", "device": machine_name(dev), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg_start": load_start, "load_avg_end": load_end,
        }
        if mode == "epoch":
            row.update(mode="epoch", epoch_s_median=row["step_ms_median"] * steps / 1000.0, epoch_samples=steps * batch)
        if compile:
            eager = by_name[r.name.removesuffix(compiled_suffix(compile_mode))]
            row.update(compiled=r.compiled, compile_mode=compile_mode if r.compiled else "none", compile_s=r.compile_s,
                       compiled_graphs=r.graphs, fell_back=bool(r.compiled and r.graphs == 0),
                       paired_speedup_vs_eager=paired_ratio(eager, r))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df) -> str:
    """The table a person reads: medians, spread, throughput and the ratio to 1-hot.

    Epoch-mode rows add seconds per epoch; compiled rows add the compilation time (the first
    step's wall time, outside the timed repeats) and the speed-up over the same row eager.
    """
    epoch = "epoch_s_median" in df.columns
    compiled = "compile_s" in df.columns
    head = "| source | step ms (median) | min | max | images/s | vs onehot (medians) | vs onehot (paired) |"
    if epoch:
        head += " s / epoch (median) |"
    if compiled:
        head += " compile s | speed-up vs eager (paired) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in df.itertuples():
        line = (f"| {r.source} | {r.step_ms_median:.2f} | {r.step_ms_min:.2f} | {r.step_ms_max:.2f} | "
                f"{r.images_per_s:.0f} | {r.ratio_vs_onehot:.3f} | {r.paired_ratio_vs_onehot:.3f} |")
        if epoch:
            line += f" {r.epoch_s_median:.2f} |"
        if compiled:
            fell_back = bool(getattr(r, "fell_back", False))
            line += ((" fell back (ran eagerly) |" if fell_back else f" {r.compile_s:.1f} |")
                     + f" {r.paired_speedup_vs_eager:.2f} |" if r.compiled else " - | - |")
        lines.append(line)
    first = df.iloc[0]
    lines.append("")
    what = (f"one epoch of {first.epoch_samples} samples ({first.steps} steps) through the real loader x "
            f"{first.repeats} repeats" if epoch else f"{first.steps} steps x {first.repeats} repeats")
    lines.append(f"{first.preset}: {first.teacher} -> {first.student}, input {first.input_shape}, K={first.num_classes}, "
                 f"batch {first.batch_size}, amp {first.amp}, channels_last {first.channels_last}, data {first.data}, "
                 f"{what}; {first.device}; torch {first.torch}")
    med = dict(zip(df.source, df.step_ms_median))
    unit = "epoch" if epoch else "step"
    for suffix in ("", *SUFFIXES.values()):
        if "network" + suffix in med and "proxy" + suffix in med:
            lines.append(f"network{suffix} / proxy{suffix} {unit} time: "
                         f"{med['network' + suffix] / med['proxy' + suffix]:.2f}x")
    return "\n".join(lines)
