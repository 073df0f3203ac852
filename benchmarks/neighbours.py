"""What the C-matrix learned: each class's two strongest non-target classes in an LS++ run's C,
next to the two classes a 1-hot network most often confuses it with on the test set
(:func:`kd.metrics.c_beside_network`: errors made at least twice, then the highest mean softmax).

    python -m benchmarks.neighbours LSPP_RUN ONEHOT_RUN [--out FILE.md]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kd import cmatrix
from kd.data import load_dataset_of_run
from kd.engine import predict
from kd.errors import KDError
from kd.metrics import c_beside_network
from kd.runs import check_new_file
from kd.tables import markdown_table
from teachers.network import load_teacher_network


def neighbour_table(lspp_run: str | Path, onehot_run: str | Path) -> tuple[str, int, int]:
    c, meta = cmatrix.load_c_matrix(lspp_run)
    names = meta["class_names"]
    model, s = load_teacher_network(onehot_run)
    split = load_dataset_of_run(s)
    logits, labels = predict(model, split.test, split.info)
    k = len(c)
    rows = c_beside_network(c, logits, labels, 2)
    table = [{"cls": names[i], "c": ", ".join(f"{names[j]} ({w:.2f})" for j, w in r["c"]),
              "net": ", ".join(names[j] for j, _, _ in r["net"]), "shared": f"{r['shared']}/2"}
             for i, r in enumerate(rows)]
    shared_total, exact = sum(r["shared"] for r in rows), sum(r["shared"] == 2 for r in rows)
    text = markdown_table(table, [("cls", "class", ""), ("c", "LS++ C: strongest non-targets (weight)", ""),
                                  ("net", "1-hot test confusions", ""), ("shared", "shared", "")])
    return (text + f"\n\n{shared_total} of {2 * k} neighbour slots agree; {exact} of {k} classes have the same two.",
            shared_total, exact)


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
