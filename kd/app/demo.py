"""`kd demo`: the main job on scikit-learn's digits, small enough for two CPU cores.

An LS++ teacher, then LeNet students from 1-hot, LS, the teacher network run online, and the
teacher's C-matrix (PT-LS++), printed as one table; then what the C-matrix learned, each
class's strongest non-target classes next to the teacher network's own behaviour on the test
set; then what a student step costs with online KD, the proxy and 1-hot labels.

The teacher recipe is chosen so that C visibly learns in a short run. C's gradient is small
(per class row about 1/2 x the class's share of the batch x the network's non-target mass,
~alpha once it trains, x the gap between the network's non-target distribution and C), and it
fades as the network fits the very targets C sets, so C learns in the first few epochs or not
at all. With SGD at the network's learning rate C moves by a few hundredths and stays flat;
weight decay on C is not what holds it (its pull is ~1/70 of the gradient). AdamW steps each
parameter by about lr whatever its gradient's scale, without warm-up the early epochs (where the
signal is) run at full rate, and batches of 32 give 4x the steps. A LeNet teacher learns a
clearer C than a ResNet18 with the same recipe and keeps the whole job well under a minute.
"""
from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import torch

from kd import cmatrix, runs
from kd.app.jobs import distill_job, train_teacher_job
from kd.config import TrainConfig
from kd.data import load_dataset
from kd.engine import predict, resolve_device
from kd.metrics import MIN_ERRORS, c_beside_network
from kd.tables import markdown_table

TEACHER_MODEL = "lenet"
STUDENT_MODEL = "lenet"
DATASET = "digits"
#: The teacher's recipe (TrainConfig fields): AdamW so that C's small gradient still moves it.
TEACHER_RECIPE = {"optimizer": "adamw", "lr": 0.02, "batch_size": 32, "warmup_epochs": 0.0}

RESULT_COLS = [("run", "run", "s"), ("acc", "test acc", ".4f"), ("nll", "NLL", ".4f"), ("ece", "ECE", ".4f"),
               ("s_epoch", "s/epoch", ".3f")]

C_COLS = [("cls", "class", "s"), ("c", "C: strongest non-targets (weight)", "s"),
          ("net", "teacher on the test set: confused with", "s"), ("agree", "C agrees", "s")]


def _row(name: str, summary: dict) -> dict:
    return {"run": name, "acc": summary["test_acc"], "nll": summary["test_nll"], "ece": summary["test_ece"],
            "s_epoch": summary["seconds_per_epoch"]}


def c_neighbour_rows(c: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                     names: list[str]) -> tuple[list[dict], int, int]:
    """Per class: C's two strongest non-targets, and the class the teacher network takes it for most
    (:func:`kd.metrics.c_beside_network`: its most frequent error on the test set when made at least
    MIN_ERRORS times, otherwise its runner-up). Returns the rows, how many classes have C's strongest
    non-target equal to that class, and how many have it among C's two strongest."""
    rows, first, top2 = [], 0, 0
    for i, r in enumerate(c_beside_network(c, logits, labels, 2)):
        j, n_err, p = r["net"][0]
        near = [n for n, _ in r["c"]]
        how = f"{names[j]} ({n_err} errors)" if n_err >= MIN_ERRORS else f"{names[j]} (runner-up, mean p {p:.3f})"
        first += r["first"]
        top2 += j in near
        rows.append({"cls": names[i], "c": ", ".join(f"{names[n]} ({w:.3f})" for n, w in r["c"]), "net": how,
                     "agree": "yes" if r["first"] else ("2nd" if j in near else "no")})
    return rows, first, top2


def print_c_table(teacher_dir: Path, teacher_model: torch.nn.Module, device: str) -> None:
    """What the LS++ C-matrix learned, beside what the teacher network does on unseen data."""
    c, meta = cmatrix.load_c_matrix(teacher_dir)
    names = meta["class_names"]
    split = load_dataset(DATASET)
    logits, labels = predict(teacher_model, split.test, split.info, device=resolve_device(device))
    rows, first, top2 = c_neighbour_rows(c, logits.cpu(), labels.cpu(), names)
    k = len(c)
    print(f"\nWhat the LS++ C-matrix learned: each class's two strongest non-target classes in C "
          f"(uniform would be {1 / (k - 1):.3f}),\nnext to the class the teacher network confuses it with "
          f"on the test set (its most frequent error if made at least {MIN_ERRORS} times, else its runner-up)")
    print(markdown_table(rows, C_COLS))
    print(f"C's strongest non-target is the teacher's confusion for {first} of {k} classes, one of its two "
          f"strongest for {top2} of {k} (by chance: {k / (k - 1):.1f} and {2 * k / (k - 1):.1f} of {k})")


def print_cost_table(device: str = "auto", steps: int = 3, repeats: int = 5) -> None:
    """What one student step costs with each teacher kind, measured side by side (see `kd bench`)."""
    from benchmarks.cost import markdown, run_bench  # the benchmarks load where they run

    dev = resolve_device(device)
    print(f"\nCost of one student training step on {dev} (`kd bench --preset digits` for the full table)")
    df = run_bench("digits", dev, steps=steps, repeats=repeats, sources=("onehot", "proxy", "network"), log=None)
    print(markdown(df))


def report_hint(run_dirs: list[Path], kept: bool) -> str:
    """The `kd report` command for the demo's runs (C-matrix, class-wise outputs, t-SNE, reliability, curves)."""
    what = "\nfigures of these runs (C-matrix, class-wise outputs, t-SNE, reliability, learning curves): "
    if not kept:
        return (what + "run `kd demo --out DIR` to keep the runs, then `kd report "
                + " ".join(f"DIR/{d.name}" for d in run_dirs) + " --out REPORT_DIR`")
    return what + "kd report " + " ".join(shlex.quote(str(d)) for d in run_dirs) + " --out REPORT_DIR"


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
        run_dirs = [teacher_dir]
        recipe = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in TEACHER_RECIPE.items())
        print(f"training an LS++ {TEACHER_MODEL} teacher on {DATASET} ({teacher_epochs} epochs, {recipe}) ...")
        t = train_teacher_job(TrainConfig(method="lspp", dataset=DATASET, model=TEACHER_MODEL, epochs=teacher_epochs,
                                          device=device, **TEACHER_RECIPE),
                              teacher_dir, progress=False, log=None)
        rows.append(_row(f"teacher {TEACHER_MODEL} (LS++)", t.summary))
        for spec in ("onehot", "ls", f"network:{teacher_dir}", f"proxy:{teacher_dir}"):
            kind = spec.partition(":")[0]
            print(f"distilling a {STUDENT_MODEL} student from {kind} ({student_epochs} epochs) ...")
            cfg = TrainConfig(teacher=spec, dataset=DATASET, model=STUDENT_MODEL, epochs=student_epochs, device=device)
            s = distill_job(cfg, base / f"student-{kind}", progress=False, log=None)
            label = {"network": "LS++ network (online KD)", "proxy": "PT-LS++ (C-matrix)"}.get(kind, kind)
            rows.append(_row(f"student {STUDENT_MODEL} <- {label}", s.summary))
            run_dirs.append(base / f"student-{kind}")
        print()
        print(markdown_table(rows, RESULT_COLS))
        print_c_table(teacher_dir, t.model, device)
        print_cost_table(device)
        if out is not None:
            print(f"\nrun directories: {base}")
        print(report_hint(run_dirs, kept=out is not None))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows
