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

    python -m benchmarks.step_profile --sources onehot,lspp --rounds 1000 --out FILE.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.cost import PRESETS, synthetic_batches
from benchmarks.harness import stand_in_source
from kd.config import TrainConfig
from kd.engine import machine_name, make_accelerator, prepare_training, total_loss
from kd.errors import KDError
from kd.models import create_model
from kd.runs import check_new_file

PHASES = ("forward", "loss", "zero_grad", "backward", "optimizer", "scheduler")


def _trainings(preset: str, sources: list[str]):
    p = PRESETS[preset]
    cfg = TrainConfig(device="cpu", batch_size=p.batch_cpu, augment=True)
    torch.manual_seed(0)
    student0 = create_model(p.student, p.num_classes, p.channels, p.size)
    out = {}
    for name in sources:
        src = stand_in_source(name, p.num_classes, None, 10_000)
        if src.needs_inputs:
            raise KDError(f"source '{name}' runs a teacher network; profile label-level sources only")
        out[name] = prepare_training(make_accelerator(cfg), copy.deepcopy(student0), src, cfg, steps_per_epoch=10**6)
    x, y, idx = synthetic_batches(p, p.batch_cpu, torch.device("cpu"), False, 10_000, count=1)[0]
    return out, (x, y, idx)


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
    names = list(trainings)
    times = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            _phased_step(trainings[n], *batch, time.perf_counter)
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                times[n].append(_phased_step(trainings[n], *batch, time.perf_counter))
    finally:
        gc.unfreeze()
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
    ap.add_argument("--out", default=None, metavar="FILE.json")
    args = ap.parse_args(argv)
    try:
        out = check_new_file(args.out) if args.out else None
        sources = [s.strip() for s in args.sources.split(",") if s.strip()]
        trainings, batch = _trainings(args.preset, sources)
        counts = {n: operator_counts(t, batch) for n, t in trainings.items()}
        timing = phase_timings(trainings, batch, args.rounds)
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
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
