"""`kd report`'s inputs: run directories and C-matrix files read into :class:`Source`, `kd bench` CSVs, and
the tables they give directly (C's strongest neighbours)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kd import cmatrix, runs
from kd.errors import KDError
from kd.metrics import c_neighbours

N_BINS = 15
DPI = 100
TSNE_POINTS = 2000
SUBSET_SEED = 0
TOP_K = 5
MAX_K_CELLS = 20        # values printed in heatmap cells up to this many classes
MAX_K_TICKS = 40        # class names on the axes up to this many classes
MAX_K_HEATMAP = 64      # C is drawn as a heatmap up to this many classes (above, as tables of each row's strongest)
ABLATION = {"lspp-ce": "cross-entropy (lspp-ce)", "lspp-sce": "SCE, original (lspp-sce)",
            "lspp": "SCE, ours (lspp = LS++)"}
CACHE_FORMAT = "proxykd-report-cache-v1"




# ---------------------------------------------------------------------------------------
# Inputs


@dataclass
class Source:
    """One input: a run directory or a C-matrix file."""

    path: Path
    kind: str                        # "run" or "c_file"
    label: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    c: torch.Tensor | None = None    # K x K C-matrix, when the input has one
    c_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.summary.get("teacher_kind") or self.c_meta.get("source", "C file"))

    @property
    def class_names(self) -> list[str]:
        names = self.summary.get("class_names") or self.c_meta.get("class_names")
        k = len(self.c) if self.c is not None else int(self.summary.get("num_classes", 0))
        return list(names) if names and len(names) == k else [str(i) for i in range(k)]

    @property
    def description(self) -> str:
        if self.kind == "c_file":
            return f"C-matrix file `{self.path}`"
        s = self.summary
        return f"{s.get('kind', 'run')} run `{self.path}` ({self.method}, {s.get('model')}, {s.get('dataset')})"


def read_source(path: str | Path) -> Source:
    """A finished run directory or a C-matrix safetensors file; anything else is a one-line KDError."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise KDError(f"{p} is neither a run directory nor a .safetensors C-matrix file; give a finished run "
                          "directory (kd train-teacher / kd distill) or a c_matrix.safetensors file")
        c, meta = cmatrix.load_c_matrix(p)
        return Source(p, "c_file", c=c, c_meta=meta)
    if not p.is_dir():
        raise KDError(f"{p} does not exist; give a finished run directory or a c_matrix.safetensors file")
    summary = runs.read_summary(p)
    for key in ("model", "num_classes", "dataset"):
        if key not in summary:
            raise KDError(f"{p}/{runs.SUMMARY} lacks '{key}'; it was not written by kd train-teacher or kd distill")
    if not (p / runs.WEIGHTS).is_file():
        raise KDError(f"{p} has no {runs.WEIGHTS}; the run did not finish, train it again into a new --out")
    src = Source(p, "run", summary=summary)
    if (p / runs.C_MATRIX).is_file():
        src.c, src.c_meta = cmatrix.load_c_matrix(p)
    return src


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the fewest trailing path parts that tell the inputs apart, without a
    trailing part they all share (``runs/x/LS/seed0`` and ``runs/x/LS++/seed0`` -> ``LS``, ``LS++``)."""
    parts = [Path(p).resolve().with_suffix("").parts if Path(p).is_file() else Path(p).resolve().parts for p in paths]
    longest = max(len(q) for q in parts)
    for n in range(1, longest + 1):
        labels = ["/".join(q[-n:]) for q in parts]
        if len(set(labels)) == len(labels):
            break
    if len(paths) > 1 and n > 1 and len({q[-1] for q in parts}) == 1:
        labels = ["/".join(q[-n:-1]) for q in parts]
    return labels


def read_bench(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise KDError(f"--bench {p} does not exist; give a CSV written by `kd bench --out FILE.csv`")
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise KDError(f"--bench {p} is not a readable CSV ({str(e).splitlines()[0]})") from None
    need = {"source", "step_ms_median"}
    if not need <= set(df.columns) or "onehot" not in set(df["source"]):
        raise KDError(f"--bench {p} needs columns source and step_ms_median and a row for onehot "
                      "(a CSV written by `kd bench --out FILE.csv`)")
    return df


# ---------------------------------------------------------------------------------------
# Numbers (each figure's CSV holds exactly these)


def top_neighbours(c: torch.Tensor, names: list[str], k: int = TOP_K) -> pd.DataFrame:
    """Each class's k strongest C neighbours and their weights, one row per class."""
    rows = []
    for i, (name, neigh) in enumerate(zip(names, c_neighbours(c, min(k, len(c) - 1)))):
        row = {"class": name}
        for r, j in enumerate(neigh, 1):
            row[f"neighbour_{r}"], row[f"weight_{r}"] = names[j], round(float(c[i, j]), 4)
        rows.append(row)
    return pd.DataFrame(rows)


def matrix_frame(m: torch.Tensor | np.ndarray, names: list[str]) -> pd.DataFrame:
    arr = m.detach().cpu().double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)
    return pd.DataFrame(arr, index=pd.Index(names, name="class"), columns=names)
