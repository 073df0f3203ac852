"""`kd report RUN_DIR [RUN_DIR ...] --out DIR`: the paper's figures (3-6) and more, as PNG + CSV + index.md.

Inputs are finished run directories (from `kd train-teacher`, `kd distill` or `kd sweep`) or
C-matrix files (``c_matrix.safetensors`` from an LS++ run or `kd proxy export`); ``--bench``
adds `kd bench` CSV files. ``--out`` must be a new (or empty) directory. Every figure gets a
CSV of the numbers it shows (a matrix as a K x K table, class names as header row and first
column), and ``index.md`` shows each figure with one line saying what it is and which run made it.
``figures.csv`` lists every PNG with its pixel size and caption. Figures that compare runs put
them side by side on one colour scale.

Figures:

1. ``c_matrix.png`` (paper Fig. 3): the C-matrix of every LS++ run (learned) and every C file,
   values in the cells; for K > 20 a table of each class's strongest neighbours in index.md
   (``c_neighbours_*.csv``) instead of a heatmap.
2. ``class_probs.png`` (paper Fig. 4): per run, the mean softmax over the un-augmented training
   set for each true class (row: true class, column: predicted class), on a log colour scale so
   that both a near-one-hot diagonal and the structure of the small entries are visible.
3. ``features.png`` (paper Fig. 5): per run, a t-SNE (scikit-learn, seeded) of the penultimate
   features of a fixed seeded subset of the test set (``--tsne-points``, default 2000),
   coloured by class; below it the L1-normalised cosine distance among the class centres of
   those features: D_ij = 1 - cos(m_i, m_j), divided by sum_ij D_ij (so the matrix sums to 1,
   stays symmetric and has a zero diagonal).
4. ``reliability.png``: per run, accuracy against confidence in 15 equal-width bins (the bins of
   :func:`kd.metrics.expected_calibration_error`), with ECE-15 (that function), adaptive ECE
   (15 equal-mass bins, :func:`kd.metrics.adaptive_ece`) and the NLL printed on it; test set.
5. ``curves.png``: from each run's metrics.csv, train loss, each named loss term, test accuracy
   and test ECE per epoch, runs overlaid.
6. ``cost_<name>.png`` per ``--bench`` CSV: median step time per source (log scale, min-max
   whiskers) with the ratio to 1-hot written on each bar.
7. ``ablation_c_matrices.png`` (paper Fig. 6): where the runs include the LS++ loss variants
   (``lspp-ce``, ``lspp-sce``), their C-matrices beside LS++'s, each row's entropy (bits) printed.

Cost: figures 1, 5, 6 and 7 read files only. Figures 2-4 need the network run once over the
training set (class-mean softmax) and once over the test set (logits, penultimate features of
the subset); these outputs and the t-SNE embedding are cached as safetensors files under
``--cache`` (default ``DIR/cache``), one file per run, named by a hash of the run's weights,
the data set and the subset size. ``--out`` is always new; to reuse the model outputs of an
earlier report, point ``--cache`` at its cache folder (``--cache OLD_DIR/cache``): present
files are read, missing ones added, none is ever overwritten.

Penultimate features, per model kind:

* timm models (``timm:NAME`` or a bare timm name): ``forward_head(forward_features(x),
  pre_logits=True)``, the model's own feature method; the logits are ``forward_head`` of the
  same features, so the network runs once.
* every other model (``lenet``, ``mlp``, ``resnet18`` ... ``resnet101``, ``shufflenetv2``,
  ``densenet121``, ``torchvision:NAME``): a forward pre-hook on the last ``nn.Linear`` module,
  i.e. the input of the classifier layer: LeNet's 84-d ``classifier[-1]`` input, the MLP's
  last hidden layer (``net[-1]``), the global-pooled ``fc`` input of the ResNets and
  ShuffleNetV2, the pooled ``classifier`` input of DenseNet121, and the input of the last
  linear layer of a torchvision model (``fc``, ``classifier[-1]`` or ``heads.head``). A model
  without a linear layer gets no feature figure (a one-line error says so).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from kd import cmatrix, runs
from kd.calibration import read_calibration, scaled
from kd.config import TrainConfig
from kd.data import load_dataset_of_run, make_loader
from kd.engine import predict, resolve_device
from kd.errors import KDError
from kd.metrics import c_neighbours, centre_distances, classification_metrics, reliability_bins, row_entropy_bits
from kd.tables import frame_table
from teachers.network import load_teacher_network
from teachers.proxy import class_mean_probabilities

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


# ---------------------------------------------------------------------------------------
# Running the network once (cached)


def penultimate(model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x -> (logits, penultimate features); see the module docstring for how each model provides them."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):  # timm
        def run(x):
            f = model.forward_features(x)
            return model.forward_head(f), model.forward_head(f, pre_logits=True).flatten(1)
        return run
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise KDError(f"{type(model).__name__} has no nn.Linear classifier layer to take penultimate features "
                      "from; the feature figure (t-SNE, class-centre distances) cannot be made for it")
    grabbed: list[torch.Tensor] = []
    linears[-1].register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))

    def run(x):
        grabbed.clear()
        logits = model(x)
        return logits, grabbed[-1].flatten(1)
    return run


def _weights_hash(run_dir: Path) -> str:
    h = hashlib.sha256()
    with open(run_dir / runs.WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@torch.inference_mode()
def compute_outputs(src: Source, data_root: str | None, device: str, points: int) -> dict[str, torch.Tensor]:
    """One pass over the training set (class-mean softmax) and one over the test set (logits, and the
    penultimate features of a seeded subset of ``points`` samples), un-augmented, eval mode."""
    model, meta = load_teacher_network(src.path)
    split = load_dataset_of_run(meta, data_root, src.path)  # a text run: encoded with its own tokenizer.json
    dev = resolve_device(device)
    model = model.to(dev).eval()
    forward = penultimate(model)
    cfg = TrainConfig(batch_size=512, augment=False, num_workers=0)
    k = int(meta["num_classes"])
    train_logits, train_labels = predict(model, split.train, split.info, device=dev)
    train_labels = train_labels.cpu().long()
    class_probs = class_mean_probabilities(train_logits.float().softmax(1).cpu(), train_labels, k, empty_rows=True)
    n_test = len(split.test)
    subset = torch.sort(torch.randperm(n_test, generator=torch.Generator().manual_seed(SUBSET_SEED))[:points]).values
    keep = torch.zeros(n_test, dtype=torch.bool)
    keep[subset] = True
    logits, labels, feats, feat_idx = [], [], [], []
    for x, y, idx in make_loader(split.test, split.info, cfg, train=False, device=dev):
        out, f = forward(x.to(dev))
        logits.append(out.float().cpu())
        labels.append(y.cpu().long())
        sel = keep[idx.cpu()]
        feats.append(f[sel.to(f.device)].float().cpu())
        feat_idx.append(idx.cpu()[sel])
    test_labels = torch.cat(labels)
    feat_idx_t = torch.cat(feat_idx).long()
    return {"train_class_probs": class_probs, "train_class_counts": torch.bincount(train_labels, minlength=k),
            "test_logits": torch.cat(logits), "test_labels": test_labels,
            "features": torch.cat(feats), "feature_index": feat_idx_t, "feature_labels": test_labels[feat_idx_t]}


def tsne(features: torch.Tensor) -> torch.Tensor:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    with threadpool_limits(1):  # BLAS / OpenMP threads slow scikit-learn's t-SNE down several-fold on shared cores
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=SUBSET_SEED,
                   n_jobs=1).fit_transform(features.double().numpy())
    return torch.from_numpy(np.ascontiguousarray(emb)).float()


def cached_outputs(src: Source, cache_dir: Path, data_root: str | None, device: str, points: int,
                   log: Callable[[str], None] | None = print) -> tuple[dict[str, torch.Tensor], bool]:
    """The run's outputs from ``cache_dir`` when there, else computed and added (never overwritten).
    Returns (tensors, True when they came from the cache)."""
    key = f"{_weights_hash(src.path)[:20]}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(src.summary['dataset']))}-n{points}"
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise KDError(f"cache file {path} is unreadable ({e}); delete it or give another --cache") from None
        if meta.get("format") != CACHE_FORMAT or "tsne" not in tensors:
            raise KDError(f"{path} is not a kd report cache file; delete it or give another --cache")
        return tensors, True
    if log:
        log(f"running {src.label} over {src.summary['dataset']} (train and test sets) ...")
    tensors = compute_outputs(src, data_root, device, points)
    if log:
        log(f"t-SNE of {len(tensors['features'])} test features of {src.label} ...")
    tensors["tsne"] = tsne(tensors["features"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    runs.save_safetensors(path, {k: v.contiguous() for k, v in tensors.items()},
                          {"format": CACHE_FORMAT, "run": str(src.path), "dataset": str(src.summary["dataset"]),
                           "points": str(points), "subset_seed": str(SUBSET_SEED)})
    return tensors, False


# ---------------------------------------------------------------------------------------
# Drawing


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
                         "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 11})
    return plt


def _short(v: float) -> str:
    """A cell value in at most four characters: .93, .05, 3e-3, 0."""
    if v <= 0:
        return "0"
    if v >= 0.995:
        return "1"
    if v >= 0.01:
        return f"{v:.2f}".lstrip("0")
    return f"{v:.0e}".replace("e-0", "e-")


def _panel_inches(k: int) -> float:
    return min(9.0, max(3.6, 1.6 + 0.32 * k))


def _heatmap(ax, m: np.ndarray, names: list[str], norm, cmap: str, xlabel: str, ylabel: str,
             fmt: Callable[[float], str] = _short, row_notes: list[str] | None = None):
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


def _save(fig, path: Path, manifest: list[dict], caption: str, what: str) -> None:
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


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def heatmap_figure(mats: list[np.ndarray], titles: list[str], names: list[str], path: Path, *, log_scale: bool,
                   cbar_label: str, xlabel: str, ylabel: str, suptitle: str, vmin: float | None = None,
                   vmax: float | None = None,
                   fmt: Callable[[float], str] = _short, row_notes: list[list[str]] | None = None,
                   cmap: str = "viridis"):
    """Matrices side by side on one colour scale (one colour bar)."""
    from matplotlib.colors import LogNorm, Normalize

    plt = _plt()
    k = len(names)
    rows, cols = _grid(len(mats), 3 if row_notes else 4)
    side = _panel_inches(k)
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
        im = _heatmap(ax, mats[i], names, norm, cmap, xlabel, ylabel, fmt, row_notes[i] if row_notes else None)
        ax.set_title(titles[i])
    fig.colorbar(im, ax=axes, shrink=0.8, label=cbar_label)
    fig.suptitle(suptitle)
    return fig


def class_colours(k: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo")
    return [cmap(i if k <= 20 else i / max(1, k - 1)) for i in range(k)]


# ---------------------------------------------------------------------------------------
# The report


class Report:
    def __init__(self, out: Path, log: Callable[[str], None] | None):
        self.out = out
        self.log = log
        self.manifest: list[dict] = []
        self.sections: list[str] = []

    def csv(self, name: str, df: pd.DataFrame, index: bool = False) -> str:
        df.to_csv(self.out / name, index=index, float_format="%.10g")
        return name

    def section(self, title: str, png: str | None, line: str, csvs: list[str], extra: str = "") -> None:
        text = [f"## {title}", ""]
        if png:
            text += [f"![{title}]({png})", ""]
        text += [line, ""]
        if extra:
            text += [extra, ""]
        if csvs:
            text += ["Numbers: " + ", ".join(f"[{c}]({c})" for c in csvs), ""]
        self.sections.append("\n".join(text))


def _runs_line(srcs: list[Source]) -> str:
    return "; ".join(f"{s.label} = {s.description}" for s in srcs)


def fig_c_matrix(rep: Report, srcs: list[Source]) -> None:
    names = srcs[0].class_names
    k = len(names)
    csvs = [rep.csv(f"c_matrix_{_slug(s.label)}.csv", matrix_frame(s.c, s.class_names), index=True) for s in srcs]
    alphas = [s.c_meta.get("alpha") for s in srcs]
    what = f"C-matrix (paper Fig. 3), from {_runs_line(srcs)}"
    tables, ncsv = [], []
    if k > MAX_K_CELLS or any(len(s.c) != k for s in srcs):  # too many cells to print C's values in: tables
        for s in srcs:
            df = top_neighbours(s.c, s.class_names)
            ncsv.append(rep.csv(f"c_neighbours_{_slug(s.label)}.csv", df))
            tables.append(f"**{s.label}**: each class's {TOP_K} strongest non-target classes in C (weight)\n\n"
                          + frame_table(df))
    if k > MAX_K_HEATMAP or any(len(s.c) != k for s in srcs):
        rep.section("1. C-matrix: strongest neighbours per class", None,
                    f"K = {k} is too many classes for a readable heatmap; the tables list, per class, the "
                    f"classes C gives most of the smoothing mass. {what}.", csvs + ncsv, "\n\n".join(tables))
        return
    titles = [f"{s.label}\n{s.method}" + (f", alpha {a:g}" if a else "") for s, a in zip(srcs, alphas)]
    fig = heatmap_figure([s.c.double().numpy() for s in srcs], titles, names, rep.out / "c_matrix.png",
                         log_scale=False, cbar_label="C[true, other]: share of the smoothing mass",
                         xlabel="other class", ylabel="true class",
                         suptitle="C-matrix: where each class's smoothing mass goes (uniform = "
                                  f"{1 / (k - 1):.3f})", cmap="magma")
    _save(fig, rep.out / "c_matrix.png", rep.manifest, "C-matrix heatmap", what)
    rep.section("1. C-matrix", "c_matrix.png",
                f"{what}. Row i: how class i's smoothing mass alpha is spread over the other classes."
                + (" The values are in the tables below and the CSV files." if tables else ""), csvs + ncsv,
                "\n\n".join(tables))


def fig_class_probs(rep: Report, srcs: list[Source], outs: dict[str, dict]) -> None:
    names = srcs[0].class_names
    mats = [outs[s.label]["train_class_probs"].double().numpy() for s in srcs]
    csvs = [rep.csv(f"class_probs_{_slug(s.label)}.csv", matrix_frame(m, s.class_names), index=True)
            for s, m in zip(srcs, mats)]
    titles = [f"{s.label}\n{s.method}, mean p(true class) {_true_class_prob(outs[s.label]):.2f}" for s in srcs]
    fig = heatmap_figure(mats, titles, names, rep.out / "class_probs.png", log_scale=True, vmin=1e-4, vmax=1.0,
                         cbar_label="mean softmax probability (log scale)", xlabel="predicted class",
                         ylabel="true class", suptitle="Class-wise mean output probabilities on the training set "
                                                       "(un-augmented)")
    what = f"class-wise mean softmax on the training set (paper Fig. 4), from {_runs_line(srcs)}"
    _save(fig, rep.out / "class_probs.png", rep.manifest, "class-wise output probabilities", what)
    rep.section("2. Class-wise output probabilities", "class_probs.png",
                f"{what[0].upper() + what[1:]}. Row i: the mean softmax over the training images of class i; a "
                "flat off-diagonal erases class relations, a structured one keeps them.", csvs)


def _true_class_prob(o: dict) -> float:
    p, c = o["train_class_probs"].double(), o["train_class_counts"].double()
    return float((p.diagonal() * c).sum() / c.sum())  # mean softmax of the true class over the training set


def fig_features(rep: Report, srcs: list[Source], outs: dict[str, dict]) -> None:
    plt = _plt()
    from matplotlib.colors import Normalize

    names = srcs[0].class_names
    k = len(names)
    n = len(srcs)
    side = max(3.6, min(6.0, 1.6 + 0.3 * k))
    fig, axes = plt.subplots(2, n, figsize=(n * side + 1.6, 2 * side + 0.6), layout="constrained", squeeze=False)
    colours = class_colours(k)
    dists, csvs = [], []
    for s in srcs:
        o = outs[s.label]
        d = centre_distances(o["features"], o["feature_labels"], k)
        dists.append(d.numpy() * 100)  # drawn x100; the CSV holds the matrix itself
        emb = o["tsne"].numpy()
        df = pd.DataFrame({"test_index": o["feature_index"].numpy(), "label": o["feature_labels"].numpy(),
                           "class": [names[i] for i in o["feature_labels"].tolist()],
                           "tsne_x": emb[:, 0], "tsne_y": emb[:, 1]})
        csvs += [rep.csv(f"tsne_{_slug(s.label)}.csv", df),
                 rep.csv(f"centre_distance_{_slug(s.label)}.csv", matrix_frame(d, names), index=True)]
    norm = Normalize(vmin=0.0, vmax=max(float(d.max()) for d in dists) or 1.0)
    im = None
    for col, s in enumerate(srcs):
        o = outs[s.label]
        emb, lab = o["tsne"].numpy(), o["feature_labels"].numpy()
        ax = axes[0, col]
        for c in range(k):
            sel = lab == c
            ax.scatter(emb[sel, 0], emb[sel, 1], s=3, color=colours[c], label=names[c], linewidths=0, rasterized=True)
        ax.set_title(f"{s.label}: t-SNE of {len(lab)} test points\n{s.method}, {o['features'].shape[1]}-d penultimate")
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        im = _heatmap(axes[1, col], dists[col], names, norm, "viridis", "class", "class",
                      fmt=lambda v: f"{v:.1f}" if v > 0 else "0")
        axes[1, col].set_title(f"{s.label}: class-centre distance (x100)")
    if k <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colours[c], markersize=5) for c in range(k)]
        fig.legend(handles, names, loc="outside right upper", title="class", markerscale=1.2)
    fig.colorbar(im, ax=axes[1, :], shrink=0.8, label="L1-normalised cosine distance (x100)")
    fig.suptitle("Penultimate-layer features of the test subset: t-SNE (top), class-centre distances (bottom)")
    what = (f"t-SNE of penultimate features of a seeded test subset and the L1-normalised cosine distance "
            f"among class centres (paper Fig. 5), from {_runs_line(srcs)}")
    _save(fig, rep.out / "features.png", rep.manifest, "feature geometry", what)
    rep.section("3. Feature geometry", "features.png",
                f"{what[0].upper() + what[1:]}. Equal distances everywhere mean the class relations are gone; "
                "cell values are x100 (the matrix sums to 100).", csvs)


def _reliability_panel(ax, logits: torch.Tensor, labels: torch.Tensor, title: str, legend: bool) -> tuple[dict, pd.DataFrame]:
    """One reliability diagram on ``ax``; its numbers (acc, ECE-15, adaptive ECE-15, NLL) and bins."""
    logits, labels = logits.float(), labels.long()
    bins = reliability_bins(logits.softmax(1), labels, N_BINS)
    c = classification_metrics(logits, labels, N_BINS)
    m = {"acc": c["acc"], "ece_15": c["ece"], "adaptive_ece_15": c["aece"], "nll": c["nll"]}
    width = 1.0 / N_BINS
    centres = (bins["bin_lo"] + bins["bin_hi"]).to_numpy() / 2
    accs = bins["accuracy"].fillna(0).to_numpy()
    confs = bins["mean_confidence"].fillna(0).to_numpy()
    has = bins["count"].to_numpy() > 0
    ax.bar(centres[has], accs[has], width=width, color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
    ax.bar(centres[has], (confs - accs)[has], bottom=accs[has], width=width, facecolor="none", hatch="////",
           edgecolor="tab:red", lw=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.text(0.03, 0.97, f"ECE-15 {m['ece_15']:.2%}\nadaptive ECE-15 {m['adaptive_ece_15']:.2%}\nNLL {m['nll']:.3f}\n"
            f"acc {m['acc']:.2%}", transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"})
    if legend:
        ax.legend(loc="lower right", fontsize=7)
    return m, bins


def fig_reliability(rep: Report, srcs: list[Source], outs: dict[str, dict]) -> None:
    """Reliability of each run's test outputs; for runs with a calibration.json (`kd calibrate`), a second
    row of diagrams after temperature scaling, with the temperature(s) the file holds."""
    plt = _plt()
    calib = {s.label: c for s in srcs if (c := read_calibration(s.path)) is not None}
    panels = [(s, False) for s in srcs] + [(s, True) for s in srcs if s.label in calib]
    n = len(panels)
    rows, cols = (2, len(srcs)) if calib and len(srcs) <= 4 else _grid(n, 4)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.9 + 0.2, rows * 4.4 + 0.2), layout="constrained", squeeze=False)
    flat = list(axes.flat)
    if calib and len(srcs) <= 4:  # raw in the first row, scaled below its own run
        order = {s.label: j for j, s in enumerate(srcs)}
        where = [order[s.label] + (cols if after else 0) for s, after in panels]
    else:
        where = list(range(n))
    summary_rows, csvs = [], []
    for (s, after), i in zip(panels, where):
        o = outs[s.label]
        logits, labels = o["test_logits"], o["test_labels"].long()
        if after:
            c = calib[s.label]
            logits = scaled(logits, labels, c)
            ts = ", ".join(f"{t:.3f}" for t in c["temperatures"])
            title = f"{s.label}: after temperature scaling\n(T {ts}, fitted on {c['fitted_on']})"
        else:
            title = f"{s.label} ({s.method}), test set"
        m, bins = _reliability_panel(flat[i], logits, labels, title, legend=i == 0)
        bins.insert(0, "run", s.label)
        bins.insert(1, "scaled", after)
        csvs.append(rep.csv(f"reliability_{_slug(s.label)}{'_ts' if after else ''}.csv", bins))
        summary_rows.append({"run": s.label, "path": str(s.path), "temperature_scaled": after,
                             "temperatures": ", ".join(f"{t:.4f}" for t in calib[s.label]["temperatures"]) if after else "",
                             "n_test": len(labels), **m, "summary_test_ece": s.summary.get("test_ece")})
    for j, ax in enumerate(flat):
        if j not in where:
            ax.axis("off")
    fig.suptitle("Reliability diagrams, 15 equal-width confidence bins" +
                 (" (below: after temperature scaling)" if calib and len(srcs) <= 4 else ""))
    csvs.insert(0, rep.csv("calibration.csv", pd.DataFrame(summary_rows)))
    what = (f"reliability diagram with ECE-15 (equal-width bins), adaptive ECE-15 (equal-mass bins) and NLL, test set, "
            f"from {_runs_line(srcs)}" + (f"; for {', '.join(calib)} also after temperature scaling with the "
                                          f"temperature `kd calibrate` wrote (calibration.json)" if calib else ""))
    _save(fig, rep.out / "reliability.png", rep.manifest, "reliability diagram", what)
    rep.section("4. Reliability", "reliability.png", what[0].upper() + what[1:] + ".", csvs)


def fig_curves(rep: Report, srcs: list[Source]) -> None:
    plt = _plt()
    frames = {}
    for s in srcs:
        p = s.path / runs.METRICS
        if not p.is_file():
            continue
        try:
            frames[s.label] = pd.read_csv(p)
        except (pd.errors.ParserError, pd.errors.EmptyDataError):
            raise KDError(f"{p} is not a readable CSV; the run may have been interrupted") from None
    if not frames:
        return
    terms = sorted({c for df in frames.values() for c in df.columns if c.startswith("loss_")})
    panels = [("train_loss", "train loss (sum of terms)")] + [(t, f"train loss term {t[5:]}") for t in terms] \
        + [("test_acc", "test accuracy"), ("test_ece", "test ECE-15")]
    rows, cols = _grid(len(panels), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 2.9 + 0.4), layout="constrained", squeeze=False)
    colours = _plt().get_cmap("tab10")
    tidy = []
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.axis("off")
            continue
        col, title = panels[i]
        for r, (label, df) in enumerate(frames.items()):
            if col in df.columns:
                ax.plot(df["epoch"], df[col], marker="o", ms=2.5, lw=1.2, color=colours(r % 10), label=label)
                tidy += [{"run": label, "epoch": int(e), "metric": col, "value": float(v)}
                         for e, v in zip(df["epoch"], df[col])]
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel({"test_acc": "accuracy", "test_ece": "ECE"}.get(col, "loss"))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colours(r % 10), marker="o", ms=3) for r in range(len(frames))]
    fig.legend(handles, list(frames), loc="outside lower center", ncols=min(len(frames), 6))
    fig.suptitle("Learning curves from metrics.csv")
    srcs_used = [s for s in srcs if s.label in frames]
    what = f"learning curves (train loss, each loss term, test accuracy and ECE per epoch), from {_runs_line(srcs_used)}"
    _save(fig, rep.out / "curves.png", rep.manifest, "learning curves", what)
    rep.section("5. Learning curves", "curves.png", what[0].upper() + what[1:] + ".",
                [rep.csv("curves.csv", pd.DataFrame(tidy))])


def fig_cost(rep: Report, bench_path: Path, df: pd.DataFrame) -> None:
    plt = _plt()
    df = df.copy()
    base = float(df.loc[df["source"] == "onehot", "step_ms_median"].iloc[0])
    df["ratio_to_onehot"] = df["step_ms_median"] / base
    n = len(df)
    fig, ax = plt.subplots(figsize=(6.4, 1.1 + 0.36 * n), layout="constrained")
    y = np.arange(n)
    med = df["step_ms_median"].to_numpy()
    err = None
    if {"step_ms_min", "step_ms_max"} <= set(df.columns):
        err = np.vstack([med - df["step_ms_min"].to_numpy(), df["step_ms_max"].to_numpy() - med])
    colours = ["tab:gray" if s in ("bare", "onehot") else "tab:blue" for s in df["source"]]
    ax.barh(y, med, xerr=err, color=colours, ecolor="0.4", capsize=2, error_kw={"lw": 0.8})
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if float(df.get("step_ms_max", df["step_ms_median"]).max()) / float(df.get("step_ms_min", df["step_ms_median"]).min()) < 100:
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    ax.set_yticks(y, df["source"])
    ax.invert_yaxis()
    ax.set_xlabel("training step time, ms (median; whiskers: min-max; log scale)")
    hi = float(df.get("step_ms_max", df["step_ms_median"]).max())
    ax.set_xlim(right=hi * 2.0)
    for yi, m, r in zip(y, med, df["ratio_to_onehot"]):
        ax.text(m * 1.08 if err is None else max(m * 1.08, float(err[1][yi] + m) * 1.05), yi, f"\u00d7{r:.2f}",
                va="center", fontsize=8)
    first = df.iloc[0]
    bits = [str(first[c]) for c in ("preset", "device") if c in df.columns]
    if "batch_size" in df.columns:
        bits.append(f"batch {first['batch_size']}")
    ax.set_title("Cost of one training step per target source (\u00d7: ratio to 1-hot)\n" + ", ".join(bits))
    stem = _slug(bench_path.stem)
    name = stem if stem.startswith("cost") else f"cost_{stem}"
    what = f"step time per source on a log scale with the ratio to 1-hot, from `{bench_path}`"
    _save(fig, rep.out / f"{name}.png", rep.manifest, "cost chart", what)
    cols = [c for c in ("source", "step_ms_median", "step_ms_min", "step_ms_max", "ratio_to_onehot") if c in df.columns]
    rep.section(f"6. Cost: {bench_path.name}", f"{name}.png", what[0].upper() + what[1:] + ".",
                [rep.csv(f"{name}.csv", df[cols])])


def fig_ablation(rep: Report, srcs: list[Source]) -> None:
    order = {m: i for i, m in enumerate(ABLATION)}
    srcs = sorted(srcs, key=lambda s: order[s.method])
    names = srcs[0].class_names
    ent = [row_entropy_bits(s.c) for s in srcs]
    k = len(names)
    titles = [f"{s.label}\n{ABLATION[s.method]}\nmean row entropy {float(e.mean()):.2f} bits" for s, e in zip(srcs, ent)]
    notes = [[f"H {v:.2f}" for v in e.tolist()] for e in ent]
    fig = heatmap_figure([s.c.double().numpy() for s in srcs], titles, names, rep.out / "ablation_c_matrices.png",
                         log_scale=False, cbar_label="C[true, other]", xlabel="other class", ylabel="true class",
                         suptitle=f"LS++ loss ablation: learned C-matrices; H = row entropy in bits "
                                  f"(uniform over the other classes: {math.log2(k - 1):.2f})",
                         row_notes=notes if k <= MAX_K_TICKS else None, cmap="magma")
    entropy = pd.DataFrame({"class": names, **{s.label: e.numpy() for s, e in zip(srcs, ent)}})
    csvs = [rep.csv("ablation_row_entropy_bits.csv", entropy)]
    csvs += [rep.csv(f"ablation_c_matrix_{_slug(s.label)}.csv", matrix_frame(s.c, names), index=True) for s in srcs]
    what = f"C-matrices learned with the LS++ loss and its ablation variants (paper Fig. 6), row entropies in bits, from {_runs_line(srcs)}"
    _save(fig, rep.out / "ablation_c_matrices.png", rep.manifest, "ablation C-matrices", what)
    rep.section("7. LS++ loss ablation", "ablation_c_matrices.png",
                what[0].upper() + what[1:] + ". Low entropy rows: C collapsed toward one class.", csvs)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_") or "run"


def make_report(inputs: list[str | Path], out: str | Path, bench: list[str | Path] = (), cache: str | Path | None = None,
                device: str = "auto", data_root: str | None = None, tsne_points: int = TSNE_POINTS,
                log: Callable[[str], None] | None = print) -> Path:
    """Write the report into the new directory ``out``; returns the path of its index.md."""
    if not inputs and not bench:
        raise KDError("give at least one run directory, C-matrix file or --bench CSV")
    if tsne_points < 10:
        raise KDError(f"--tsne-points must be at least 10, got {tsne_points}")
    out = runs.check_new_run_dir(out)
    srcs = [read_source(p) for p in inputs]  # every input is checked before anything is written
    benches = [(Path(b), read_bench(b)) for b in bench]
    for s, label in zip(srcs, run_labels([s.path for s in srcs]) if srcs else []):
        s.label = label
    model_runs = [s for s in srcs if s.kind == "run"]
    datasets = sorted({f"{s.summary['dataset']} ({s.summary.get('preprocess', 'matched')} preprocessing)" for s in model_runs})
    if len(datasets) > 1:
        raise KDError(f"the runs were trained on different data sets ({', '.join(datasets)}); make one report per data set")
    k_values = sorted({len(s.class_names) for s in srcs})
    if len(k_values) > 1:
        raise KDError(f"the inputs have different numbers of classes ({k_values}); make one report per data set")
    # Built in a folder beside ``out`` and moved into place when complete: a report that fails part-way
    # (a truncated model file) leaves nothing in ``out``, so the same command can be run again.
    final = out
    out = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        _write_report(out, final, srcs, benches, cache, device, data_root, tsne_points, log)
        if final.exists():
            final.rmdir()  # empty, as check_new_run_dir found it (at most a stale .lock: not ours to keep)
        os.replace(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final / "index.md"


def _write_report(out: Path, final: Path, srcs, benches, cache, device, data_root, tsne_points, log) -> None:
    """Every figure, CSV and the index into ``out`` (the report's final place is ``final``)."""
    cache_dir = Path(cache) if cache is not None else out / "cache"
    shown_cache = Path(cache) if cache is not None else final / "cache"
    rep = Report(out, log)
    model_runs = [s for s in srcs if s.kind == "run"]

    ablation = [s for s in srcs if s.kind == "run" and s.c is not None and s.method in ABLATION]
    has_variant = any(s.method in ("lspp-ce", "lspp-sce") for s in ablation)
    c_srcs = [s for s in srcs if s.c is not None and not (has_variant and s in ablation)]
    if c_srcs:
        fig_c_matrix(rep, c_srcs)
    outs, reused = {}, []
    for s in model_runs:
        outs[s.label], hit = cached_outputs(s, cache_dir, data_root, device, tsne_points, log)
        if hit:
            reused.append(s.label)
    if model_runs:
        fig_class_probs(rep, model_runs, outs)
        fig_features(rep, model_runs, outs)
        fig_reliability(rep, model_runs, outs)
        fig_curves(rep, model_runs)
    for path, df in benches:
        fig_cost(rep, path, df)
    if has_variant:
        fig_ablation(rep, ablation)

    pd.DataFrame(rep.manifest, columns=["file", "width_px", "height_px", "caption", "what"]).to_csv(
        out / "figures.csv", index=False)
    lines = ["# proxykd report", "",
             "Made by `kd report` (see `kd report --help`); every figure's numbers are in the CSV files named "
             "under it, figure sizes in [figures.csv](figures.csv).", "", "| run | path | kind | method | model | "
             "data set | test acc | NLL | ECE |", "|---|---|---|---|---|---|---|---|---|"]
    for s in srcs:
        sm = s.summary
        fmt = (lambda key, spec: format(sm[key], spec) if isinstance(sm.get(key), (int, float)) else "")
        lines.append(f"| {s.label} | `{s.path}` | {sm.get('kind', 'C file')} | {s.method} | {sm.get('model', '')} | "
                     f"{sm.get('dataset', s.c_meta.get('dataset', ''))} | {fmt('test_acc', '.4f')} | "
                     f"{fmt('test_nll', '.4f')} | {fmt('test_ece', '.4f')} |")
    if model_runs:
        lines += ["", f"Model outputs (training-set class means, test logits, features of {tsne_points} seeded test "
                  f"points, t-SNE) are cached in `{shown_cache}`" + (f"; reused for {', '.join(reused)}." if reused else ".")]
    (out / "index.md").write_text("\n".join(lines) + "\n\n" + "\n".join(rep.sections))
