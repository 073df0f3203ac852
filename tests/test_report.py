"""`kd report`: figures that decode at their recorded size, CSVs holding the numbers they show, index.md, cache."""
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from kd import cmatrix, runs

BENCH = ROOT / "benchmarks" / "results" / "cost_digits_cpu.csv"
FIGURES = {"c_matrix.png", "class_probs.png", "features.png", "reliability.png", "curves.png", "cost_digits_cpu.png"}
POINTS = 150  # a small t-SNE keeps the test quick on two cores
RECIPE = ["--dataset", "digits", "--epochs", 2, "--device", "cpu", "--optimizer", "adamw", "--lr", 0.02,
          "--batch-size", 32, "--warmup-epochs", 0, "--quiet"]


def _main(*argv):
    from kd.app.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An LS++ and a 1-hot digits run, and one report over both (plus the LS++ C file and a bench CSV)."""
    base = tmp_path_factory.mktemp("report")
    lspp, onehot = base / "runs" / "lspp", base / "runs" / "onehot"
    assert _main("train-teacher", "--method", "lspp", *RECIPE, "--out", lspp) == 0
    assert _main("train-teacher", "--method", "onehot", *RECIPE, "--out", onehot) == 0
    out = base / "report"
    assert _main("report", lspp, onehot, lspp / runs.C_MATRIX, "--bench", BENCH, "--out", out,
                 "--tsne-points", POINTS, "--device", "cpu", "--quiet") == 0
    return {"lspp": lspp, "onehot": onehot, "out": out, "base": base}


def _matrix(path):
    df = pd.read_csv(path, index_col=0)
    df.index = df.index.astype(str)  # digits' class names are "0" ... "9"
    assert list(df.index) == list(df.columns)  # class names as header row and first column
    return df


def test_every_figure_exists_decodes_and_has_its_recorded_size(made):
    out = made["out"]
    manifest = pd.read_csv(out / "figures.csv")
    assert set(manifest["file"]) == FIGURES == {p.name for p in out.glob("*.png")}
    for row in manifest.itertuples():
        img = mpimg.imread(out / row.file)
        assert img.shape[:2] == (row.height_px, row.width_px), row.file
        assert 300 <= row.width_px <= 2500 and 250 <= row.height_px <= 2500, row.file
        assert img.std() > 0.05, f"{row.file} is blank"
        assert (out / row.file).stat().st_size < 150_000, f"{row.file} is too large for a repository"
    sizes = manifest.set_index("file")
    # two runs (or a run and a C file) side by side: wider than tall
    for f in ("c_matrix.png", "class_probs.png", "reliability.png"):
        assert sizes.loc[f, "width_px"] > sizes.loc[f, "height_px"], f


def test_index_links_every_figure_and_csv(made):
    out = made["out"]
    text = (out / "index.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert set(images) == FIGURES
    csvs = re.findall(r"\[[^\]]*\]\(([^)]+\.csv)\)", text)
    assert csvs and all((out / c).is_file() for c in csvs)
    assert {p.name for p in out.glob("*.csv")} == set(csvs)  # every CSV is named under its figure
    for run in (made["lspp"], made["onehot"]):
        assert str(run) in text  # which run made it


def test_c_matrix_csv_equals_the_runs_c_matrix(made):
    c, meta = cmatrix.load_c_matrix(made["lspp"])
    for name in ("c_matrix_lspp.csv", "c_matrix_c_matrix.csv"):  # the run and the file given directly
        df = _matrix(made["out"] / name)
        assert list(df.columns) == meta["class_names"]
        np.testing.assert_allclose(df.to_numpy(), c.double().numpy(), rtol=0, atol=1e-7)


def test_class_probs_csv_is_the_class_mean_softmax_of_the_training_set(made):
    from kd.data import load_dataset
    from kd.engine import predict
    from teachers.network import load_teacher_network

    model, _ = load_teacher_network(made["onehot"])
    split = load_dataset("digits")
    logits, labels = predict(model, split.train, split.info)
    p = logits.softmax(1).double()
    want = np.stack([p[labels == k].mean(0).numpy() for k in range(10)])
    got = _matrix(made["out"] / "class_probs_onehot.csv").to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_centre_distances_are_symmetric_with_a_zero_diagonal(made):
    for run in ("lspp", "onehot"):
        d = _matrix(made["out"] / f"centre_distance_{run}.csv").to_numpy()
        np.testing.assert_allclose(d, d.T, atol=1e-12)
        assert np.all(np.diag(d) == 0) and np.all(d >= 0)
        assert d.sum() == pytest.approx(1.0)  # L1-normalised
        assert d[~np.eye(10, dtype=bool)].min() > 0  # distinct class centres
    tsne = pd.read_csv(made["out"] / "tsne_onehot.csv")
    assert len(tsne) == POINTS and tsne["test_index"].is_unique
    assert np.isfinite(tsne[["tsne_x", "tsne_y"]].to_numpy()).all()


def test_reliability_csv_ece_equals_the_runs_summary(made):
    cal = pd.read_csv(made["out"] / "calibration.csv").set_index("run")
    for run in ("lspp", "onehot"):
        s = runs.read_summary(made[run])
        assert cal.loc[run, "ece_15"] == pytest.approx(s["test_ece"], abs=1e-6)
        assert cal.loc[run, "nll"] == pytest.approx(s["test_nll"], abs=1e-5)
        assert cal.loc[run, "acc"] == pytest.approx(s["test_acc"], abs=1e-6)
        bins = pd.read_csv(made["out"] / f"reliability_{run}.csv")
        assert len(bins) == 15 and bins["count"].sum() == cal.loc[run, "n_test"]
        full = bins[bins["count"] > 0]
        ece = (full["count"] / full["count"].sum() * (full["mean_confidence"] - full["accuracy"]).abs()).sum()
        assert ece == pytest.approx(s["test_ece"], abs=1e-6)  # the bars drawn are the bins of the ECE


def test_adaptive_ece_matches_an_independent_computation():
    from kd.metrics import adaptive_ece

    g = np.random.default_rng(3)
    n, b = 1003, 15  # not a multiple of the bin count
    logits = g.normal(size=(n, 7)) * 3
    labels = g.integers(0, 7, size=n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for k in range(b):  # ranks r with k <= r * b / n < k + 1
        sel = order[math.ceil(k * n / b): math.ceil((k + 1) * n / b)]
        total += len(sel) / n * abs(conf[sel].mean() - correct[sel].mean())
    got = adaptive_ece(torch.from_numpy(probs), torch.from_numpy(labels), b)
    assert got == pytest.approx(total, abs=1e-12)
    # one bin: |mean confidence - accuracy|
    assert adaptive_ece(torch.from_numpy(probs), torch.from_numpy(labels), 1) == pytest.approx(abs(conf.mean() - correct.mean()))


def test_curves_csv_holds_the_metrics_csv_values(made):
    curves = pd.read_csv(made["out"] / "curves.csv")
    m = pd.read_csv(made["lspp"] / runs.METRICS)
    for col in ("train_loss", "loss_lspp_net", "loss_lspp_c", "test_acc", "test_ece"):
        got = curves[(curves["run"] == "lspp") & (curves["metric"] == col)].sort_values("epoch")["value"]
        np.testing.assert_allclose(got.to_numpy(), m[col].to_numpy())


def test_cost_csv_ratios_are_to_onehot(made):
    df = pd.read_csv(made["out"] / "cost_digits_cpu.csv").set_index("source")
    bench = pd.read_csv(BENCH).set_index("source")
    assert df.loc["onehot", "ratio_to_onehot"] == 1.0
    np.testing.assert_allclose(df["ratio_to_onehot"], bench["step_ms_median"] / bench.loc["onehot", "step_ms_median"])


def test_second_report_reuses_the_cache(made, monkeypatch, tmp_path):
    import kd.app.report.outputs as outputs  # the network passes are looked up in their own module
    from kd.app.report import make_report

    def boom(*a, **k):
        raise AssertionError("the model was run again")

    monkeypatch.setattr(outputs, "compute_outputs", boom)
    monkeypatch.setattr(outputs, "tsne", boom)
    out = tmp_path / "again"
    index = make_report([made["lspp"]], out, cache=made["out"] / "cache", tsne_points=POINTS, log=None)
    assert "reused for lspp" in index.read_text()
    pd.testing.assert_frame_equal(_matrix(out / "class_probs_lspp.csv"), _matrix(made["out"] / "class_probs_lspp.csv"))
    one, two = (pd.read_csv(d / "figures.csv").set_index("file") for d in (out, made["out"]))
    assert one.loc["class_probs.png", "width_px"] < two.loc["class_probs.png", "width_px"]  # one panel, not two
    assert not (out / "cache").exists()


def test_a_c_matrix_file_alone_reads_files_only(made, monkeypatch, tmp_path):
    import kd.app.report.outputs as outputs  # the network passes are looked up in their own module
    from kd.app.report import make_report

    monkeypatch.setattr(outputs, "compute_outputs", lambda *a, **k: pytest.fail("a C file needs no network"))
    out = tmp_path / "c"
    make_report([made["lspp"] / runs.C_MATRIX], out, log=None)
    assert {p.name for p in out.glob("*.png")} == {"c_matrix.png"}
    c, _ = cmatrix.load_c_matrix(made["lspp"])
    np.testing.assert_allclose(_matrix(out / "c_matrix_c_matrix.csv").to_numpy(), c.double().numpy(), atol=1e-7)


def test_ablation_runs_get_their_c_matrices_side_by_side(made, tmp_path):
    from kd.app.report import make_report
    from kd.metrics import row_entropy_bits

    ce = made["base"] / "runs" / "lspp-ce"
    assert _main("train-teacher", "--method", "lspp-ce", *RECIPE, "--out", ce) == 0
    out = tmp_path / "ablation"
    make_report([made["lspp"], ce], out, cache=made["out"] / "cache", tsne_points=POINTS, device="cpu", log=None)
    assert (out / "ablation_c_matrices.png").is_file() and not (out / "c_matrix.png").exists()
    ent = pd.read_csv(out / "ablation_row_entropy_bits.csv").set_index("class")
    for name, run in (("lspp", made["lspp"]), ("lspp-ce", ce)):
        np.testing.assert_allclose(ent[name].to_numpy(), row_entropy_bits(cmatrix.load_c_matrix(run)[0]).numpy())
    assert "ablation_c_matrices.png" in (out / "index.md").read_text()


def test_refuses_a_non_empty_out(made, kd_main, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = kd_main("report", made["lspp"], "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("what", ["missing", "unfinished", "not_safetensors", "bad_bench"])
def test_bad_input_is_one_line(made, kd_main, tmp_path, what):
    args = []
    if what == "missing":
        args = [tmp_path / "nope"]
    elif what == "unfinished":
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / runs.CONFIG).write_text("method: lspp\n")
        args = [tmp_path / "half"]
    elif what == "not_safetensors":
        (tmp_path / "c.txt").write_text("0.5 0.5\n")
        args = [tmp_path / "c.txt"]
    else:
        (tmp_path / "b.csv").write_text("a,b\n1,2\n")
        args = [made["lspp"], "--bench", tmp_path / "b.csv"]
    out = tmp_path / "out"
    code, _, err = kd_main("report", *args, "--out", out)
    assert code == 2, err
    assert err.startswith("kd: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()  # inputs are checked before anything is written


def test_a_report_that_fails_part_way_leaves_nothing_and_the_same_command_runs_again(made, kd_main, tmp_path):
    import shutil

    run = tmp_path / "lspp"
    shutil.copytree(made["lspp"], run)
    weights = run / runs.WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # read only after the C-matrix figure is drawn
    out = tmp_path / "report"
    argv = ("report", run, "--out", out, "--tsne-points", POINTS, "--device", "cpu", "--quiet")
    code, _, err = kd_main(*argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "truncated" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lspp"]  # no figures, no partial folder
    weights.write_bytes(good)
    code, stdout, err = kd_main(*argv)
    assert code == 0, err
    assert (out / "index.md").is_file() and (out / "c_matrix.png").is_file()
    assert f"cached in `{out / 'cache'}`" in (out / "index.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lspp", "report"]


def test_demo_points_at_a_report_command_that_parses(tmp_path):
    import shlex

    from kd.app.cli import build_parser
    from kd.app.demo import report_hint

    dirs = [tmp_path / "demo out" / "teacher-lspp", tmp_path / "demo out" / "student-proxy"]
    line = report_hint(dirs, kept=True)
    cmd = shlex.split(line[line.index("kd report"):])
    args = build_parser().parse_args(cmd[1:])
    assert args.func.__name__ == "_cmd_report" and args.inputs == [str(d) for d in dirs]
    assert "kd demo --out DIR" in report_hint(dirs, kept=False) and "DIR/student-proxy" in report_hint(dirs, kept=False)
