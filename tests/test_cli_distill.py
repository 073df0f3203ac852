"""`kd distill`, `kd proxy export` and `kd teacher cache` through the CLI on digits."""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kd.app.cli import main


def cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    assert cli("train-teacher", "--method", "lspp", "--epochs", 3, "--out", d / "lspp", "--device", "cpu", "--quiet") == 0
    assert cli("train-teacher", "--method", "onehot", "--epochs", 2, "--out", d / "onehot", "--device", "cpu", "--quiet") == 0
    assert cli("teacher", "cache", d / "lspp", "--out", d / "cache.safetensors", "--device", "cpu") == 0
    assert cli("proxy", "export", d / "onehot", "--out", d / "proxy-onehot.safetensors", "--device", "cpu") == 0
    return d


@pytest.mark.parametrize("spec", ["onehot", "ls", "ls:0.2", "proxy:{d}/lspp", "proxy:{d}/lspp/c_matrix.safetensors",
                                  "proxy:{d}/proxy-onehot.safetensors", "network:{d}/lspp", "cached:{d}/cache.safetensors"])
def test_distill_each_spec_kind(teachers_dir, tmp_path, spec):
    spec = spec.format(d=teachers_dir)
    out = tmp_path / "student"
    assert cli("distill", "--teacher", spec, "--student", "mlp", "--epochs", 2, "--out", out, "--device", "cpu", "--quiet") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["teacher"] == spec and s["model"] == "mlp" and s["kind"] == "student"
    assert {"test_acc", "test_nll", "test_ece"} <= set(s)
    assert (out / "model.safetensors").is_file() and not (out / "c_matrix.safetensors").exists()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["teacher"] == spec
    if spec.startswith("proxy:"):
        assert cfg["alpha"] == 0.1  # taken from the artifact


def test_alpha_flag_overrides_the_proxy_artifact(teachers_dir, tmp_path):
    out = tmp_path / "s"
    assert cli("distill", "--teacher", f"proxy:{teachers_dir}/lspp", "--alpha", 0.3, "--epochs", 1, "--out", out, "--quiet") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["alpha"] == 0.3


def test_hinton_flags_reach_the_loss(teachers_dir, tmp_path):
    out = tmp_path / "s"
    assert cli("distill", "--teacher", f"network:{teachers_dir}/lspp", "--temperature", 4, "--hard-weight", 0.5,
               "--epochs", 1, "--out", out, "--quiet") == 0
    assert "loss_kd" in (out / "metrics.csv").read_text().splitlines()[0]


def test_proxy_export_of_an_lspp_run_offers_learned_and_measured(teachers_dir, tmp_path):
    assert cli("proxy", "export", teachers_dir / "lspp", "--from", "learned", "--out", tmp_path / "l.safetensors") == 0
    assert cli("proxy", "export", teachers_dir / "lspp", "--from", "measured", "--out", tmp_path / "m.safetensors",
               "--device", "cpu") == 0
    learned = load_file(str(tmp_path / "l.safetensors"))["c_matrix"]
    measured = load_file(str(tmp_path / "m.safetensors"))["c_matrix"]
    assert torch.equal(learned, load_file(str(teachers_dir / "lspp" / "c_matrix.safetensors"))["c_matrix"])
    for c in (learned, measured):
        torch.testing.assert_close(c.sum(1), torch.ones(10))
        assert torch.all(c.diagonal() == 0)
    assert not torch.allclose(learned, measured)


def test_export_of_a_run_without_learned_c_refuses_learned(teachers_dir, tmp_path, capsys):
    assert cli("proxy", "export", teachers_dir / "onehot", "--from", "learned", "--out", tmp_path / "x.safetensors") == 2
    assert "no learned C-matrix" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def _expect_error(capsys, needle, *argv):
    code = cli(*argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_bad_teacher_input_is_one_line_exit_2_and_writes_nothing(teachers_dir, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["distill", "--epochs", 1, "--out", out, "--quiet", "--teacher"]

    bad_k = tmp_path / "k5.safetensors"
    c5 = torch.full((5, 5), 0.25).fill_diagonal_(0)
    save_file({"c_matrix": c5}, str(bad_k), metadata={"alpha": "0.1"})
    _expect_error(capsys, "K=5 classes but the data set has 10", *base, f"proxy:{bad_k}")

    other = tmp_path / "other-run"
    shutil.copytree(teachers_dir / "lspp", other)
    s = json.loads((other / "summary.json").read_text())
    s["dataset"] = "cifar10"
    (other / "summary.json").write_text(json.dumps(s))
    # without --dataset a distill runs on the teacher's data set (here missing); with another, the refusal names the flag
    _expect_error(capsys, "CIFAR10 not found", *base, f"network:{other}")
    _expect_error(capsys, "trained on 'cifar10', not 'digits'; use --dataset cifar10", *base, f"network:{other}",
                  "--dataset", "digits")

    _expect_error(capsys, "does not exist", *base, f"proxy:{tmp_path}/missing.safetensors")
    _expect_error(capsys, "does not exist", *base, f"network:{tmp_path}/no-run")

    truncated = tmp_path / "trunc.safetensors"
    data = (teachers_dir / "lspp" / "c_matrix.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _expect_error(capsys, "truncated", *base, f"proxy:{truncated}")
    cache_trunc = tmp_path / "cache-trunc.safetensors"
    data = (teachers_dir / "cache.safetensors").read_bytes()
    cache_trunc.write_bytes(data[:-100])
    _expect_error(capsys, "truncated", *base, f"cached:{cache_trunc}")

    _expect_error(capsys, "unknown teacher 'wizard:x'", *base, "wizard:x")
    _expect_error(capsys, "teacher 'proxy' needs a path", *base, "proxy")
    _expect_error(capsys, "takes no argument", *base, "onehot:0.3")
    assert not out.exists()


def test_existing_outputs_are_not_overwritten(teachers_dir, tmp_path, capsys):
    target = tmp_path / "exists.safetensors"
    target.write_text("keep")
    _expect_error(capsys, "already exists", "proxy", "export", teachers_dir / "lspp", "--out", target)
    _expect_error(capsys, "already exists", "teacher", "cache", teachers_dir / "lspp", "--out", target)
    assert target.read_text() == "keep"
    out = tmp_path / "student"
    out.mkdir()
    (out / "x").write_text("keep")
    _expect_error(capsys, "already exists", "distill", "--teacher", "onehot", "--out", out)
    assert (out / "x").read_text() == "keep"
