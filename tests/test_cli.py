"""`kd train-teacher` end to end, and bad input as one-line errors."""
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "kd", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_teacher_lspp_fills_the_run_directory(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train-teacher", "--method", "lspp", "--dataset", "digits", "--epochs", 8, "--out", out,
                "--device", "cpu", "--batch-size", 64, "--lr", 0.1)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "c_matrix.safetensors", "config.yaml", "metrics.csv", "model.safetensors", "summary.json"]

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "lspp" and cfg["epochs"] == 8 and cfg["batch_size"] == 64 and cfg["lr"] == 0.1
    assert cfg["model"] == "lenet" and cfg["alpha"] == 0.1

    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns[:8]) == ["epoch", "train_loss", "train_acc", "test_acc", "test_nll", "test_ece", "test_aece",
                                   "seconds"]
    assert m["epoch"].tolist() == list(range(1, 9))
    assert {"loss_lspp_net", "loss_lspp_c", "c_entropy_share", "c_row_max"} <= set(m.columns)
    assert (m["train_acc"].between(0, 1)).all() and m["train_acc"].iloc[-1] > m["train_acc"].iloc[0]

    s = json.loads((out / "summary.json").read_text())
    for key in ("test_acc", "test_nll", "test_ece", "train_acc", "c_entropy_share", "c_row_max"):  # final epoch
        assert s[key] == pytest.approx(m[key].iloc[-1])
    assert s["method"] == s["source"] == "lspp" and s["model"] == "lenet"
    assert s["test_nll"] < math.log(10) and 0.0 < s["test_ece"] < 0.5  # better calibrated than a uniform guess
    assert s["test_acc"] > 0.5  # 10 classes: chance is 0.1

    c = load_file(str(out / "c_matrix.safetensors"))["c_matrix"]
    assert c.shape == (10, 10)
    torch.testing.assert_close(c.sum(1), torch.ones(10))
    assert torch.all(c.diagonal() == 0)
    with safe_open(str(out / "c_matrix.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["alpha"]) == 0.1
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]

    from kd.models import create_model

    net = create_model("lenet", 10, 1, 8)
    net.load_state_dict(load_file(str(out / "model.safetensors")))


def test_config_file_keys_mirror_flags_and_flags_win(tmp_path, kd_main):
    conf = tmp_path / "c.yaml"
    conf.write_text("method: ls\nepochs: 1\nbatch-size: 200\nalpha: 0.3\nlr: 0.01\n")
    code, _, err = kd_main("train-teacher", "--config", conf, "--lr", 0.02, "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (cfg["method"], cfg["epochs"], cfg["batch_size"], cfg["alpha"], cfg["lr"]) == ("ls", 1, 200, 0.3, 0.02)
    assert not (tmp_path / "r" / "c_matrix.safetensors").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--dataset", "mnist-ish"], "unknown data set 'mnist-ish'"),
    (["--alpha", "1.5"], "alpha must lie in (0, 1)"),
    (["--alpha", "0"], "alpha must lie in (0, 1)"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "data root /nonexistent/cifar does not exist"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--method", "hotdog"], "invalid choice"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, kd_main, argv, needle):
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--out", out, "--epochs", "1", "--quiet", *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_config_file_keys_are_refused(tmp_path, kd_main):
    conf = tmp_path / "c.yaml"
    conf.write_text("epochz: 3\n")
    code, _, err = kd_main("train-teacher", "--config", conf, "--out", tmp_path / "r")
    assert code == 2 and "unknown key 'epochz'" in err and len(err.strip().splitlines()) == 1


def test_existing_run_directory_is_never_overwritten(tmp_path, kd_main):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = kd_main("train-teacher", "--out", out, "--epochs", "1", "--quiet")
    assert code == 2 and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_cli_error_has_no_traceback_through_a_real_process(tmp_path):
    r = run_cli("train-teacher", "--model", "nonet", "--out", tmp_path / "x")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


def test_paper_table6_sweep_is_valid_and_plans_every_teacher_before_its_students():
    """configs/paper/table6.yaml: every run's config and source options pass their checks, each student reads a
    teacher of its own data set that the file trains, and the dry run lists all 43 runs, teachers first."""
    import teachers
    from kd.app.sweep import load_sweep, pending
    from kd.config import TrainConfig

    path = ROOT / "configs" / "paper" / "table6.yaml"
    spec = load_sweep(path)
    assert len(spec["runs"]) == 43
    trained = set()
    for run in spec["runs"]:
        keys = {k: v for k, v in {**spec["base"], **run}.items() if k not in ("name", "verb")}
        cfg = TrainConfig.from_dict(keys, where=run["name"], option_names=teachers.option_names()).validate()
        source = cfg.teacher.partition(":")[0] if cfg.teacher else cfg.method
        teachers.check_options(source, cfg.options)
        assert cfg.epochs == 200 and cfg.dataset in ("cifar100", "tinyimagenet")
        if run["verb"] == "distill":
            kind, _, ref = cfg.teacher.partition(":")
            teacher = ref.split("/")[1]
            assert kind in ("network", "proxy") and teacher in trained and teacher.startswith(cfg.dataset + "-teacher-")
        else:
            trained.add(run["name"])
    planned = [line.strip().rsplit(" seed ", 1)[0] for line in pending(path).splitlines() if line.startswith("  ")]
    assert planned == [run["name"] for run in spec["runs"]]
