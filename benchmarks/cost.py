"""What each target source costs per training step, measured side by side in one run.

Every source trains its own copy of the same student (same initial weights, same batches,
same optimiser) through the engine's real training step; ``bare`` is a hand-written PyTorch
loop with no framework code, the floor. Warm-up steps are not timed; sources are interleaved
round-robin over the repeats (the starting source rotates) so machine drift hits all alike;
each repeat times ``steps`` steps between two host clock reads, with a device synchronise
before each read on CUDA and no host sync inside the steps.
"""
from __future__ import annotations

import copy
import platform
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
from kd.data import load_dataset
from kd.engine import make_accelerator, make_loader, prepare_training
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
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

    def __init__(self, name: str, step: Callable, batches):
        self.name, self.step, self.batches = name, step, batches
        self.times: list[float] = []


def _bare_runner(student: nn.Module, cfg, device, amp_dtype, batches) -> _Runner:
    model = student.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)

    def step(x, y, idx):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _Runner("bare", step, batches)


def _framework_runner(name, student, source, cfg, batches) -> _Runner:
    training = prepare_training(make_accelerator(cfg), student, source, cfg, steps_per_epoch=10**6)
    return _Runner(name, training.step, batches)


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


class _Cycle:
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
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, idx


def run_bench(preset: str, device: str = "cpu", batch_size: int | None = None, steps: int | None = None,
              repeats: int = 5, warmup: int = 3, amp: str = "none", channels_last: bool = False,
              sources: tuple[str, ...] | None = None, data: str | None = None, data_root: str | None = None,
              log=print) -> pd.DataFrame:
    """Time a training step of the preset's student for each source; one row per source."""
    rows = bench_rows()
    sources = tuple(sources or rows)
    if preset not in PRESETS:
        raise KDError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    unknown = [s for s in sources if s not in rows]
    if unknown:
        raise KDError(f"unknown source '{unknown[0]}'; choose from {', '.join(rows)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise KDError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if repeats < 1 or (steps is not None and steps < 1 and data is None) or warmup < 0:
        raise KDError("--repeats and --steps must be at least 1, --warmup at least 0")
    dev = torch.device(device)
    batch = batch_size or (p.batch_cuda if dev.type == "cuda" else p.batch_cpu)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    cfg = TrainConfig(device=device, amp=amp, channels_last=channels_last, batch_size=batch, augment=True)

    n_cached = 10_000
    real = None
    if data is not None:
        split = load_dataset(data, data_root)
        info = split.info
        if (info.channels, info.image_size, info.num_classes) != (p.channels, p.size, p.num_classes):
            raise KDError(f"data set '{data}' does not match preset '{preset}' "
                          f"({info.channels}x{info.image_size}x{info.image_size}, K={info.num_classes})")
        real = (split, info)
        n_cached = len(split.train)
        loader = make_loader(split.train, info, cfg, train=True, device=dev)
        steps = steps or len(loader)
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
        batches = _Cycle(synthetic) if real is None else _Cycle(
            loader=make_loader(real[0].train, real[1], cfg, train=True, device=dev), channels_last=channels_last)
        student = copy.deepcopy(student0)
        if name == "bare":
            runners.append(_bare_runner(student, cfg, dev, amp_dtype, batches))
        else:
            runners.append(_framework_runner(name, student, make_source(name, p.num_classes, teacher, n_cached), cfg,
                                             batches))

    for r in runners:  # warm-up: allocator, autotuning, lazy init
        for _ in range(warmup):
            r.step(*r.batches.next())
    _sync(dev)
    for rep in range(repeats):
        order = runners[rep % len(runners):] + runners[: rep % len(runners)]
        for r in order:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                r.step(*r.batches.next())
            _sync(dev)
            r.times.append((time.perf_counter() - t0) / steps * 1000.0)
        if log:
            log(f"repeat {rep + 1}/{repeats} done")

    med = {r.name: statistics.median(r.times) for r in runners}
    base = med.get("onehot")
    base_times = next((r.times for r in runners if r.name == "onehot"), None)
    rows = []
    for r in runners:
        # The same ratio taken within each repeat (adjacent in time), then the median: drift
        # between repeats cancels, so it is steadier than the ratio of medians on a busy machine.
        paired = statistics.median(a / b for a, b in zip(r.times, base_times)) if base_times else float("nan")
        rows.append({
            "source": r.name, "step_ms_median": med[r.name], "step_ms_min": min(r.times), "step_ms_max": max(r.times),
            "images_per_s": batch / med[r.name] * 1000.0,
            "ratio_vs_onehot": med[r.name] / base if base else float("nan"),
            "paired_ratio_vs_onehot": paired,
            "preset": p.name, "teacher": p.teacher, "student": p.student,
            "input_shape": f"{p.channels}x{p.size}x{p.size}", "num_classes": p.num_classes,
            "batch_size": batch, "amp": amp, "channels_last": channels_last, "steps": steps, "repeats": repeats,
            "data": data or "synthetic", "device": device_name(dev), "torch": torch.__version__,
        })
    return pd.DataFrame(rows)


def markdown(df) -> str:
    """The table a person reads: medians, spread, throughput and the ratio to 1-hot."""
    lines = ["| source | step ms (median) | min | max | images/s | vs onehot (medians) | vs onehot (paired) |",
             "|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.source} | {r.step_ms_median:.2f} | {r.step_ms_min:.2f} | {r.step_ms_max:.2f} | "
                     f"{r.images_per_s:.0f} | {r.ratio_vs_onehot:.3f} | {r.paired_ratio_vs_onehot:.3f} |")
    first = df.iloc[0]
    lines.append("")
    lines.append(f"{first.preset}: {first.teacher} -> {first.student}, input {first.input_shape}, K={first.num_classes}, "
                 f"batch {first.batch_size}, amp {first.amp}, channels_last {first.channels_last}, data {first.data}, "
                 f"{first.steps} steps x {first.repeats} repeats; {first.device}; torch {first.torch}")
    med = dict(zip(df.source, df.step_ms_median))
    if "network" in med and "proxy" in med:
        lines.append(f"network / proxy step time: {med['network'] / med['proxy']:.2f}x")
    return "\n".join(lines)
