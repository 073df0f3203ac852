"""`kd demo`: the main job on scikit-learn's digits, small enough for two CPU cores.

An LS++ teacher (a small-input ResNet18), then LeNet students from 1-hot, LS, the teacher
network run online, and the teacher's C-matrix (PT-LS++), printed as one table, followed by
what a student step costs with online KD, the proxy and 1-hot labels.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.cost import markdown, run_bench
from kd import runs
from kd.app.jobs import distill_job, train_teacher_job
from kd.config import TrainConfig

TEACHER_MODEL = "resnet18"
STUDENT_MODEL = "lenet"


def markdown_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table; cols are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[k], f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


RESULT_COLS = [("run", "run", "s"), ("acc", "test acc", ".4f"), ("nll", "NLL", ".4f"), ("ece", "ECE", ".4f"),
               ("s_epoch", "s/epoch", ".3f")]


def _row(name: str, summary: dict) -> dict:
    return {"run": name, "acc": summary["test_acc"], "nll": summary["test_nll"], "ece": summary["test_ece"],
            "s_epoch": summary["seconds_per_epoch"]}


def print_cost_table(device: str = "auto", steps: int = 3, repeats: int = 5) -> None:
    """What one student step costs with each teacher kind, measured side by side (see `kd bench`)."""
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    print(f"\nCost of one student training step on {dev} (`kd bench --preset digits` for the full table)")
    df = run_bench("digits", dev, steps=steps, repeats=repeats, sources=("onehot", "proxy", "network"), log=None)
    print(markdown(df))


def run_demo(out: str | None = None, teacher_epochs: int = 15, student_epochs: int = 30, device: str = "auto") -> list[dict]:
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="kd-demo-")
        base = Path(tmp.name)
    else:
        base = runs.prepare_run_dir(out)
    rows = []
    try:
        teacher_dir = base / "teacher-lspp"
        print(f"training an LS++ {TEACHER_MODEL} teacher on digits ({teacher_epochs} epochs) ...")
        t = train_teacher_job(TrainConfig(method="lspp", model=TEACHER_MODEL, epochs=teacher_epochs, device=device),
                              teacher_dir, progress=False, log=None)
        rows.append(_row(f"teacher {TEACHER_MODEL} (LS++)", t.summary))
        for spec in ("onehot", "ls", f"network:{teacher_dir}", f"proxy:{teacher_dir}"):
            kind = spec.partition(":")[0]
            print(f"distilling a {STUDENT_MODEL} student from {kind} ({student_epochs} epochs) ...")
            cfg = TrainConfig(teacher=spec, model=STUDENT_MODEL, epochs=student_epochs, device=device)
            s = distill_job(cfg, base / f"student-{kind}", progress=False, log=None)
            label = {"network": "LS++ network (online KD)", "proxy": "PT-LS++ (C-matrix)"}.get(kind, kind)
            rows.append(_row(f"student {STUDENT_MODEL} <- {label}", s.summary))
        print()
        print(markdown_table(rows, RESULT_COLS))
        c, meta = runs.load_c_matrix(teacher_dir)
        names = meta["class_names"]
        print(f"\nWhat the LS++ C-matrix learned: each class's strongest non-target class "
              f"(uniform would be {1 / (len(c) - 1):.3f}; C moves slowly over a short run)")
        print(markdown_table([{"cls": names[i], "nb": names[int(c[i].argmax())], "w": float(c[i].max())}
                              for i in range(len(c))],
                             [("cls", "class", "s"), ("nb", "closest class", "s"), ("w", "C weight", ".3f")]))
        print_cost_table(device)
        if out is not None:
            print(f"\nrun directories: {base}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows
