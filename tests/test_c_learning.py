"""C that learns, visibly: how far C moved from uniform in every LS++ run, a note when it did not move, and a
learning-rate factor of its own."""
import math

import numpy as np
import pytest
import torch

from kd.config import TrainConfig
from kd.engine import build_optimizer, lr_lambda
from kd.metrics import c_movement
from kd.models import MLP
from students import train_teacher
from teachers.lspp import LSPPLoss


def pairs_data(n=2000, k=8, d=16, seed=0):
    """Classes in close pairs (0-1, 2-3, ...): each class's one neighbour is its partner."""
    g = torch.Generator().manual_seed(seed)
    centres = (torch.randn(k // 2, d, generator=g) * 3).repeat_interleave(2, 0) + torch.randn(k, d, generator=g) * 0.7
    y = torch.randint(0, k, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def test_c_movement_against_its_definition():
    k = 6
    uniform = (torch.ones(k, k) - torch.eye(k)) / (k - 1)
    m = c_movement(uniform)
    assert m["c_entropy_share"] == pytest.approx(1.0) and m["c_row_max"] == pytest.approx(1 / (k - 1))
    one_hot = torch.roll(torch.eye(k), 1, dims=1)
    assert c_movement(one_hot) == {"c_entropy_share": pytest.approx(0.0), "c_row_max": pytest.approx(1.0)}
    c = torch.rand(k, k, generator=torch.Generator().manual_seed(0)).fill_diagonal_(0)
    c = c / c.sum(1, keepdim=True)
    p = c.numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    m = c_movement(c)
    assert m["c_entropy_share"] == pytest.approx(float((ent / math.log(k - 1)).mean()), rel=1e-6)
    assert m["c_row_max"] == pytest.approx(float(p.max(1).mean()), rel=1e-6)


def test_c_learns_at_its_own_rate_through_the_schedule():
    model, source = MLP(4, 5), LSPPLoss(5)
    cfg = TrainConfig(lr=0.1, c_lr_scale=30.0, epochs=2, warmup_epochs=0.5)
    opt = build_optimizer(model, source, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 3.0])
    assert opt.param_groups[1]["params"] == [source.c_logits]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 10))
    for _ in range(7):
        opt.step()
        sched.step()
        net, c = (g["lr"] for g in opt.param_groups)
        assert c == pytest.approx(30.0 * net)
    with pytest.raises(Exception, match="c-lr-scale must be positive"):
        TrainConfig(c_lr_scale=0).validate()


def test_a_larger_c_rate_finds_the_neighbours_and_the_note_says_when_c_stayed_uniform():
    x, y = pairs_data()
    partner = torch.arange(8) ^ 1
    logs = {}
    results = {}
    for scale in (1.0, 10.0):
        lines = []
        cfg = TrainConfig(epochs=6, lr=0.05, device="cpu", c_lr_scale=scale)
        r = train_teacher(MLP(16, 8), (x[:1600], y[:1600]), (x[1600:], y[1600:]), cfg, progress=False,
                          log=lines.append)
        logs[scale], results[scale] = lines, r
        assert all("C entropy" in line for line in lines if line.startswith("epoch"))
        assert [h["c_entropy_share"] for h in r.history] == sorted((h["c_entropy_share"] for h in r.history),
                                                                   reverse=True)  # C moves away from uniform
    slow, fast = results[1.0].summary, results[10.0].summary
    assert fast["c_entropy_share"] < slow["c_entropy_share"] - 0.1 and fast["c_row_max"] > slow["c_row_max"] + 0.1
    assert (results[10.0].source.c_matrix().argmax(1) == partner).all()
    assert slow["c_entropy_share"] > LSPPLoss.UNIFORM_SHARE and "stayed within 3% of uniform" in slow["note"]
    assert logs[1.0][-1].startswith("note: C stayed within 3% of uniform") and "--c-lr-scale" in logs[1.0][-1]
    assert "note" not in fast and not any(line.startswith("note:") for line in logs[10.0])


def test_the_cli_takes_the_c_rate_and_logs_c(kd_main, tmp_path):
    import yaml

    out = tmp_path / "run"
    code, stdout, err = kd_main("train-teacher", "--method", "lspp", "--epochs", 2, "--c-lr-scale", 50, "--out", out,
                                "--device", "cpu")
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["c_lr_scale"] == 50.0
    assert "C entropy" in stdout and "row max" in stdout
    code, _, err = kd_main("train-teacher", "--method", "ls", "--epochs", 1, "--c-lr-scale", -1, "--out", tmp_path / "x")
    assert code == 2 and "--c-lr-scale must be positive" in err
