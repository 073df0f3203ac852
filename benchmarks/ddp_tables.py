"""Does a large frozen table cost anything per step under data-parallel training?

    torchrun --nproc_per_node 2 -m benchmarks.ddp_tables [--rows 200000] [--classes 100] [--out FILE.csv]

Each process trains the same small MLP from a proxy teacher (a K x K table) and from a cached
teacher holding an N x K table, interleaved over repeats, through the engine's real step.
Only the network is wrapped in DistributedDataParallel, so neither table is broadcast; a
cached/proxy ratio near 1 shows it. Rank 0 prints medians and the ratio (and writes the CSV).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from kd.config import TrainConfig
from kd.engine import machine_name, make_accelerator, prepare_training
from kd.models import MLP
from kd.sources import SourceContext
from teachers.cached import CachedTeacher
from teachers.proxy import ProxyTeacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_tables", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000, help="samples in the cached table")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    cfg = TrainConfig(device="cpu", batch_size=a.batch_size)
    acc = make_accelerator(cfg)
    k = a.classes
    g = torch.Generator().manual_seed(0)
    sources = {"proxy": ProxyTeacher.stand_in(SourceContext(k)),
               "cached": CachedTeacher(torch.randn(a.rows, k, generator=g))}
    torch.manual_seed(0)
    net0 = MLP(a.features, k)
    runs = {name: prepare_training(acc, copy.deepcopy(net0), src, cfg, steps_per_epoch=10**6).step
            for name, src in sources.items()}
    batches = [(torch.randn(a.batch_size, a.features, generator=g), torch.randint(0, k, (a.batch_size,), generator=g),
                torch.randint(0, a.rows, (a.batch_size,), generator=g)) for _ in range(4)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(a.repeats + 1):  # the first round warms up
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            acc.wait_for_everyone()
            t0 = time.perf_counter()
            for s in range(a.steps):
                runs[name](*batches[s % len(batches)])
            acc.wait_for_everyone()
            if rep:
                times[name].append((time.perf_counter() - t0) / a.steps * 1000)
    if acc.is_main_process:
        med = {n: statistics.median(t) for n, t in times.items()}
        paired = statistics.median(c / p_ for c, p_ in zip(times["cached"], times["proxy"]))
        print(f"{acc.num_processes} processes, {machine_name(torch.device('cpu'))}, torch {torch.__version__}: "
              f"step with proxy {med['proxy']:.3f} ms, with cached ({a.rows} x {k}) {med['cached']:.3f} ms, "
              f"ratio {med['cached'] / med['proxy']:.3f} (paired {paired:.3f}); medians of {a.repeats} x {a.steps} steps")
        if a.out:
            import pandas as pd

            pd.DataFrame([{"source": n, "step_ms_median": med[n], "rows": a.rows, "num_classes": k,
                           "batch_size": a.batch_size, "processes": acc.num_processes, "steps": a.steps,
                           "repeats": a.repeats, "ratio_vs_proxy": med[n] / med["proxy"],
                           "paired_ratio_vs_proxy": paired if n == "cached" else 1.0,
                           "device": machine_name(torch.device("cpu")), "torch": torch.__version__}
                          for n in med]).to_csv(a.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
