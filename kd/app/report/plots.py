"""Plot helpers of `kd report`: matplotlib without a display, heatmaps on one colour scale, saving a figure with
its caption in the manifest."""
from __future__ import annotations

import re
import math
from pathlib import Path
from typing import Callable

import numpy as np

from kd.app.report.inputs import DPI, MAX_K_CELLS, MAX_K_TICKS


# ---------------------------------------------------------------------------------------
# Drawing


def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                         "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 11})
    return plt


def short_number(v: float) -> str:
    """A cell value in at most four characters: .93, .05, 3e-3, 0."""
    if v <= 0:
        return "0"
    if v >= 0.995:
        return "1"
    if v >= 0.01:
        return f"{v:.2f}".lstrip("0")
    return f"{v:.0e}".replace("e-0", "e-")


def panel_inches(k: int) -> float:
    return min(9.0, max(3.6, 1.6 + 0.32 * k))


def heatmap(ax, m: np.ndarray, names: list[str], norm, cmap: str, xlabel: str, ylabel: str,
             fmt: Callable[[float], str] = short_number, row_notes: list[str] | None = None):
    k = len(m)
    im = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    if k <= MAX_K_TICKS:
        ax.set_xticks(range(k), names, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), names)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if k <= MAX_K_CELLS:
        size = 7 if k <= 12 else 5
        for i in range(k):
            for j in range(k):
                r, g, b, _ = im.cmap(im.norm(max(m[i, j], norm.vmin if norm.vmin else 0)))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, fmt(float(m[i, j])), ha="center", va="center", fontsize=size,
                        color="white" if dark else "black")
    if row_notes is not None:
        for i, note in enumerate(row_notes):
            ax.text(k - 0.3, i, note, ha="left", va="center", fontsize=7, transform=ax.transData, clip_on=False)
    return im


def save_figure(fig, path: Path, manifest: list[dict], caption: str, what: str) -> None:
    """Save as a 256-colour palette PNG: plots have few colours, and the file is several times smaller."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            path, optimize=True)
    w, h = fig.get_size_inches() * DPI
    manifest.append({"file": path.name, "width_px": int(round(w)), "height_px": int(round(h)),
                     "caption": caption, "what": what})
    import matplotlib.pyplot as plt

    plt.close(fig)


def grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def heatmap_figure(mats: list[np.ndarray], titles: list[str], names: list[str], path: Path, *, log_scale: bool,
                   cbar_label: str, xlabel: str, ylabel: str, suptitle: str, vmin: float | None = None,
                   vmax: float | None = None,
                   fmt: Callable[[float], str] = short_number, row_notes: list[list[str]] | None = None,
                   cmap: str = "viridis"):
    """Matrices side by side on one colour scale (one colour bar)."""
    from matplotlib.colors import LogNorm, Normalize

    plt = plt_module()
    k = len(names)
    rows, cols = grid_shape(len(mats), 3 if row_notes else 4)
    side = panel_inches(k)
    extra = 0.7 if row_notes else 0.0
    title_lines = max(t.count("\n") + 1 for t in titles)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (side + extra) + 1.0, rows * (side + 0.2 * title_lines) + 0.5),
                             layout="constrained", squeeze=False)
    hi = vmax if vmax is not None else max(float(np.nanmax(m)) for m in mats)
    if log_scale:
        lo = vmin if vmin is not None else 1e-4
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
        mats = [np.clip(m, lo, None) for m in mats]
    else:
        norm = Normalize(vmin=0.0 if vmin is None else vmin, vmax=hi if hi > 0 else 1.0)
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= len(mats):
            ax.axis("off")
            continue
        im = heatmap(ax, mats[i], names, norm, cmap, xlabel, ylabel, fmt, row_notes[i] if row_notes else None)
        ax.set_title(titles[i])
    fig.colorbar(im, ax=axes, shrink=0.8, label=cbar_label)
    fig.suptitle(suptitle)
    return fig


def class_colours(k: int):
    plt = plt_module()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo")
    return [cmap(i if k <= 20 else i / max(1, k - 1)) for i in range(k)]


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_") or "run"
