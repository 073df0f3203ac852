"""A sweep's results: the tidy CSV, the validation CSV and their markdown tables."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from kd import cmatrix, runs
from kd.calibration import read_calibration
from kd.metrics import row_entropy_bits
from kd.app.sweep.plan import Plan, Task, selection_frame
from kd.app.sweep.spec import ARTIFACTS, run_dir, selection, selects


def collect(spec, plan: Plan | None = None) -> pd.DataFrame:
    """One tidy row per finished (run, seed) that belongs in the table."""
    plan = plan or Plan(spec)
    sel = selection_frame(spec, spec["runs"], ledger_of=plan)
    rows = []
    for run in spec["runs"]:
        if run["verb"] in ARTIFACTS or run.get("table", True) is False:
            continue
        how = ("validation" if selects(spec, run) else f"as {run['lr_from']}" if "lr_from" in run else "fixed")
        src = plan.rate_source(run["name"])
        where = plan.grid(src)[1] if selects(spec, plan.runs[src]) else ""
        for seed in run.get("seeds", spec["seeds"]):
            p = run_dir(spec, run["name"], seed) / runs.SUMMARY
            if not p.is_file():
                # committed earlier, its directory gone or holding an interrupted run: the committed row stands
                row = plan.committed(Task(run["name"], "final", seed, p.parent))
                if row is not None:
                    rows.append({**{k: v for k, v in row.items() if k != "_kind"}, "grid": where})
                continue
            s = json.loads(p.read_text())
            cfg = yaml.safe_load((p.parent / runs.CONFIG).read_text()) or {}
            c_path = p.parent / runs.C_MATRIX
            entropy = float(row_entropy_bits(cmatrix.load_c_matrix(c_path)[0]).mean()) if c_path.is_file() else float("nan")
            cal = read_calibration(p.parent) or {}
            source = run.get("lr_from", run["name"])
            val = sel[(sel["name"] == source) & (sel["lr"] == cfg.get("lr"))] if not sel.empty else sel
            rows.append({"name": run["name"], "verb": run["verb"], "method": s.get("method"),
                         "teacher": s.get("teacher"), "model": s["model"], "preprocess": s.get("preprocess", "matched"),
                         "seed": seed, "lr": cfg.get("lr"), "lr_chosen_by": how, "grid": where,
                         "val_acc_at_lr": float(val["val_acc"].mean()) if len(val) else float("nan"),
                         "test_acc": s["test_acc"], "test_nll": s["test_nll"], "test_ece": s["test_ece"],
                         "test_aece": s.get("test_aece", float("nan")),
                         **({k: cal.get(k, float("nan")) for k in ("temperature", "test_nll_ts", "test_ece_ts", "test_aece_ts")}
                            if spec["calibrate"] or cal else {}),
                         "c_row_entropy_bits": entropy,
                         "c_row_max": s.get("c_row_max", float("nan")), "train_acc": s.get("train_acc", float("nan")),
                         "optimizer": cfg.get("optimizer"), "c_lr_scale": cfg.get("c_lr_scale", 1.0),
                         "epochs": s["epochs"],
                         "train_seconds": s["train_seconds"], "seconds_per_epoch": s["seconds_per_epoch"],
                         "timed_alone": bool(run.get("exclusive", False)), "machine": s.get("machine", "")})
    return pd.DataFrame(rows)


def summary_table(df) -> str:
    """mean +- std over seeds (accuracy and ECE in percent, as the paper reports them); the learning
    rate, adaptive ECE, temperature-scaled (TS) NLL and ECEs, C row entropy and training time columns
    appear when the results have them
    (training time only for runs trained alone on the machine, ``exclusive: true``)."""
    has_lr = "lr" in df.columns
    has_aece = "test_aece" in df.columns and df["test_aece"].notna().any()
    has_ts = "test_ece_ts" in df.columns and df["test_ece_ts"].notna().any()
    has_c = "c_row_entropy_bits" in df.columns and df["c_row_entropy_bits"].notna().any()
    has_max = "c_row_max" in df.columns and df["c_row_max"].notna().any()
    has_time = "timed_alone" in df.columns and df["timed_alone"].any()
    head = ["run", "model"] + (["lr"] if has_lr else []) + ["seeds", "test acc (%)", "NLL", "ECE (%)"] + \
        (["adaptive ECE (%)"] if has_aece else []) + \
        (["T", "NLL after TS", "ECE after TS (%)", "adaptive ECE after TS (%)"] if has_ts else []) + \
        (["C row entropy (bits)"] if has_c else []) + \
        (["C row max"] if has_max else []) + \
        (["training time (s)"] if has_time else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in df.groupby("name", sort=False):
        def ms(col, scale=1.0, fmt=".2f"):
            std = g[col].std(ddof=1) if len(g) > 1 else float("nan")
            return f"{g[col].mean() * scale:{fmt}} ± {std * scale:{fmt}}"
        cells = [name, g["model"].iloc[0]] + ([", ".join(f"{v:g}" for v in sorted(g["lr"].unique()))] if has_lr else []) + \
            [str(len(g)), ms("test_acc", 100), ms("test_nll", 1, ".3f"), ms("test_ece", 100)] + \
            ([ms("test_aece", 100)] if has_aece else []) + \
            ([ms("temperature", 1, ".3f"), ms("test_nll_ts", 1, ".3f"), ms("test_ece_ts", 100), ms("test_aece_ts", 100)]
             if has_ts and g["test_ece_ts"].notna().all() else ["", "", "", ""] if has_ts else []) + \
            ([ms("c_row_entropy_bits") if g["c_row_entropy_bits"].notna().all() else ""] if has_c else []) + \
            ([ms("c_row_max", 1, ".3f") if g["c_row_max"].notna().all() else ""] if has_max else []) + \
            ([ms("train_seconds", 1, ".0f") if g["timed_alone"].all() else ""] if has_time else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(sel: pd.DataFrame) -> str:
    """Validation accuracy (%) per run and grid value (mean over selection seeds); the chosen rate in bold,
    rates the edge rule added in italics, a rate whose run stopped non-finite as "stopped"; the last
    column says where the chosen rate lies in its grid."""
    if sel.empty:
        return ""
    grid = sorted(sel["lr"].unique())
    has_grid = "grid" in sel.columns
    lines = ["| run | " + " | ".join(f"lr {v:g}" for v in grid) + (" | chosen rate |" if has_grid else " |"),
             "|---|" + "---|" * (len(grid) + has_grid)]
    for name, g in sel.groupby("name", sort=False):
        means = g.groupby("lr")["val_acc"].mean()
        chosen = set(g.loc[g["chosen"], "lr"]) if "chosen" in g else set()
        added = set(g.loc[g["extended"].astype(bool), "lr"]) if "extended" in g else set()

        def cell(v):
            if v not in means:
                return ""
            text = "stopped" if pd.isna(means[v]) else f"{means[v] * 100:.2f}"
            text = f"*{text}*" if v in added else text
            return f"**{text}**" if v in chosen else text
        where = {"interior": "inside the grid", "cap": "at an edge, cap reached", "edge": "at an edge",
                 "pending": "runs to come"}.get(str(g["grid"].iloc[0]), "") if has_grid else None
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in grid) + (f" | {where} |" if has_grid else " |"))
    return "\n".join(lines)


def write_results(spec, df, sel: pd.DataFrame, seconds: float, path) -> None:
    prefix = Path(spec["results"])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(prefix.with_suffix(".csv"), index=False)
    text = (f"Sweep `{path}` (`kd sweep {path}`); std over seeds with ddof=1; final-epoch test metrics.\n"
            f"This invocation took {seconds:.0f}s (finished runs are skipped on a rerun; "
            f"the per-run train_seconds are in the CSV).\n\n" + (summary_table(df) if not df.empty else "(no finished runs)") + "\n")
    if not sel.empty:
        s = selection(spec)
        sel.to_csv(prefix.with_name(prefix.name + "_selection.csv"), index=False)
        text += (f"\nValidation accuracy (%) by learning rate, each run trained on the training set minus a stratified "
                 f"{s['val_fraction']:g} share (split seed {s['val_seed']}; run seeds {', '.join(map(str, s['seeds']))}) "
                 f"and evaluated on that share; the chosen rate in bold (ties: the smaller); rates added by the edge rule "
                 f"(up to {s['extend']} a side) in italics:\n\n"
                 + selection_table(sel) + "\n")
    prefix.with_suffix(".md").write_text(text)
