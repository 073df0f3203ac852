"""The LS++ paper's comparison methods (tfkd-reg, tfkd-self, zipf-ls, mbls, fl-3, flsd-53).

Each source is checked against its definition written out again here, per sample, in float64
(value and gradient w.r.t. the logits), against the official code's reduction where it differs,
with soft (mixed) labels, and end to end through the CLI on digits.
"""
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.app.cli import main
from kd.errors import KDError
from teachers import SOURCES, label_methods, make_source
from teachers.focal import AdaptiveFocalLoss, FocalLoss
from teachers.tfkd import TfKDRegularization, TfKDSelf
from teachers.zipf import ZipfLabelSmoothing, zipf_ranks

K = 7
B = 6


def cli(*argv):
    return main([str(a) for a in argv])


# ---- the definitions, written out per sample in float64 (nothing from teachers/ is used) ----

def log_softmax_row(z):
    """log softmax of a 1-D float64 tensor by its definition."""
    mx = max(float(v.detach()) for v in z)
    return z - (mx + torch.log(sum(torch.exp(v - mx) for v in z)))


def ref_tfkd_reg(z, labels, alpha, temperature, multiplier):
    b, k = z.shape
    total = 0.0
    for i in range(b):
        m = labels[i] if labels.is_floating_point() else [1.0 if c == int(labels[i]) else 0.0 for c in range(k)]
        m = [float(v) for v in m]
        p_d = [0.99 * m[c] + 0.01 / (k - 1) * (1.0 - m[c]) for c in range(k)]
        e = [math.exp(v / temperature) for v in p_d]
        q = [v / sum(e) for v in e]
        logp = log_softmax_row(z[i])
        ce = -sum(m[c] * logp[c] for c in range(k))
        kl = sum(q[c] * (math.log(q[c]) - logp[c]) for c in range(k))
        total = total + (1 - alpha) * ce + alpha * multiplier / k * kl
    return total / b


def ref_tfkd_self(z, t, labels, alpha, temperature, multiplier):
    b, k = z.shape
    total = 0.0
    for i in range(b):
        m = labels[i] if labels.is_floating_point() else [1.0 if c == int(labels[i]) else 0.0 for c in range(k)]
        logp = log_softmax_row(z[i])
        logp_t = log_softmax_row(z[i] / temperature)
        logq_t = log_softmax_row(t[i].detach() / temperature)
        ce = -sum(float(m[c]) * logp[c] for c in range(k))
        kl = sum(torch.exp(logq_t[c]) * (logq_t[c] - logp_t[c]) for c in range(k))
        total = total + (1 - alpha) * ce + alpha * temperature ** 2 * multiplier / k * kl
    return total / b


def ref_ranks(row):
    """Rank 1 for the largest value; tied values share the smallest rank."""
    vals = [float(v.detach()) for v in row]
    return [1 + sum(1 for w in vals if w > v) for v in vals]


def ref_zipf(z, labels, alpha, power):
    b, k = z.shape
    total = 0.0
    for i in range(b):
        if labels.is_floating_point():
            m = [float(v) for v in labels[i]]
            y = max(range(k), key=lambda c: m[c])  # the larger mixing weight (no ties in the tests)
        else:
            y = int(labels[i])
            m = [1.0 if c == y else 0.0 for c in range(k)]
        logp = log_softmax_row(z[i])
        ce = -sum(m[c] * logp[c] for c in range(k))
        ranks = ref_ranks(z[i])
        others = [c for c in range(k) if c != y]
        d = {c: ranks[c] ** (-power) for c in others}
        P = {c: d[c] / sum(d.values()) for c in others}
        log_norm = torch.log(sum(torch.exp(z[i, c]) for c in others))
        kl = sum(P[c] * (math.log(P[c]) - (z[i, c] - log_norm)) for c in others)
        total = total + ce + alpha * kl
    return total / b


def ref_mbls(z, labels, alpha, margin):
    b, k = z.shape
    total = 0.0
    for i in range(b):
        m = labels[i] if labels.is_floating_point() else [1.0 if c == int(labels[i]) else 0.0 for c in range(k)]
        logp = log_softmax_row(z[i])
        ce = -sum(float(m[c]) * logp[c] for c in range(k))
        top = max(range(k), key=lambda c: float(z[i, c].detach()))
        hinge = sum(torch.clamp(z[i, top] - z[i, c] - margin, min=0.0) for c in range(k))
        total = total + ce + alpha / k * hinge
    return total / b


def ref_focal(z, labels, gamma_of):
    """Mean of sum_c m_c * -(1 - p_c)^gamma log p_c; gamma_of(p) gives gamma from the float value of p."""
    b, k = z.shape
    total = 0.0
    for i in range(b):
        m = labels[i] if labels.is_floating_point() else [1.0 if c == int(labels[i]) else 0.0 for c in range(k)]
        logp = log_softmax_row(z[i])
        for c in range(k):
            if float(m[c]) != 0.0:
                p = torch.exp(logp[c])
                total = total - float(m[c]) * (1 - p) ** gamma_of(float(p.detach())) * logp[c]
    return total / b


def flsd_gamma(p):
    return 5.0 if p < 0.2 else 3.0


def check(source, z, labels, reference, rtol=1e-6, **kw):
    """Value and gradient of ``source`` (float32 logits) against ``reference`` (float64 logits)."""
    z32 = z.float().clone().requires_grad_(True)
    terms = source.loss_terms(z32, labels, **kw)
    loss = sum(terms.values())
    loss.backward()
    z64 = z.double().clone().requires_grad_(True)
    ref = reference(z64)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-7)
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-5, atol=1e-7)
    return terms


def mixed_labels(b, k, gen):
    """Soft labels of a two-class mix with weight lam > 1/2 on the first class (mixup-like)."""
    a = torch.randint(0, k, (b,), generator=gen)
    c = (a + 1 + torch.randint(0, k - 1, (b,), generator=gen)) % k
    lam = 0.55 + 0.4 * torch.rand(b, generator=gen)
    return lam[:, None] * F.one_hot(a, k).double() + (1 - lam[:, None]) * F.one_hot(c, k).double()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---- tfkd-reg ----

@pytest.mark.parametrize("alpha,temperature,multiplier", [(0.1, 20.0, 100.0), (0.4, 2.0, 3.0)])
def test_tfkd_reg_matches_its_definition(gen, alpha, temperature, multiplier):
    z = 3 * torch.randn(B, K, generator=gen)
    y = torch.randint(0, K, (B,), generator=gen)
    src = make_source("tfkd-reg", K, alpha=alpha, temperature=temperature, multiplier=multiplier)
    terms = check(src, z, y, lambda z64: ref_tfkd_reg(z64, y, alpha, temperature, multiplier))
    assert set(terms) == {"ce", "tfkd_reg"}
    # The official expression: (1 - a) CE + a * KLDivLoss(mean over B*K) * multiplier.
    p_d = torch.full((B, K), 0.01 / (K - 1)).scatter(1, y[:, None], 0.99)
    official = (1 - alpha) * F.cross_entropy(z, y) + alpha * multiplier * F.kl_div(
        F.log_softmax(z, 1), F.softmax(p_d / temperature, 1), reduction="sum") / z.numel()  # nn.KLDivLoss()'s mean
    torch.testing.assert_close(sum(terms.values()), official)


def test_tfkd_reg_soft_labels(gen):
    z = 2 * torch.randn(B, K, generator=gen)
    m = mixed_labels(B, K, gen)
    src = TfKDRegularization(K, 0.3, 4.0, 10.0)
    check(src, z, m.float(), lambda z64: ref_tfkd_reg(z64, m, 0.3, 4.0, 10.0))
    y = torch.randint(0, K, (B,), generator=gen)  # a one-hot m is the integer label
    hard, soft = src.loss_terms(z, y), src.loss_terms(z, F.one_hot(y, K).float())
    for name in hard:
        torch.testing.assert_close(hard[name], soft[name])


def test_tfkd_reg_targets_are_what_the_gradient_pulls_towards(gen):
    z = torch.randn(B, K, generator=gen, requires_grad=True)
    y = torch.randint(0, K, (B,), generator=gen)
    src = TfKDRegularization(K, 0.2, 5.0, 20.0)
    sum(src.loss_terms(z, y).values()).backward()
    t = src.targets(y)
    w = 0.2 * 20.0 / K
    torch.testing.assert_close(t.sum(1), torch.ones(B))
    torch.testing.assert_close(z.grad, (1 - 0.2 + w) * (z.softmax(1) - t).detach() / B)


# ---- tfkd-self ----

def small_teacher(gen):
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, K), nn.Dropout(0.5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


@pytest.mark.parametrize("soft", [False, True])
def test_tfkd_self_matches_its_definition(gen, soft):
    teacher = small_teacher(gen)
    x = torch.randn(B, 3, 4, generator=gen)
    z = 2 * torch.randn(B, K, generator=gen)
    labels = mixed_labels(B, K, gen) if soft else torch.randint(0, K, (B,), generator=gen)
    src = TfKDSelf(teacher, K, alpha=0.9, temperature=4.0, multiplier=5.0)
    src.train()  # the teacher stays in eval mode: its dropout is off
    assert not src.teacher.training and not any(p.requires_grad for p in src.parameters())
    with torch.no_grad():
        t = (x.flatten(1) @ teacher[1].weight.T + teacher[1].bias).double()
    lab = labels.float() if soft else labels
    terms = check(src, z, lab, lambda z64: ref_tfkd_self(z64, t, labels, 0.9, 4.0, 5.0), inputs=x)
    assert set(terms) == {"ce", "tfkd_self"}
    if not soft:  # the official expression: (1 - a) CE + a * KLDivLoss(mean over B*K) * T^2 * multiplier
        official = 0.1 * F.cross_entropy(z, labels) + 0.9 * 16.0 * 5.0 * F.kl_div(
            F.log_softmax(z / 4, 1), F.softmax(t.float() / 4, 1), reduction="sum") / z.numel()
        torch.testing.assert_close(sum(terms.values()), official)
    assert all(p.grad is None for p in teacher.parameters())


def test_tfkd_self_targets_and_stand_in(gen):
    teacher = small_teacher(gen)
    x = torch.randn(B, 3, 4, generator=gen)
    y = torch.randint(0, K, (B,), generator=gen)
    src = TfKDSelf(teacher, K)
    with torch.no_grad():
        q = F.softmax(teacher.eval()(x) / 6.0, 1)
    torch.testing.assert_close(src.targets(y, inputs=x), 0.05 * F.one_hot(y, K) + 0.95 * q)
    from kd.sources import SourceContext
    stand_in = TfKDSelf.stand_in(SourceContext(K))  # no teacher model: a random linear one
    assert stand_in.loss_terms(torch.randn(B, K), y, inputs=x)["tfkd_self"] > 0


# ---- zipf-ls ----

def test_zipf_ranks_share_the_smallest_rank_on_ties():
    z = torch.tensor([[3.0, 1.0, 3.0, 0.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 2.0, 0.0, 2.0]])
    assert zipf_ranks(z).tolist() == [[1, 3, 1, 4], [1, 1, 1, 1], [4, 1, 3, 1]]
    r = torch.randn(5, 9).round()  # many ties
    assert zipf_ranks(r).tolist() == [ref_ranks(row) for row in r]


@pytest.mark.parametrize("alpha,power,soft", [(0.1, 1.0, False), (0.7, 2.5, False), (0.3, 1.0, True)])
def test_zipf_matches_its_definition_with_ties(gen, alpha, power, soft):
    z = (2 * torch.randn(B, K, generator=gen)).round()  # rounded: ties in every row's ranking
    z[0] = torch.tensor([3.0, 1.0, 3.0, 0.0, 1.0, -2.0, 3.0])
    assert any(len(set(row.tolist())) < K for row in z)
    labels = mixed_labels(B, K, gen) if soft else torch.randint(0, K, (B,), generator=gen)
    src = make_source("zipf-ls", K, alpha=alpha, power=power)
    lab = labels.float() if soft else labels
    terms = check(src, z, lab, lambda z64: ref_zipf(z64, labels, alpha, power))
    assert set(terms) == {"ce", "zipf_kl"} and terms["zipf_kl"] > 0


def test_zipf_targets(gen):
    z = torch.randn(B, K, generator=gen)
    y = torch.randint(0, K, (B,), generator=gen)
    src = ZipfLabelSmoothing(K, 0.25, 1.5)
    torch.testing.assert_close(src.targets(y), F.one_hot(y, K).float())
    t = src.zipf_targets(z, y)
    torch.testing.assert_close(t.sum(1), torch.ones(B))
    for i in range(B):
        ranks = ref_ranks(z[i])
        d = [ranks[c] ** -1.5 if c != y[i] else 0.0 for c in range(K)]
        expect = [(float(c == y[i]) + 0.25 * d[c] / sum(d)) / 1.25 for c in range(K)]
        torch.testing.assert_close(t[i], torch.tensor(expect))


# ---- mbls ----

@pytest.mark.parametrize("alpha,margin,scale,soft", [(0.1, 10.0, 12.0, False), (0.5, 1.0, 2.0, False),
                                                     (0.2, 0.0, 1.0, False), (0.3, 2.0, 3.0, True)])
def test_mbls_matches_its_definition(gen, alpha, margin, scale, soft):
    z = scale * torch.randn(B, K, generator=gen)
    labels = mixed_labels(B, K, gen) if soft else torch.randint(0, K, (B,), generator=gen)
    src = make_source("mbls", K, alpha=alpha, margin=margin)
    lab = labels.float() if soft else labels
    terms = check(src, z, lab, lambda z64: ref_mbls(z64, labels, alpha, margin))
    assert set(terms) == {"ce", "margin"} and terms["margin"] > 0  # the hinge is active somewhere
    if not soft:  # the official LogitMarginL1: CE + alpha * relu(max - z - margin).mean() over B*K
        gaps = z.max(1, keepdim=True).values - z
        official = F.cross_entropy(z, labels) + alpha * F.relu(gaps - margin).mean()
        torch.testing.assert_close(sum(terms.values()), official)


# ---- fl-3, flsd-53 ----

@pytest.mark.parametrize("gamma", [3.0, 0.0, 1.0, 0.5, 2.0])
def test_focal_matches_its_definition(gen, gamma):
    z = 2 * torch.randn(B, K, generator=gen)
    y = torch.randint(0, K, (B,), generator=gen)
    src = make_source("fl-3", K, gamma=gamma)
    terms = check(src, z, y, lambda z64: ref_focal(z64, y, lambda p: gamma))
    assert set(terms) == {"focal"}
    if gamma == 0.0:
        torch.testing.assert_close(terms["focal"], F.cross_entropy(z, y))


def test_flsd_matches_its_definition_on_both_sides_of_the_threshold(gen):
    z = 2 * torch.randn(4 * B, K, generator=gen)
    y = torch.randint(0, K, (4 * B,), generator=gen)
    near = torch.tensor([0.15, 0.199, 0.201, 0.25, 0.49, 0.51])  # rows with p_y just either side of 0.2
    z[: len(near)] = 0.0
    z[torch.arange(len(near)), y[: len(near)]] = torch.log(near / (1 - near) * (K - 1))
    p_y = z.softmax(1).gather(1, y[:, None])
    torch.testing.assert_close(p_y[: len(near), 0], near)
    assert (p_y < 0.2).sum() > 1 and (p_y >= 0.2).sum() > 1
    check(make_source("flsd-53", K), z, y, lambda z64: ref_focal(z64, y, flsd_gamma))


@pytest.mark.parametrize("cls,gamma_of", [(FocalLoss, lambda p: 3.0), (AdaptiveFocalLoss, flsd_gamma)])
def test_focal_soft_labels_mix_the_losses_of_the_labels(gen, cls, gamma_of):
    z = 2 * torch.randn(B, K, generator=gen)
    a = torch.randint(0, K, (B,), generator=gen)
    c = (a + 1) % K
    lam = 0.7
    m = lam * F.one_hot(a, K).float() + (1 - lam) * F.one_hot(c, K).float()
    src = cls(K)
    check(src, z, m, lambda z64: ref_focal(z64, m.double(), gamma_of))
    per = lambda lab: src.loss_terms(z, lab)["focal"]  # noqa: E731
    torch.testing.assert_close(per(m), lam * per(a) + (1 - lam) * per(c))
    torch.testing.assert_close(per(F.one_hot(a, K).float()), per(a))


def test_focal_is_finite_when_p_rounds_to_one():
    z = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    for gamma in (0.5, 3.0):
        z.grad = None
        FocalLoss(3, gamma).loss_terms(z, y)["focal"].backward()
        assert torch.isfinite(z.grad).all() and z.grad[0].abs().max() == 0


# ---- all of them ----

LABEL_ONLY = {"tfkd-reg": ("ce", "tfkd_reg"), "zipf-ls": ("ce", "zipf_kl"), "mbls": ("ce", "margin"),
              "fl-3": ("focal",), "flsd-53": ("focal",)}


def test_registered_with_their_flags():
    assert set(LABEL_ONLY) <= set(label_methods())
    assert "tfkd-self" in SOURCES and not SOURCES["tfkd-self"].label_only
    assert make_source("mbls", 5, margin=3.0).margin == 3.0
    assert make_source("fl-3", 5, gamma=2.0).gamma == 2.0
    s = make_source("tfkd-reg", 5, alpha=None, temperature=None, multiplier=None)  # None: the defaults
    assert (s.alpha, s.temperature, s.multiplier) == (0.1, 20.0, 100.0)
    z = make_source("zipf-ls", 5, power=2.0)
    assert (z.alpha, z.power) == (0.1, 2.0)


@pytest.mark.parametrize("name", sorted(LABEL_ONLY))
def test_bf16_logits_give_float32_losses(gen, name):
    z = torch.randn(B, K, generator=gen).bfloat16().requires_grad_(True)
    y = torch.randint(0, K, (B,), generator=gen)
    terms = make_source(name, K).loss_terms(z, y)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert z.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name,options,message", [
    ("tfkd-reg", {"temperature": 0.0}, "--temperature must be positive"),
    ("tfkd-reg", {"multiplier": -1.0}, "--multiplier must be positive"),
    ("tfkd-reg", {"alpha": 1.0}, "alpha must lie in (0, 1)"),
    ("zipf-ls", {"power": 0.0}, "--power must be positive"),
    ("zipf-ls", {"alpha": -0.1}, "alpha must be positive"),
    ("mbls", {"margin": -1.0}, "--margin must be non-negative"),
    ("mbls", {"alpha": 0.0}, "alpha must be positive"),
    ("fl-3", {"gamma": -1.0}, "--gamma must be non-negative"),
])
def test_bad_options_are_one_line_errors(name, options, message):
    with pytest.raises(KDError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        make_source(name, K, **options)
    assert "\n" not in str(e.value)


def test_bad_specs(tmp_path):
    with pytest.raises(KDError, match="takes no argument"):
        make_source("zipf-ls", K, arg="0.2")
    with pytest.raises(KDError, match="needs a network: tfkd-self:RUN_DIR"):
        make_source("tfkd-self", K)
    with pytest.raises(KDError, match="does not exist"):
        make_source("tfkd-self", K, arg=str(tmp_path / "nothing"))


# ---- end to end on digits ----

@pytest.mark.parametrize("name", sorted(LABEL_ONLY))
def test_train_teacher_two_epochs(tmp_path, name):
    out = tmp_path / name
    assert cli("train-teacher", "--method", name, "--epochs", 2, "--device", "cpu", "--quiet", "--out", out) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == name
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 2
    cols = [f"loss_{t}" for t in LABEL_ONLY[name]]
    assert set(cols) <= set(metrics.columns)
    summed = torch.tensor(metrics[cols].sum(axis=1).values)  # the terms add up to the logged loss
    torch.testing.assert_close(summed, torch.tensor(metrics["train_loss"].values), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def onehot_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfkd") / "onehot"
    assert cli("train-teacher", "--method", "onehot", "--epochs", 2, "--device", "cpu", "--quiet", "--out", d) == 0
    return d


def test_distill_with_tfkd_self(onehot_run, tmp_path):
    out = tmp_path / "student"
    spec = f"tfkd-self:{onehot_run}"
    assert cli("distill", "--teacher", spec, "--epochs", 2, "--device", "cpu", "--quiet", "--out", out) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["teacher"] == spec and s["teacher_kind"] == "tfkd-self"
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"loss_ce", "loss_tfkd_self"} <= set(metrics.columns) and len(metrics) == 2


def test_tfkd_self_refuses_a_run_of_another_data_set(onehot_run):
    with pytest.raises(KDError, match="was trained on 'digits'"):
        make_source("tfkd-self", 10, arg=str(onehot_run), dataset="fashion-mnist")
    with pytest.raises(KDError, match="has 10 outputs but the data set has 3 classes; map them with --class-map"):
        make_source("tfkd-self", 3, arg=str(onehot_run))


def test_bench_rows_without_the_network_row(kd_main):
    code, stdout, err = kd_main("bench", "--preset", "digits", "--steps", 1, "--repeats", 1, "--warmup", 0,
                                "--sources", "onehot,tfkd-self,tfkd-reg,zipf-ls,mbls,fl-3,flsd-53", "--quiet")
    assert code == 0, err
    for name in ("tfkd-self", *LABEL_ONLY):
        assert f"| {name} |" in stdout
