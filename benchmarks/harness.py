"""The timing harness behind `kd bench` (benchmarks/cost.py) and the large-K, loader and step-profile benchmarks:
one row per source, each a student and a step function (:class:`Runner`), warmed up untimed, then timed in
rounds of a fresh random order (:func:`timed_repeats`) with heavy rows in a phase of their own; medians and
ratios (:func:`timing_columns`). See benchmarks/cost.py's docstring for why each choice is made."""
from __future__ import annotations

import gc
import os
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from teachers import bench_rows, row_table
from kd.engine import (compile_options, compile_step, compiled_optimizer_step, lr_lambda, make_accelerator,
                       prepare_training)
from kd.errors import KDError
from kd.sources import SourceContext, TargetSource


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stand_in_source(row: str, k: int, teacher: nn.Module | None, n_cached: int) -> TargetSource:
    """The target source behind a row, with stand-in artifacts of the right shape (``stand_in``)."""
    table = row_table()
    if row not in table:
        raise KDError(f"unknown source '{row}'; choose from {', '.join(bench_rows())}")
    cls, options = table[row]
    return cls.stand_in(SourceContext(k, num_train=n_cached, options=dict(options), teacher_model=teacher))


class Runner:
    """One row: a student, its optimiser and a step function over a batch stream."""

    def __init__(self, name: str, step: Callable, batches, compiled: bool = False):
        self.name, self.step, self.batches, self.compiled = name, step, batches, compiled
        self.times: list[float] = []
        self.compile_s = float("nan")
        self.graphs = 0  # graphs torch.compile made in the row's first step (0: it fell back to eager)
        self.phase = "main"  # "heavy": the row runs a network on the inputs, timed apart (see phases)


#: steps per epoch of every timed row's schedule: the rows time steps of a run's first warm-up epoch, where the
#: learning rate is a millionth of its peak, so that no row's network moves far from where it started
STEPS_PER_EPOCH = 10**6


def bare_runner(student: nn.Module, cfg, device, amp_dtype, batches, compiled: bool = False,
                 backend: str = "inductor", mode: str = "default") -> Runner:
    """The plain PyTorch loop: forward, cross-entropy, backward, SGD, and the learning rate set by hand
    after each step, as nanoGPT's loop does, on the schedule the framework rows follow
    (:func:`kd.engine.lr_lambda` with :data:`STEPS_PER_EPOCH`). The same rate matters for more than
    fairness: the step's time depends on the weights' values, and on the synthetic batches a LeNet at its
    peak rate kills its ReLUs within a few hundred steps and then steps 10-20% faster than a live one
    (benchmarks/step-cost.md). Compiled, the forward-and-loss and the optimiser step are compiled as the
    engine's are (:func:`kd.engine.compile_step`), the rate a tensor updated in place."""
    model = student.to(device)
    schedule = lr_lambda(cfg, STEPS_PER_EPOCH)
    lr = torch.tensor(cfg.lr * schedule(0), device=device) if compiled else cfg.lr * schedule(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    done = [0]  # optimiser steps taken

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
        done[0] += 1
        rate = cfg.lr * schedule(done[0])
        for g in opt.param_groups:
            if compiled:
                g["lr"].fill_(rate)
            else:
                g["lr"] = rate

    return Runner("bare" + compiled_suffix(mode) * compiled, step, batches, compiled)


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
                     backend: str = "inductor", mode: str = "default") -> Runner:
    training = prepare_training(make_accelerator(cfg), student, source, cfg, steps_per_epoch=STEPS_PER_EPOCH)
    if compiled:
        compile_training(training, backend, mode)
    r = Runner(name + compiled_suffix(mode) * compiled, training.step, batches, compiled)
    if source.needs_inputs:
        r.phase = "heavy"
    return r


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


def warm_up(r: Runner, warmup: int, dev) -> None:
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


def phases(runners: list[Runner]) -> tuple[list[Runner], list[Runner]]:
    """(main rows, heavy rows): a heavy row runs a network on the inputs each step (``network``,
    ``tfkd-self``: tens of times a small student's step), and its phase is set by the runner that
    made it. Decided by what the row does, not by timing its warm-up, which a busy machine skews."""
    return [r for r in runners if r.phase != "heavy"], [r for r in runners if r.phase == "heavy"]


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS does not say): a noisy run shows in the CSV."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def timed_repeats(runners: list[Runner], repeats: int, steps: int, mode: str, dev, log, seed: int = 0) -> None:
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


def timing_columns(r: Runner, base: Runner | None, batch: int) -> dict:
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


def paired_ratio(a: Runner, b: Runner) -> float:
    """Median over repeats of a's time over b's in the same round; rows timed in different phases
    (see :func:`phases`) were not adjacent in time, so theirs is the ratio of the medians."""
    if a.phase != b.phase:
        return statistics.median(a.times) / statistics.median(b.times)
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def _rounds(runners: list[Runner], repeats: int, steps: int, mode: str, dev, log, rng: random.Random) -> None:
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
