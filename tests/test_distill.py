"""Distillation from every teacher source: exact targets, a frozen teacher, proxies, Hinton's loss."""

import numpy as np
import pytest
import torch
from torch import nn

from kd.config import TrainConfig
from kd.data import DatasetInfo
from kd.engine import predict
from kd.losses import hinton_kd_loss
from kd.models import MLP
from students import distill
from teachers.cached import CachedTeacher
from teachers.network import NetworkTeacher
from teachers.proxy import ProxyTeacher, measure_c_matrix


def blobs(n, k=4, d=6, seed=0):
    g = torch.Generator().manual_seed(123)
    centers = torch.randn(k, d, generator=g) * 2.5
    g.manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


def test_proxy_targets_are_exactly_the_one_hot_mix_with_c_rows():
    k, alpha = 6, 0.1
    c = torch.rand(k, k)
    c.fill_diagonal_(0)
    c = c / c.sum(1, keepdim=True)
    y = torch.tensor([0, 5, 3, 3, 1])
    t = ProxyTeacher(c, alpha).targets(y)
    expected = (1 - alpha) * torch.eye(k)[y] + alpha * c[y]
    assert torch.equal(t, expected)
    torch.testing.assert_close(t.sum(1), torch.ones(5))


class RecordingNet(nn.Module):
    """A small net with batch norm and dropout that records the mode of every forward call."""

    def __init__(self, d=6, k=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, k))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


def test_network_teacher_is_frozen_in_eval_mode_and_bit_identical_after_distillation():
    torch.manual_seed(0)
    teacher = RecordingNet()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    src = NetworkTeacher(teacher, 4)
    res = distill(MLP(6, 4), src, blobs(256), blobs(64, seed=1),
                  TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu"), progress=False, log=None)
    assert len(teacher.modes) >= 16 and not any(teacher.modes)  # every forward ran in eval mode
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert all(not p.requires_grad for p in teacher.parameters())
    assert res.summary["test_acc"] > 0.5


def test_default_network_loss_is_cross_entropy_on_teacher_probabilities():
    teacher = nn.Linear(3, 5)
    src = NetworkTeacher(teacher, 5)
    x, s = torch.randn(4, 3), torch.randn(4, 5)
    with torch.no_grad():
        p_t = teacher(x).softmax(-1)
    expected = -(p_t * s.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(src.loss_terms(s, torch.zeros(4, dtype=torch.long), inputs=x)["ce"], expected)


@pytest.mark.parametrize("t,w", [(1.0, 0.0), (4.0, 0.0), (4.0, 0.5), (2.5, 0.9)])
def test_hinton_loss_matches_an_independent_float64_computation(t, w):
    g = torch.Generator().manual_seed(3)
    s, te = torch.randn(8, 7, generator=g) * 3, torch.randn(8, 7, generator=g) * 3
    y = torch.randint(0, 7, (8,), generator=g)

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    sn, tn = s.double().numpy(), te.double().numpy()
    ps, pt = softmax(sn / t), softmax(tn / t)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    ce = np.mean(-np.log(softmax(sn)[np.arange(8), y.numpy()]))
    expected = (1 - w) * t * t * kl + w * ce
    assert hinton_kd_loss(s, te, y, t, w).item() == pytest.approx(expected, rel=1e-5)


def test_measured_proxy_equals_hand_computed_class_means():
    k = 4
    probs = torch.tensor(np.random.default_rng(0).dirichlet(np.ones(k), size=40), dtype=torch.float32)
    labels = torch.arange(40) % k
    c = measure_c_matrix(probs, labels, k)
    expected = np.zeros((k, k))
    for cls in range(k):
        mean = probs[labels == cls].double().numpy().mean(0)
        mean[cls] = 0.0
        expected[cls] = mean / mean.sum()
    np.testing.assert_allclose(c.numpy(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c.sum(1), torch.ones(k))
    assert torch.all(c.diagonal() == 0)


def test_cached_teacher_gathers_rows_by_sample_index():
    logits = torch.randn(10, 3)
    src = CachedTeacher(logits)
    idx = torch.tensor([7, 2, 2])
    torch.testing.assert_close(src.targets(torch.zeros(3, dtype=torch.long), index=idx), logits[idx].softmax(-1))


def test_cached_teacher_warns_when_augmentation_is_on():
    from kd.data import load_dataset

    split = load_dataset("digits")
    info = DatasetInfo(**{**split.info.__dict__, "crop_padding": 1})
    with pytest.warns(UserWarning, match="un-augmented"):
        distill(MLP(64, 10), CachedTeacher(torch.zeros(len(split.train), 10)), split.train, split.test,
                TrainConfig(epochs=1, device="cpu"), info=info, progress=False, log=None)


def test_python_api_on_tabular_data_teacher_export_and_proxy_student():
    """LS++ teacher -> C-matrix (learned and measured) -> proxy-distilled student, no images anywhere."""
    from students import train_teacher

    train, test = blobs(600), blobs(200, seed=1)
    cfg = TrainConfig(method="lspp", epochs=6, batch_size=32, lr=0.05, device="cpu")
    torch.manual_seed(0)
    t = train_teacher(MLP(6, 4, hidden=64), train, test, cfg, progress=False, log=None)
    assert t.summary["test_acc"] > 0.8
    learned = t.source.c_matrix().detach()
    logits, labels = predict(t.model, train, None)
    measured = measure_c_matrix(logits.softmax(-1), labels, 4)
    for c in (learned, measured):
        torch.testing.assert_close(c.sum(1), torch.ones(4))
        assert torch.all(c.diagonal() == 0)
    s = distill(MLP(6, 4, hidden=16), ProxyTeacher(learned, 0.1), train, test,
                TrainConfig(epochs=6, batch_size=32, lr=0.05, device="cpu"), progress=False, log=None)
    assert s.summary["test_acc"] > 0.8
