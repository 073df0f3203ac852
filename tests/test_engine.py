import math

import pytest
import torch

from kd.config import TrainConfig
from kd.engine import build_optimizer, fit, lr_lambda
from kd.models import MLP
from teachers.lspp import LSPPLoss
from teachers.onehot import OneHot


def blobs(n, k=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, schedule="cosine")
    f = lr_lambda(cfg, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    step = lr_lambda(TrainConfig(epochs=4, warmup_epochs=0, schedule="step", milestones=(0.5, 0.75)), 10)
    assert (step(19), step(20), step(30)) == (pytest.approx(1.0), pytest.approx(0.1), pytest.approx(0.01))


def test_c_logits_can_be_excluded_from_weight_decay():
    source = LSPPLoss(3)
    groups = build_optimizer(MLP(4, 3), source, TrainConfig(weight_decay=0.1, c_weight_decay=False)).param_groups
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["params"][0] is source.c_logits


def test_fit_trains_any_module_on_a_tensor_dataset_and_learns_c():
    train, test = blobs(300), blobs(100, seed=0)
    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.05, device="cpu")
    src = LSPPLoss(3)
    res = fit(MLP(5, 3), src, train, test, cfg, progress=False, log=None)
    assert res.summary["test_acc"] > 0.9
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    assert not torch.allclose(res.source.c_matrix(), (torch.ones(3, 3) - torch.eye(3)) / 2)


def test_same_seed_gives_the_same_run():
    train, test = blobs(200), blobs(50, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(fit(MLP(5, 3), OneHot(3), train, test, cfg, progress=False, log=None).summary["test_nll"])
    assert runs[0] == runs[1]
