"""The results committed beside a sweep file (the CSVs of every sweep sharing its ``runs_dir``): rows that stand
for run directories a fresh clone does not have."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kd.errors import KDError
from kd.app.sweep.spec import load_sweep, run_dir, selection_dir


def ledger(spec, sweeps_dir: Path | None) -> dict[Path, dict[str, Any]]:
    """Runs recorded in the committed results of the sweep files in ``sweeps_dir`` that share this
    sweep's ``runs_dir``: run directory -> its CSV row (``_kind`` final) or validation row (select)."""
    out: dict[Path, dict[str, Any]] = {}
    if sweeps_dir is None:
        return out
    for f in sorted(Path(sweeps_dir).glob("*.yaml")):
        try:
            other = load_sweep(f)
        except (KDError, OSError, yaml.YAMLError):
            continue  # not a sweep file, or one this version cannot read: nothing recorded
        if other["runs_dir"] != spec["runs_dir"]:
            continue
        prefix = Path(other["results"])
        for path, kind in ((prefix.with_suffix(".csv"), "final"),
                           (prefix.with_name(prefix.name + "_selection.csv"), "select")):
            if not path.is_file():
                continue
            for r in pd.read_csv(path).to_dict("records"):
                if kind == "final":
                    out[run_dir(other, r["name"], int(r["seed"]))] = {**r, "_kind": kind}
                else:
                    out[selection_dir(other, r["name"], float(r["lr"]), int(r["seed"]))] = {**r, "_kind": kind}
    return out


def same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b
