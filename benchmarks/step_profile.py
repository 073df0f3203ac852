"""Where a training step's time goes, per source: operator counts and phase timings.

Two views of ``prepare_training(...).step`` on one fixed batch of a preset (default
fmnist-lenet: LeNet, B=128, K=10, fp32 on CPU):

* **operators**: ``torch.profiler`` counts of every recorded operator per step (deterministic,
  unlike times), and for the first two sources, the operators whose counts differ;
* **phases**: the step cut into forward, loss (the source's terms and their sum), zero_grad,
  backward, optimiser and scheduler, each timed with the host clock (CPU only: the device is not
  synchronised), the sources interleaved step by step; medians and the paired median of the
  per-round differences to the first source.

The phases re-do by hand what ``Training.step`` does in one call (no mixing, no AMP, no
data-parallel averaging), so their sum is the step without its call overhead.

``--over-bare`` adds a third view, what the framework adds to the bare loop of ``kd bench``:
that loop, then the same loop with the framework's per-step additions put in one at a time
(:class:`HandLoop`: torch's ``LambdaLR`` for the hand-set rate; the kept detached logits, the
named-terms dict and its sum, the disabled autocast context), then ``Training.step`` itself with
the first source, each on its own copy of one student at the same learning rates, interleaved
step by step; operator counts and median step times, each paired against the bare loop. One more
row, ``bare, peak rate``, is the bare loop at the schedule's peak rate throughout, as ``kd bench``'s
bare row ran before it followed the framework rows' schedule.

    python -m benchmarks.step_profile --sources onehot,lspp --rounds 1000 --out FILE.json
    python -m benchmarks.step_profile --sources onehot --over-bare --rounds 2000 --out FILE.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.cost import PRESETS, synthetic_batches
from benchmarks.harness import STEPS_PER_EPOCH, bare_runner, stand_in_source
from kd.config import TrainConfig
from kd.engine import build_optimizer, lr_lambda, machine_name, make_accelerator, prepare_training, total_loss
from kd.errors import KDError
from kd.models import create_model
from kd.runs import check_new_file
from teachers.onehot import OneHot

PHASES = ("forward", "loss", "zero_grad", "backward", "optimizer", "scheduler")


def _trainings(preset: str, sources: list[str], over_bare: bool = False):
    """One prepared training per source (and, with ``over_bare``, the rungs of :class:`HandLoop`), all from
    copies of one student, and one fixed batch."""
    p = PRESETS[preset]
    cfg = TrainConfig(device="cpu", batch_size=p.batch_cpu, augment=True)
    torch.manual_seed(0)
    student0 = create_model(p.student, p.num_classes, p.channels, p.size)
    out = {}
    if over_bare:
        out["bare"] = bare_runner(copy.deepcopy(student0), cfg, torch.device("cpu"), None, None)
        peak = dataclasses.replace(cfg, schedule="constant", warmup_epochs=0.0)  # kd bench's bare row until 2026-12
        out["bare, peak rate"] = bare_runner(copy.deepcopy(student0), peak, torch.device("cpu"), None, None)
        for rung in HandLoop.RUNGS:
            out[rung] = HandLoop(copy.deepcopy(student0), cfg, rung, p.num_classes)
    for name in sources:
        src = stand_in_source(name, p.num_classes, None, 10_000)
        if src.needs_inputs:
            raise KDError(f"source '{name}' runs a teacher network; profile label-level sources only")
        out[name] = prepare_training(make_accelerator(cfg), copy.deepcopy(student0), src, cfg, steps_per_epoch=STEPS_PER_EPOCH)
    x, y, idx = synthetic_batches(p, p.batch_cpu, torch.device("cpu"), False, 10_000, count=1)[0]
    return out, (x, y, idx)


class HandLoop:
    """The bare loop of ``kd bench`` (:func:`benchmarks.harness.bare_runner`) with what ``Training.step`` adds
    to it switched on rung by rung: ``+LambdaLR`` (the schedule stepped by torch's ``LambdaLR`` after the
    optimiser, as the engine does, instead of the rate set by hand); ``+bookkeeping`` (also the autocast
    context, disabled in fp32, the named-terms dict and ``total_loss``, and the detached logits kept for the
    epoch's accuracy)."""

    RUNGS = ("+LambdaLR", "+bookkeeping")

    def __init__(self, model, cfg: TrainConfig, rung: str, num_classes: int):
        self.model, self.rung = model.train(), rung
        self.optimizer = build_optimizer(model, OneHot(num_classes), cfg)  # as a 1-hot training's
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, STEPS_PER_EPOCH))
        self.logits = None

    def step(self, x, y, idx):
        if self.rung == "+bookkeeping":
            with torch.autocast("cpu", enabled=False):
                logits = self.model(x)
                terms = {"ce": F.cross_entropy(logits.float(), y)}
            loss = total_loss(terms)
            self.logits = logits.detach()
        else:
            loss = F.cross_entropy(self.model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


def interleaved(names: list[str], call, rounds: int, warmup: int = 20) -> dict[str, list]:
    """``call(name)`` for every name, ``warmup`` untimed rounds and then ``rounds`` recorded ones, the
    names interleaved step by step (every other round reversed, so no name always follows the same
    neighbour) with garbage collection frozen (a full collection would land in whichever step crosses
    its threshold); what each call returns, in order, per name."""
    for _ in range(warmup):
        for n in names:
            call(n)
    out = {n: [] for n in names}
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                out[n].append(call(n))
    finally:
        gc.unfreeze()
    return out


def whole_steps(steppers: dict, batch, rounds: int, warmup: int = 20) -> dict:
    """Each stepper's whole ``step`` timed, interleaved: median step and the median of its per-round
    ratio to the first."""
    def timed(n):
        t0 = time.perf_counter()
        steppers[n].step(*batch)
        return (time.perf_counter() - t0) * 1e6

    names = list(steppers)
    times = interleaved(names, timed, rounds, warmup)
    base = times[names[0]]
    return {n: {"step_us": statistics.median(times[n]),
                "paired_ratio_to_bare": statistics.median(a / b for a, b in zip(times[n], base))} for n in names}


def operator_counts(training, batch, steps: int = 10) -> Counter:
    """Mean count per step of each operator ``torch.profiler`` records (after 5 untimed steps)."""
    for _ in range(5):
        training.step(*batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            training.step(*batch)
    return Counter({e.key: e.count / steps for e in prof.key_averages()})


def _phased_step(t, x, y, idx, clock) -> list[float]:
    marks = [clock()]
    logits = t.model(x)
    marks.append(clock())
    terms = t.source.loss_terms(logits, y, inputs=x if t.source.needs_inputs else None,
                                index=idx if t.source.needs_index else None)
    loss = total_loss(terms)
    marks.append(clock())
    t.optimizer.zero_grad(set_to_none=True)
    marks.append(clock())
    loss.backward()
    marks.append(clock())
    t.optimizer.step()
    marks.append(clock())
    t.scheduler.step()
    marks.append(clock())
    return [(b - a) * 1e6 for a, b in zip(marks, marks[1:])]


def phase_timings(trainings: dict, batch, rounds: int, warmup: int = 20) -> dict:
    """Each training's step cut into :data:`PHASES` (:func:`_phased_step`), interleaved: median of each
    phase and of the whole, and against the first training the paired median differences per phase
    and the paired median ratio of the whole."""
    names = list(trainings)
    times = interleaved(names, lambda n: _phased_step(trainings[n], *batch, time.perf_counter), rounds, warmup)
    base = names[0]
    out = {}
    for n in names:
        cols = list(zip(*times[n]))
        whole = [sum(row) for row in times[n]]
        out[n] = {ph: statistics.median(c) for ph, c in zip(PHASES, cols)}
        out[n]["step"] = statistics.median(whole)
        if n != base:
            bcols = list(zip(*times[base]))
            out[n]["paired_diff_us"] = {ph: statistics.median(a - b for a, b in zip(c, bc))
                                        for ph, c, bc in zip(PHASES, cols, bcols)}
            out[n]["paired_step_ratio"] = statistics.median(
                a / b for a, b in zip(whole, (sum(row) for row in times[base])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="fmnist-lenet", choices=list(PRESETS))
    ap.add_argument("--sources", default="onehot,lspp", help="comma-separated label-level rows; the first is the base")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--over-bare", action="store_true",
                    help="also time the bare loop, its rungs towards Training.step, and the first source's real step")
    ap.add_argument("--out", default=None, metavar="FILE.json")
    args = ap.parse_args(argv)
    try:
        out = check_new_file(args.out) if args.out else None
        sources = [s.strip() for s in args.sources.split(",") if s.strip()]
        steppers, batch = _trainings(args.preset, sources, args.over_bare)
        counts = {n: operator_counts(t, batch) for n, t in steppers.items()}
        trainings = {n: steppers[n] for n in sources}
        timing = phase_timings(trainings, batch, args.rounds)
        ladder = (whole_steps({n: steppers[n] for n in ("bare", "bare, peak rate", *HandLoop.RUNGS, sources[0])}, batch, args.rounds)
                  if args.over_bare else None)
    except KDError as e:
        print(f"step_profile: error: {e}", file=sys.stderr)
        return 2
    a, b = sources[0], sources[-1]
    diff = {k: counts[b][k] - counts[a][k] for k in sorted(set(counts[a]) | set(counts[b]))
            if counts[b][k] != counts[a][k]}
    result = {"preset": args.preset, "rounds": args.rounds, "device": machine_name(torch.device("cpu")),
              "torch": torch.__version__, "load_avg": os.getloadavg()[0],
              "operators_per_step": {n: sum(c.values()) for n, c in counts.items()},
              f"operator_count_diff_{b}_minus_{a}": diff, "phases_us": timing}
    if ladder is not None:
        bare = counts["bare"]
        result["over_bare"] = {n: {**row, "operator_count_diff_to_bare": {
            k: counts[n][k] - bare[k] for k in sorted(set(counts[n]) | set(bare)) if counts[n][k] != bare[k]}}
            for n, row in ladder.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
