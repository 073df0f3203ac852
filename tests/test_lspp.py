"""LS++ against an independent float64 computation of the paper's formula (Section 3.2)."""
import numpy as np
import pytest
import torch

from teachers.lspp import LSPPLoss


def reference(z, y, theta, alpha):
    """Value and gradients (logits, C logits) of 1/2[H(sg t, p) + H(sg p, t)], by hand in float64."""
    z, theta = np.asarray(z, np.float64), np.asarray(theta, np.float64)
    b, k = z.shape
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    c = np.zeros((k, k))
    s_rows = np.exp(theta - theta.max(1, keepdims=True))
    s_rows /= s_rows.sum(1, keepdims=True)
    for i in range(k):
        c[i, [j for j in range(k) if j != i]] = s_rows[i]
    t = (1 - alpha) * np.eye(k)[y] + alpha * c[y]
    loss = 0.5 * np.mean(-(t * np.log(p)).sum(1) - (p * np.log(t)).sum(1))
    grad_z = 0.5 * (p - t) / b
    grad_theta = np.zeros_like(theta)
    for n in range(b):
        i = y[n]
        q = np.delete(p[n], i)
        grad_theta[i] += 0.5 / b * (q.sum() * s_rows[i] - q)
    return loss, grad_z, grad_theta


@pytest.mark.parametrize("k,alpha", [(2, 0.1), (5, 0.1), (10, 0.3), (37, 0.05), (100, 0.9)])
def test_value_and_gradients_match_float64_reference(k, alpha):
    g = torch.Generator().manual_seed(k)
    b = 16
    z = torch.randn(b, k, generator=g) * 3
    y = torch.randint(0, k, (b,), generator=g)
    loss_fn = LSPPLoss(k, alpha)
    with torch.no_grad():
        loss_fn.c_logits.copy_(torch.randn(k, k - 1, generator=g))
    z.requires_grad_(True)
    loss = loss_fn(z, y)
    loss.backward()
    ref_loss, ref_gz, ref_gt = reference(z.detach().numpy(), y.numpy(), loss_fn.c_logits.detach().numpy(), alpha)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(z.grad.numpy(), ref_gz, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(loss_fn.c_logits.grad.numpy(), ref_gt, rtol=1e-4, atol=1e-7)


def test_each_term_trains_only_its_own_parameters():
    k, b = 6, 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, k, generator=g, requires_grad=True)
    y = torch.randint(0, k, (b,), generator=g)
    loss_fn = LSPPLoss(k)
    terms = loss_fn.loss_terms(z, y)
    gz, gc = torch.autograd.grad(terms["lspp_net"], [z, loss_fn.c_logits], allow_unused=True, retain_graph=True)
    assert gz.abs().sum() > 0
    assert gc is None or torch.count_nonzero(gc) == 0  # network term leaves C untouched
    gz, gc = torch.autograd.grad(terms["lspp_c"], [z, loss_fn.c_logits], allow_unused=True)
    assert gc.abs().sum() > 0
    assert gz is None or torch.count_nonzero(gz) == 0  # reverse term leaves the network untouched


def test_c_matrix_starts_uniform_over_non_targets():
    k = 7
    loss_fn = LSPPLoss(k)
    assert [n for n, _ in loss_fn.named_parameters()] == ["c_logits"]
    assert loss_fn.c_logits.shape == (k, k - 1) and torch.count_nonzero(loss_fn.c_logits) == 0
    c = loss_fn.c_matrix()
    expected = (torch.ones(k, k) - torch.eye(k)) / (k - 1)
    torch.testing.assert_close(c, expected)


def test_c_matrix_is_row_stochastic_with_zero_diagonal_after_training_steps():
    k = 5
    loss_fn = LSPPLoss(k, 0.2)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=5.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        z = torch.randn(32, k, generator=g) * 4
        y = torch.randint(0, k, (32,), generator=g)
        opt.zero_grad()
        loss_fn(z, y).backward()
        opt.step()
    c = loss_fn.c_matrix()
    torch.testing.assert_close(c.sum(1), torch.ones(k))
    assert torch.all(c.diagonal() == 0)
    assert not torch.allclose(c, (torch.ones(k, k) - torch.eye(k)) / (k - 1))  # it learned something


def test_targets_are_one_hot_mix_with_c_rows():
    k, alpha = 4, 0.1
    loss_fn = LSPPLoss(k, alpha)
    with torch.no_grad():
        loss_fn.c_logits.copy_(torch.randn(k, k - 1))
    y = torch.tensor([0, 3, 2, 2])
    t = loss_fn.targets(y)
    expected = (1 - alpha) * torch.eye(k)[y] + alpha * loss_fn.c_matrix()[y]
    torch.testing.assert_close(t, expected)


def test_saturated_probabilities_give_finite_loss_and_gradients():
    k = 10
    loss_fn = LSPPLoss(k)
    z = torch.full((4, k), -1e4)
    z[:, 0] = 1e4  # p -> one-hot in float32: log p underflows without log-space care
    z.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    loss = loss_fn(z, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss_fn.c_logits.grad).all()


def test_half_precision_logits_are_computed_in_float32():
    loss_fn = LSPPLoss(3)
    z = torch.randn(4, 3).to(torch.bfloat16)
    assert loss_fn(z, torch.tensor([0, 1, 2, 0])).dtype == torch.float32


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_open_unit_interval_is_refused(alpha):
    from kd.errors import KDError

    with pytest.raises(KDError, match="alpha"):
        LSPPLoss(5, alpha)
