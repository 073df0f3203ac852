"""`kd report`'s entry: check the inputs, build the report in a folder beside ``--out`` and move it into place."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from kd import runs
from kd.errors import KDError
from kd.app.report.inputs import ABLATION, TSNE_POINTS, read_bench, read_source, run_labels
from kd.app.report.outputs import cached_outputs
from kd.app.report.figures import (Report, fig_ablation, fig_c_matrix, fig_class_probs, fig_cost, fig_curves,
                                   fig_features, fig_reliability)


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
