"""The figures of `kd report`, one function each, writing a PNG and the CSV of what it shows into a :class:`Report`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from kd import runs
from kd.calibration import read_calibration, scaled
from kd.errors import KDError
from kd.metrics import centre_distances, classification_metrics, reliability_bins, row_entropy_bits
from kd.tables import frame_table
from kd.app.report.inputs import (ABLATION, MAX_K_CELLS, MAX_K_HEATMAP, MAX_K_TICKS, N_BINS, TOP_K, Source,
                                  matrix_frame, top_neighbours)
from kd.app.report.plots import (class_colours, grid_shape, heatmap, heatmap_figure, plt_module, save_figure,
                                 slug)


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


def runs_line(srcs: list[Source]) -> str:
    return "; ".join(f"{s.label} = {s.description}" for s in srcs)


def fig_c_matrix(rep: Report, srcs: list[Source]) -> None:
    names = srcs[0].class_names
    k = len(names)
    csvs = [rep.csv(f"c_matrix_{slug(s.label)}.csv", matrix_frame(s.c, s.class_names), index=True) for s in srcs]
    alphas = [s.c_meta.get("alpha") for s in srcs]
    what = f"C-matrix (paper Fig. 3), from {runs_line(srcs)}"
    tables, ncsv = [], []
    if k > MAX_K_CELLS or any(len(s.c) != k for s in srcs):  # too many cells to print C's values in: tables
        for s in srcs:
            df = top_neighbours(s.c, s.class_names)
            ncsv.append(rep.csv(f"c_neighbours_{slug(s.label)}.csv", df))
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
    save_figure(fig, rep.out / "c_matrix.png", rep.manifest, "C-matrix heatmap", what)
    rep.section("1. C-matrix", "c_matrix.png",
                f"{what}. Row i: how class i's smoothing mass alpha is spread over the other classes."
                + (" The values are in the tables below and the CSV files." if tables else ""), csvs + ncsv,
                "\n\n".join(tables))


def fig_class_probs(rep: Report, srcs: list[Source], outs: dict[str, dict]) -> None:
    names = srcs[0].class_names
    mats = [outs[s.label]["train_class_probs"].double().numpy() for s in srcs]
    csvs = [rep.csv(f"class_probs_{slug(s.label)}.csv", matrix_frame(m, s.class_names), index=True)
            for s, m in zip(srcs, mats)]
    titles = [f"{s.label}\n{s.method}, mean p(true class) {_true_class_prob(outs[s.label]):.2f}" for s in srcs]
    fig = heatmap_figure(mats, titles, names, rep.out / "class_probs.png", log_scale=True, vmin=1e-4, vmax=1.0,
                         cbar_label="mean softmax probability (log scale)", xlabel="predicted class",
                         ylabel="true class", suptitle="Class-wise mean output probabilities on the training set "
                                                       "(un-augmented)")
    what = f"class-wise mean softmax on the training set (paper Fig. 4), from {runs_line(srcs)}"
    save_figure(fig, rep.out / "class_probs.png", rep.manifest, "class-wise output probabilities", what)
    rep.section("2. Class-wise output probabilities", "class_probs.png",
                f"{what[0].upper() + what[1:]}. Row i: the mean softmax over the training images of class i; a "
                "flat off-diagonal erases class relations, a structured one keeps them.", csvs)


def _true_class_prob(o: dict) -> float:
    p, c = o["train_class_probs"].double(), o["train_class_counts"].double()
    return float((p.diagonal() * c).sum() / c.sum())  # mean softmax of the true class over the training set


def fig_features(rep: Report, srcs: list[Source], outs: dict[str, dict]) -> None:
    plt = plt_module()
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
        csvs += [rep.csv(f"tsne_{slug(s.label)}.csv", df),
                 rep.csv(f"centre_distance_{slug(s.label)}.csv", matrix_frame(d, names), index=True)]
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
        im = heatmap(axes[1, col], dists[col], names, norm, "viridis", "class", "class",
                      fmt=lambda v: f"{v:.1f}" if v > 0 else "0")
        axes[1, col].set_title(f"{s.label}: class-centre distance (x100)")
    if k <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colours[c], markersize=5) for c in range(k)]
        fig.legend(handles, names, loc="outside right upper", title="class", markerscale=1.2)
    fig.colorbar(im, ax=axes[1, :], shrink=0.8, label="L1-normalised cosine distance (x100)")
    fig.suptitle("Penultimate-layer features of the test subset: t-SNE (top), class-centre distances (bottom)")
    what = (f"t-SNE of penultimate features of a seeded test subset and the L1-normalised cosine distance "
            f"among class centres (paper Fig. 5), from {runs_line(srcs)}")
    save_figure(fig, rep.out / "features.png", rep.manifest, "feature geometry", what)
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
    plt = plt_module()
    calib = {s.label: c for s in srcs if (c := read_calibration(s.path)) is not None}
    panels = [(s, False) for s in srcs] + [(s, True) for s in srcs if s.label in calib]
    n = len(panels)
    rows, cols = (2, len(srcs)) if calib and len(srcs) <= 4 else grid_shape(n, 4)
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
        csvs.append(rep.csv(f"reliability_{slug(s.label)}{'_ts' if after else ''}.csv", bins))
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
            f"from {runs_line(srcs)}" + (f"; for {', '.join(calib)} also after temperature scaling with the "
                                          f"temperature `kd calibrate` wrote (calibration.json)" if calib else ""))
    save_figure(fig, rep.out / "reliability.png", rep.manifest, "reliability diagram", what)
    rep.section("4. Reliability", "reliability.png", what[0].upper() + what[1:] + ".", csvs)


def fig_curves(rep: Report, srcs: list[Source]) -> None:
    plt = plt_module()
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
    rows, cols = grid_shape(len(panels), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 2.9 + 0.4), layout="constrained", squeeze=False)
    colours = plt_module().get_cmap("tab10")
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
    what = f"learning curves (train loss, each loss term, test accuracy and ECE per epoch), from {runs_line(srcs_used)}"
    save_figure(fig, rep.out / "curves.png", rep.manifest, "learning curves", what)
    rep.section("5. Learning curves", "curves.png", what[0].upper() + what[1:] + ".",
                [rep.csv("curves.csv", pd.DataFrame(tidy))])


def fig_cost(rep: Report, bench_path: Path, df: pd.DataFrame) -> None:
    plt = plt_module()
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
    stem = slug(bench_path.stem)
    name = stem if stem.startswith("cost") else f"cost_{stem}"
    what = f"step time per source on a log scale with the ratio to 1-hot, from `{bench_path}`"
    save_figure(fig, rep.out / f"{name}.png", rep.manifest, "cost chart", what)
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
    csvs += [rep.csv(f"ablation_c_matrix_{slug(s.label)}.csv", matrix_frame(s.c, names), index=True) for s in srcs]
    what = f"C-matrices learned with the LS++ loss and its ablation variants (paper Fig. 6), row entropies in bits, from {runs_line(srcs)}"
    save_figure(fig, rep.out / "ablation_c_matrices.png", rep.manifest, "ablation C-matrices", what)
    rep.section("7. LS++ loss ablation", "ablation_c_matrices.png",
                what[0].upper() + what[1:] + ". Low entropy rows: C collapsed toward one class.", csvs)
