"""The small choices in the hot path, each timed against its plain alternative, side by side.

    python -m benchmarks.micro [--repeats 2000] [--device cpu]

Each pair is run interleaved (A, B, A, B, ...) after a warm-up and reported as medians and
their ratio. The comments in the code that cite a speed-up quote this command's output.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kd.engine import total_loss
from kd.models import create_model


def _time_pair(a: Callable[[], object], b: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    for _ in range(20):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for f, out in ((a, ta), (b, tb)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ta), statistics.median(tb)


def pairs(device: torch.device, batch: int = 128, k: int = 10) -> dict[str, tuple[str, Callable, str, Callable]]:
    """name -> (what we do, its callable, the alternative, its callable)."""
    g = torch.Generator().manual_seed(0)
    table = torch.rand(k, k, generator=g).to(device)
    labels = torch.randint(0, k, (batch,), generator=g).to(device)
    logits = torch.randn(batch, k, generator=g).to(device)
    probs = logits.softmax(1)
    terms = {"a": logits.sum(), "b": logits.mean()}
    smooth = (0.9 * torch.eye(k) + 0.1 / k).to(device)

    def one_group():
        return _opt_step(device, groups=1)

    def two_groups():
        return _opt_step(device, groups=2)

    return {
        "row gather": ("table.index_select(0, y)", lambda: table.index_select(0, labels),
                       "table[y]", lambda: table[labels]),
        "sum of terms": ("total_loss(terms)", lambda: total_loss(terms), "sum(terms.values())", lambda: sum(terms.values())),
        "label smoothing": ("soft CE on T[y] (fused)", lambda: F.cross_entropy(logits, smooth.index_select(0, labels)),
                            "F.cross_entropy(label_smoothing=0.1)",
                            lambda: F.cross_entropy(logits, labels, label_smoothing=0.1)),
        "soft CE": ("F.cross_entropy(logits, probs)", lambda: F.cross_entropy(logits, probs),
                    "-(probs * log_softmax).sum(1).mean()", lambda: -(probs * logits.log_softmax(1)).sum(1).mean()),
        "optimiser groups": ("one parameter group", one_group, "two parameter groups", two_groups),
    }


_OPT_CACHE: dict = {}


def _opt_step(device: torch.device, groups: int):
    """One SGD step of LeNet plus a 10 x 9 C-matrix, with the C in the model's group or its own."""
    key = (device, groups)
    if key not in _OPT_CACHE:
        torch.manual_seed(0)
        net = create_model("lenet", 10, 1, 28).to(device)
        c = torch.zeros(10, 9, device=device, requires_grad=True)
        params = [p for p in net.parameters()]
        for p in params + [c]:
            p.grad = torch.randn_like(p)
        if groups == 1:
            opt = torch.optim.SGD([{"params": params + [c], "weight_decay": 5e-4}], lr=0.1, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.SGD([{"params": params, "weight_decay": 5e-4}, {"params": [c], "weight_decay": 0.0}],
                                  lr=0.1, momentum=0.9, nesterov=True)
        _OPT_CACHE[key] = opt
    _OPT_CACHE[key].step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    print("| choice | ours | us (median) | alternative | us (median) | alternative / ours |\n|---|---|---|---|---|---|")
    for name, (na, fa, nb, fb) in pairs(dev).items():
        ma, mb = _time_pair(fa, fb, a.repeats, dev)
        print(f"| {name} | `{na}` | {ma:.1f} | `{nb}` | {mb:.1f} | {mb / ma:.2f} |")
    print(f"\n{a.repeats} interleaved repeats; device {dev}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
