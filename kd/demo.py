"""`kd demo`: the main job on scikit-learn's digits, small enough for two CPU cores."""
from __future__ import annotations

import tempfile
from pathlib import Path

from kd.config import TrainConfig


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table; cols are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[k], f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def run_demo(out: str | None = None, epochs: int = 30, device: str = "auto") -> list[dict]:
    from kd import runs
    from kd.jobs import train_teacher_job

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="kd-demo-")
        base = Path(tmp.name)
    else:
        base = runs.prepare_run_dir(out)
    rows = []
    try:
        for method in ("onehot", "lspp"):
            cfg = TrainConfig(method=method, dataset="digits", epochs=epochs, device=device)
            print(f"training a {method} teacher on digits ({epochs} epochs) ...")
            r = train_teacher_job(cfg, base / f"teacher-{method}", progress=False, log=None)
            s = r.summary
            rows.append({"run": f"teacher {method}", "acc": s["test_acc"], "nll": s["test_nll"], "ece": s["test_ece"],
                         "s_epoch": s["seconds_per_epoch"]})
        print()
        print(_table(rows, [("run", "run", "s"), ("acc", "test acc", ".4f"), ("nll", "NLL", ".4f"),
                            ("ece", "ECE", ".4f"), ("s_epoch", "s/epoch", ".3f")]))
        c, meta = runs.load_c_matrix(base / "teacher-lspp")
        names = meta["class_names"]
        print("\nWhat the LS++ C-matrix learned: each class's strongest non-target class")
        print(_table([{"cls": names[i], "nb": names[int(c[i].argmax())], "w": float(c[i].max())} for i in range(len(c))],
                     [("cls", "class", "s"), ("nb", "closest class", "s"), ("w", "C weight", ".3f")]))
        if out is not None:
            print(f"\nrun directories: {base}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows
