"""A whole training run timed end to end, eager and with a compiled (or CUDA-graph) step, one CSV.

Each run is a fresh `kd train-teacher` process (imports, data loading, compilation, every epoch
and its evaluation included), one after the other on the same machine:

    python -m benchmarks.e2e --dataset fashion-mnist --epochs 15 --device cuda --modes none,reduce-overhead \\
        --out benchmarks/results/e2e_lenet_GPU.csv
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from kd.errors import KDError
from kd.runs import check_new_file


def run_e2e(dataset: str, epochs: int, device: str, modes: list[str], data_root: str | None = None,
            backend: str = "inductor", extra: list[str] = ()) -> pd.DataFrame:
    """One row per compile mode: wall seconds of the whole process, the run's own training seconds, test accuracy."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "kd", "train-teacher", "--dataset", dataset, "--method", "onehot",
                   "--model", "lenet", "--epochs", str(epochs), "--lr", "0.1", "--weight-decay", "1e-4",
                   "--device", device, "--compile-mode", mode, "--compile-backend", backend, "--quiet",
                   "--out", str(out), *(["--data-root", data_root] if data_root else []), *extra]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise KDError(f"{' '.join(cmd)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            s = json.loads((out / "summary.json").read_text())
            rows.append({"dataset": dataset, "model": "lenet", "epochs": epochs, "compile_mode": mode, "wall_s": wall,
                         "train_seconds": s["train_seconds"], "test_acc": s["test_acc"], "machine": s["machine"]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="none,reduce-overhead", help="comma-separated --compile-mode values")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--batch-size", default=None)
    p.add_argument("--out", default=None, metavar="FILE.csv")
    a = p.parse_args(argv)
    try:
        out = check_new_file(a.out) if a.out else None
        df = run_e2e(a.dataset, a.epochs, a.device, a.modes.split(","), a.data_root, a.compile_backend,
                     ["--batch-size", a.batch_size] if a.batch_size else [])
    except KDError as e:
        print(f"e2e: error: {e}", file=sys.stderr)
        return 2
    print(df.to_string(index=False))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
