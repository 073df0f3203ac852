"""What the C-matrix learned: each class's two strongest non-target classes in an LS++ run's C,
next to the two classes a 1-hot network most often confuses it with on the test set.

    python -m benchmarks.neighbours LSPP_RUN ONEHOT_RUN [--out FILE.md]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from kd import runs
from kd.data import load_dataset_of_run
from kd.engine import predict
from kd.errors import KDError
from kd.metrics import c_neighbours, top_confusions
from kd.runs import check_new_file
from teachers.network import load_teacher_network


def neighbour_table(lspp_run: str | Path, onehot_run: str | Path) -> tuple[str, int, int]:
    c, meta = runs.load_c_matrix(lspp_run)
    names = meta["class_names"]
    model, s = load_teacher_network(onehot_run)
    split = load_dataset_of_run(s)
    logits, labels = predict(model, split.test, split.info)
    k = len(c)
    conf = top_confusions(logits.argmax(1), labels, k)
    neigh = c_neighbours(c)
    lines = ["| class | LS++ C: strongest non-targets (weight) | 1-hot test confusions | shared |", "|---|---|---|---|"]
    shared_total = exact = 0
    for i in range(k):
        shared = len(set(neigh[i]) & set(conf[i]))
        shared_total += shared
        exact += shared == 2
        cn = ", ".join(f"{names[j]} ({float(c[i, j]):.2f})" for j in neigh[i])
        lines.append(f"| {names[i]} | {cn} | {', '.join(names[j] for j in conf[i])} | {shared}/2 |")
    lines.append("")
    lines.append(f"{shared_total} of {2 * k} neighbour slots agree; {exact} of {k} classes have the same two.")
    return "\n".join(lines), shared_total, exact


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.neighbours", description=__doc__.splitlines()[0])
    p.add_argument("lspp_run")
    p.add_argument("onehot_run")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        out = check_new_file(a.out) if a.out else None
        text, _, _ = neighbour_table(a.lspp_run, a.onehot_run)
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if out:
        command = shlex.join(["python", "-m", "benchmarks.neighbours", a.lspp_run, a.onehot_run])
        out.write_text(f"`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
