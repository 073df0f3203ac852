"""A run killed between epochs continues from its checkpoint and ends where the uninterrupted run ends."""
import json

import pytest
import torch
from safetensors.torch import load_file

from kd.app.cli import main
from kd.config import TrainConfig
from kd.app.jobs import train_teacher_job

from conftest import Killed, kill_after


def test_resumed_lspp_run_equals_the_uninterrupted_one(tmp_path):
    cfg = TrainConfig(method="lspp", epochs=4, batch_size=64, device="cpu")
    straight = train_teacher_job(cfg, tmp_path / "straight", progress=False, log=None)
    with pytest.raises(Killed):
        train_teacher_job(cfg, tmp_path / "killed", progress=False, log=kill_after(2))
    assert (tmp_path / "killed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = train_teacher_job(cfg, tmp_path / "killed", progress=False, log=None, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for key in ("test_acc", "test_nll", "test_ece"):
        assert resumed.summary[key] == straight.summary[key]
    for name in ("model.safetensors", "c_matrix.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "killed" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()  # a finished run drops it


def test_resume_through_the_cli_and_its_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = TrainConfig(method="onehot", epochs=3, device="cpu")
    with pytest.raises(Killed):
        train_teacher_job(cfg, out, progress=False, log=kill_after(1))
    assert main(["train-teacher", "--resume", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    capsys.readouterr()
    assert main(["train-teacher", "--resume", "--out", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert main(["train-teacher", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    assert main(["distill", "--resume", "--teacher", "onehot", "--out", str(out)]) == 2
    assert "give only --out" in capsys.readouterr().err


def test_resume_with_a_lower_lr_continues_from_the_checkpoint_at_that_rate(tmp_path):
    import yaml

    cfg = TrainConfig(method="lspp", epochs=3, batch_size=64, device="cpu")
    straight = train_teacher_job(cfg, tmp_path / "straight", progress=False, log=None)
    with pytest.raises(Killed):
        train_teacher_job(cfg, tmp_path / "killed", progress=False, log=kill_after(1))
    assert main(["train-teacher", "--resume", "--lr", "0.01", "--out", str(tmp_path / "killed"), "--quiet"]) == 0
    assert yaml.safe_load((tmp_path / "killed" / "config.yaml").read_text())["lr"] == 0.01
    s = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert s["epochs"] == 3 and s["test_acc"] != straight.summary["test_acc"] or s["test_nll"] != straight.summary["test_nll"]
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # epochs 2-3 ran at the lower rate
    code = main(["train-teacher", "--resume", "--epochs", "9", "--out", str(tmp_path / "straight")])
    assert code == 2
