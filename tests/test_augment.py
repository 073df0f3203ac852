"""Cutout, RandAugment, Mixup and CutMix: the batch operations, soft labels through every source, the CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.data.augment import BatchMix, MixedIndex, cutout, parse_rand_augment
from kd.config import TrainConfig
from kd.engine import make_accelerator, prepare_training
from kd.errors import KDError
from kd.sources import SourceContext, TargetSource
from teachers import make_source
from teachers.cached import CachedTeacher
from teachers.lspp import LSPPLoss
from teachers.network import NetworkTeacher
from teachers.proxy import ProxyTeacher


def test_mixup_mixes_inputs_and_labels_with_one_lam_and_the_reversed_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    xm, m, mixed = BatchMix(3, mixup=0.4, seed=3)(x.clone(), y, torch.arange(10, 16))
    lam = mixed.lam
    assert 0 < lam < 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    expected = lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y.flip(0), 3).float()
    torch.testing.assert_close(m, expected)
    assert mixed.perm.tolist() == [5, 4, 3, 2, 1, 0] and mixed.index.tolist() == list(range(10, 16))


def test_cutmix_lam_is_the_area_that_was_not_pasted():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    for seed in range(5):
        xm, m, mixed = BatchMix(4, cutmix=1.0, seed=seed)(x.clone(), torch.tensor([0, 3]))
        pasted = (xm[0] != x[0]).float().mean().item()  # row 0 takes its box from row 1
        assert mixed.lam == pytest.approx(1 - pasted)
        assert m[0, 0].item() == pytest.approx(mixed.lam) and m[0, 3].item() == pytest.approx(1 - mixed.lam)


def test_mixing_is_reproducible_per_epoch():
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    a, b = BatchMix(4, mixup=0.2, cutmix=1.0, seed=1), BatchMix(4, mixup=0.2, cutmix=1.0, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    for _ in range(4):
        torch.testing.assert_close(a(x.clone(), y)[1], b(x.clone(), y)[1])
    b.set_epoch(4)
    assert not all(torch.equal(a(x.clone(), y)[1], b(x.clone(), y)[1]) for _ in range(4))


def test_cutout_zeroes_a_square_clipped_at_the_border():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(64, 2, 10, 12)
    gen_copy = torch.Generator().manual_seed(0)
    tops = torch.randint(0, 10, (64, 1, 1), generator=gen_copy) - 2
    lefts = torch.randint(0, 12, (64, 1, 1), generator=gen_copy) - 2
    out = cutout(x, 5, g)
    for i in range(64):  # an independent count of the clipped square's area
        t, l_ = int(tops[i]), int(lefts[i])
        area = (min(t + 5, 10) - max(t, 0)) * (min(l_ + 5, 12) - max(l_, 0))
        assert int((out[i, 0] == 0).sum()) == area
        assert torch.equal(out[i, 0], out[i, 1])  # every channel of a pixel


def test_rand_augment_spec():
    assert parse_rand_augment("rand-m9-n2") == (9, 2)
    assert parse_rand_augment("rand-n3-m5") == (5, 3)
    for bad in ("rand-m9-x2", "augmix-m3", "rand-m99-n1", "rand-m9-n0"):
        with pytest.raises(KDError):
            parse_rand_augment(bad)


def _soft(b, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b,), generator=g)
    lam = 0.7
    return lam * F.one_hot(y, k).double() + (1 - lam) * F.one_hot(y.flip(0), k).double()


@pytest.mark.parametrize("name", ["onehot", "ls", "proxy"])
def test_label_sources_give_m_times_their_table(name):
    k = 5
    src = make_source(name, k) if name != "proxy" else ProxyTeacher.stand_in(SourceContext(k))
    m = _soft(6, k).float()
    table = torch.eye(k) if name == "onehot" else src.table  # 1-hot holds no table: its rows are the identity's
    torch.testing.assert_close(src.targets(m), m @ table)
    logits = torch.randn(6, k, requires_grad=True)
    loss = sum(src.loss_terms(logits, m).values())
    expected = -(m @ table * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_lspp_with_soft_labels_against_an_independent_float64_computation(fused):
    k, b, alpha = 4, 6, 0.1
    g = torch.Generator().manual_seed(1)
    src = LSPPLoss(k, alpha, fused=fused).double()
    with torch.no_grad():
        src.c_logits.copy_(torch.randn(k, k - 1, generator=g, dtype=torch.float64))
    m = _soft(b, k, seed=2)
    logits = torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True)
    terms = src.loss_terms(logits, m)
    (3 * terms["lspp_net"] + 0.5 * terms["lspp_c"]).backward()

    # independent: C row by row with a zero inserted on the diagonal, t = m @ ((1 - alpha) I + alpha C)
    theta = src.c_logits.detach().clone().requires_grad_(True)
    rows = []
    for i in range(k):
        s = theta[i].softmax(0)
        rows.append(torch.cat([s[:i], torch.zeros(1, dtype=s.dtype), s[i:]]))
    c = torch.stack(rows)
    t = m @ ((1 - alpha) * torch.eye(k, dtype=torch.float64) + alpha * c)
    lp = logits.detach().clone().requires_grad_(True)
    logp = lp.log_softmax(1)
    net = 0.5 * -(t.detach() * logp).sum(1).mean()
    cterm = 0.5 * -(logp.exp().detach() * t.log()).sum(1).mean()
    (3 * net + 0.5 * cterm).backward()
    tol = dict(rtol=1e-5, atol=1e-6)  # the source computes in float32
    torch.testing.assert_close(terms["lspp_net"].double(), net, **tol)
    torch.testing.assert_close(terms["lspp_c"].double(), cterm, **tol)
    torch.testing.assert_close(logits.grad, lp.grad, **tol)
    torch.testing.assert_close(src.c_logits.grad, theta.grad, **tol)
    assert (theta.grad.abs() > 0).sum() > k  # rows of both mixed classes receive gradient


def test_cached_teacher_mixes_the_two_samples_rows_with_the_batch_lam():
    logits = torch.randn(20, 3)
    src = CachedTeacher(logits)
    idx = torch.tensor([4, 7, 9, 1])
    mixed = MixedIndex(idx, torch.tensor([3, 2, 1, 0]), 0.25)
    p = logits.softmax(1)
    expected = 0.25 * p[idx] + 0.75 * p[idx.flip(0)]
    torch.testing.assert_close(src.targets(None, index=mixed), expected)


class _Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_the_network_teacher_sees_the_mixed_input_the_student_sees():
    torch.manual_seed(0)
    student, teacher = _Recorder(nn.Sequential(nn.Flatten(), nn.Linear(16, 3))), _Recorder(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
    cfg = TrainConfig(device="cpu", mixup=0.5)
    tr = prepare_training(make_accelerator(cfg), student, NetworkTeacher(teacher, 3), cfg, steps_per_epoch=10)
    x = torch.randn(8, 1, 4, 4)
    terms = tr.step(x, torch.randint(0, 3, (8,)), torch.arange(8))
    assert torch.isfinite(terms["ce"])
    assert not torch.equal(student.seen[0], x)  # it was mixed ...
    torch.testing.assert_close(teacher.seen[0], student.seen[0])  # ... and the teacher saw the same


class _IndexOnly(TargetSource):
    name = "index-only"
    needs_index = True


def test_a_per_sample_source_that_cannot_mix_is_refused_in_one_line():
    cfg = TrainConfig(device="cpu", cutmix=1.0)
    with pytest.raises(KDError, match="cannot follow --mixup/--cutmix"):
        prepare_training(make_accelerator(cfg), nn.Linear(4, 3), _IndexOnly(3), cfg, steps_per_epoch=1)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from kd.app.cli import main

    base = tmp_path_factory.mktemp("aug")
    assert main(["train-teacher", "--method", "lspp", "--epochs", "2", "--device", "cpu", "--quiet",
                 "--out", str(base / "t")]) == 0
    assert main(["teacher", "cache", str(base / "t"), "--out", str(base / "cache.safetensors")]) == 0
    return base


FLAGS = {  # every flag with every source, in two runs
    "mixup-cutout-aa": ["--mixup", "0.4", "--cutout", "3", "--aa", "rand-m9-n2", "--num-workers", "0"],
    "cutmix-or-mixup": ["--cutmix", "1.0", "--mixup", "0.4"],
}


@pytest.mark.parametrize("spec", ["onehot", "ls", "lspp", "proxy", "network", "cached"])
def test_every_augmentation_flag_trains_with_every_source(digits_teacher, spec, tmp_path):
    from kd.app.cli import main

    full = {"proxy": f"proxy:{digits_teacher / 't'}", "network": f"network:{digits_teacher / 't'}",
            "cached": f"cached:{digits_teacher / 'cache.safetensors'}"}.get(spec, spec)
    for name, flags in FLAGS.items():
        out = tmp_path / name
        code = main(["distill", "--teacher", full, "--epochs", "2", "--device", "cpu",
                     "--quiet", "--out", str(out), *flags])
        assert code == 0
        s = json.loads((out / "summary.json").read_text())
        assert np.isfinite(s["test_nll"]) and s["epochs"] == 2
