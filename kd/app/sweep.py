"""`kd sweep FILE.yaml`: a grid of runs x seeds from one YAML file, resumable, summarised as CSV + markdown.

The file holds ``runs_dir`` (where run directories go), ``results`` (path prefix of the tidy
CSV and the markdown table), ``seeds``, ``base`` (config keys shared by every run) and
``runs``: a list of entries with a ``name``, a ``verb`` (``train-teacher``, ``distill`` or
``proxy-export``), optional ``seeds`` overriding the global ones, ``table: false`` to leave
it out of the table, and config keys. ``{runs_dir}`` in a value is replaced, so a student
can name a teacher run: ``teacher: network:{runs_dir}/teacher-lspp/seed0``.

Each run lives in ``RUNS_DIR/NAME/seedS``; a run whose ``summary.json`` exists is skipped, so
an interrupted sweep resumes where it stopped; a run killed between epochs continues from its
checkpoint. A run directory left with neither a summary nor a checkpoint is moved aside to
``seedS.interrupted-TIME``, never deleted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from kd import runs
from kd.app.jobs import distill_job, export_proxy_job, train_teacher_job
from kd.config import TrainConfig, load_yaml_config
from kd.errors import KDError

VERBS = ("train-teacher", "distill", "proxy-export")


def load_sweep(path: str | Path) -> dict[str, Any]:
    spec = load_yaml_config(path)
    for key in ("runs_dir", "results", "runs"):
        if key not in spec:
            raise KDError(f"{path}: missing key '{key}' (a sweep needs runs_dir, results, seeds, base and runs)")
    spec.setdefault("seeds", [0])
    spec.setdefault("base", {})
    names = set()
    for i, run in enumerate(spec["runs"]):
        if not isinstance(run, dict) or "name" not in run or run.get("verb") not in VERBS:
            raise KDError(f"{path}: runs[{i}] needs a name and a verb in {', '.join(VERBS)}")
        if run["name"] in names:
            raise KDError(f"{path}: run name '{run['name']}' appears twice")
        names.add(run["name"])
        if run["verb"] != "proxy-export":  # check config keys now, not halfway through the sweep
            TrainConfig.from_dict({**spec["base"], **_config_keys(run, spec["runs_dir"])}, where=f"{path}: {run['name']}")
    return spec


def _config_keys(run: dict[str, Any], runs_dir: str) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k not in ("name", "verb", "seeds", "table", "run", "from")}
    return {k: v.replace("{runs_dir}", runs_dir) if isinstance(v, str) else v for k, v in out.items()}


def _run_dir(spec, name: str, seed: int) -> Path:
    return Path(spec["runs_dir"]) / name / f"seed{seed}"


def run_sweep(path: str | Path, log=print) -> pd.DataFrame:
    spec = load_sweep(path)
    log = log or (lambda *_: None)
    started = time.perf_counter()
    for run in spec["runs"]:
        for seed in run.get("seeds", spec["seeds"]):
            out = _run_dir(spec, run["name"], seed)
            if run["verb"] == "proxy-export":
                target = out / "c_matrix.safetensors"
                if target.exists():
                    continue
                src = Path(spec["runs_dir"]) / run["run"] / f"seed{seed}"
                out.mkdir(parents=True, exist_ok=True)
                log(f"[sweep] {run['name']} seed {seed}: proxy export of {src}")
                export_proxy_job(src, target, run.get("from", "auto"))
                continue
            if (out / "summary.json").is_file():
                continue
            resume = (out / runs.CHECKPOINT).is_file()
            if out.exists() and not resume:
                aside = out.with_name(f"{out.name}.interrupted-{time.strftime('%Y%m%dT%H%M%S')}")
                out.rename(aside)
                log(f"[sweep] {out} had no summary and no checkpoint (interrupted); moved to {aside}")
            cfg = TrainConfig.from_dict({**spec["base"], **_config_keys(run, spec["runs_dir"]), "seed": seed})
            log(f"[sweep] {run['name']} seed {seed} {'resumed' if resume else ''}...")
            job = train_teacher_job if run["verb"] == "train-teacher" else distill_job
            t0 = time.perf_counter()
            r = job(cfg, out, progress=False, log=None, resume=resume)
            log(f"[sweep] {run['name']} seed {seed}: acc {r.summary['test_acc']:.4f} ({time.perf_counter() - t0:.0f}s)")
    df = collect(spec)
    write_results(spec, df, time.perf_counter() - started, path)
    return df


def collect(spec) -> pd.DataFrame:
    """One tidy row per finished (run, seed) that belongs in the table."""
    rows = []
    for run in spec["runs"]:
        if run["verb"] == "proxy-export" or run.get("table", True) is False:
            continue
        for seed in run.get("seeds", spec["seeds"]):
            p = _run_dir(spec, run["name"], seed) / "summary.json"
            if not p.is_file():
                continue
            s = json.loads(p.read_text())
            rows.append({"name": run["name"], "verb": run["verb"], "method": s.get("method"),
                         "teacher": s.get("teacher"), "model": s["model"], "seed": seed,
                         "test_acc": s["test_acc"], "test_nll": s["test_nll"], "test_ece": s["test_ece"],
                         "epochs": s["epochs"], "train_seconds": s["train_seconds"]})
    return pd.DataFrame(rows)


def summary_table(df) -> str:
    """mean +- std over seeds (accuracy and ECE in percent, as the paper reports them)."""
    lines = ["| run | model | seeds | test acc (%) | NLL | ECE (%) |", "|---|---|---|---|---|---|"]
    for name, g in df.groupby("name", sort=False):
        def ms(col, scale=1.0, fmt=".2f"):
            std = g[col].std(ddof=1) if len(g) > 1 else float("nan")
            return f"{g[col].mean() * scale:{fmt}} ± {std * scale:{fmt}}"
        lines.append(f"| {name} | {g['model'].iloc[0]} | {len(g)} | {ms('test_acc', 100)} | {ms('test_nll', 1, '.3f')} | "
                     f"{ms('test_ece', 100)} |")
    return "\n".join(lines)


def write_results(spec, df, seconds: float, path) -> None:
    prefix = Path(spec["results"])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(prefix.with_suffix(".csv"), index=False)
    text = (f"Sweep `{path}` (`kd sweep {path}`); std over seeds with ddof=1; final-epoch test metrics.\n"
            f"This invocation took {seconds:.0f}s (finished runs are skipped on a rerun; "
            f"the per-run train_seconds are in the CSV).\n\n" + summary_table(df) + "\n")
    prefix.with_suffix(".md").write_text(text)
