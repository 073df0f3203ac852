"""LS++ against an independent float64 computation of the paper's formula (Section 3.2), and
the fused autograd node against the plain-autograd definition (values, gradients, gradcheck)."""
import numpy as np
import pytest
import torch

from kd.sources import SourceContext
from teachers.lspp import LSPPLoss, _LSPPTerms, lspp_terms_reference

FUSED = [pytest.param(True, id="fused"), pytest.param(False, id="autograd")]


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


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("k,alpha", [(2, 0.1), (5, 0.1), (10, 0.3), (37, 0.05), (100, 0.9)])
def test_value_and_gradients_match_float64_reference(k, alpha, fused):
    g = torch.Generator().manual_seed(k)
    b = 16
    z = torch.randn(b, k, generator=g) * 3
    y = torch.randint(0, k, (b,), generator=g)
    loss_fn = LSPPLoss(k, alpha, fused=fused)
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


@pytest.mark.parametrize("fused", FUSED)
def test_each_term_trains_only_its_own_parameters(fused):
    k, b = 6, 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, k, generator=g, requires_grad=True)
    y = torch.randint(0, k, (b,), generator=g)
    loss_fn = LSPPLoss(k, fused=fused)
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


@pytest.mark.parametrize("fused", FUSED)
def test_c_matrix_is_row_stochastic_with_zero_diagonal_after_training_steps(fused):
    k = 5
    loss_fn = LSPPLoss(k, 0.2, fused=fused)
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


@pytest.mark.parametrize("fused", FUSED)
def test_saturated_probabilities_give_finite_loss_and_gradients(fused):
    k = 10
    loss_fn = LSPPLoss(k, fused=fused)
    z = torch.full((4, k), -1e4)
    z[:, 0] = 1e4  # p -> one-hot in float32: log p underflows without log-space care
    z.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    loss = loss_fn(z, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss_fn.c_logits.grad).all()


@pytest.mark.parametrize("fused", FUSED)
def test_half_precision_logits_are_computed_in_float32(fused):
    loss_fn = LSPPLoss(3, fused=fused)
    z = torch.randn(4, 3).to(torch.bfloat16)
    assert loss_fn(z, torch.tensor([0, 1, 2, 0])).dtype == torch.float32


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_open_unit_interval_is_refused(alpha):
    from kd.errors import KDError

    with pytest.raises(KDError, match="alpha"):
        LSPPLoss(5, alpha)


# --- the fused node (_LSPPTerms) against the definition (lspp_terms_reference) -------------------


def fused_terms(z, theta, y, alpha):
    """_LSPPTerms on raw tensors, with the index buffers an LSPPLoss of the same K builds."""
    idx = LSPPLoss(z.shape[1])
    return _LSPPTerms.apply(z, theta, y, idx._index, idx._offdiag_cols, alpha)


TERMS = [pytest.param(fused_terms, id="fused"), pytest.param(lspp_terms_reference, id="reference")]


def draw(k, b, seed, dtype=torch.float64):
    """Random logits (B x K), C logits (K x (K-1)) and labels; B > K forces repeated classes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, generator=g, dtype=dtype) * 2
    theta = torch.randn(k, k - 1, generator=g, dtype=dtype) * 2
    y = torch.randint(0, k, (b,), generator=g)
    assert b <= k or y.unique().numel() < b
    return z, theta, y


def grads(out, inputs):
    """d out / d inputs, zeros where out does not depend on an input."""
    return torch.autograd.grad(out, inputs, allow_unused=True, materialize_grads=True, retain_graph=True)


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("k,b,alpha,seed", [(5, 7, 0.1, 11), (4, 9, 0.6, 12), (2, 3, 0.3, 13), (6, 5, 0.05, 14)])
def test_gradcheck_float64(terms, k, b, alpha, seed):
    # The stop-gradients make each term's gradient its true derivative only w.r.t. its own
    # input: net w.r.t. the logits (t does not depend on them), c w.r.t. the C logits (p does
    # not depend on them). Those two Jacobians are checked against finite differences; the
    # cross ones are zero by design and checked in test_each_term_alone_*.
    z, theta, y = draw(k, b, seed)
    z.requires_grad_(True)
    theta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z_: terms(z_, theta.detach(), y, alpha)[0], (z,))
    assert torch.autograd.gradcheck(lambda th: terms(z.detach(), th, y, alpha)[1], (theta,))


@pytest.mark.parametrize("k,b,alpha,seed", [(5, 7, 0.1, 21), (2, 6, 0.4, 22), (10, 64, 0.3, 23), (37, 50, 0.9, 24)])
def test_fused_node_matches_the_definition_in_float64(k, b, alpha, seed):
    z, theta, y = draw(k, b, seed)
    z.requires_grad_(True)
    theta.requires_grad_(True)
    fused_net, fused_c = fused_terms(z, theta, y, alpha)
    ref_net, ref_c = lspp_terms_reference(z, theta, y, alpha)
    torch.testing.assert_close(fused_net, ref_net, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused_c, ref_c, rtol=1e-12, atol=1e-14)
    # An upstream gradient other than 1, different per term: a missing 1/2 or swapped grad_net / grad_c fails.
    for got, want in zip(grads(3 * fused_net + 0.5 * fused_c, (z, theta)),
                         grads(3 * ref_net + 0.5 * ref_c, (z, theta))):
        assert want.abs().sum() > 0 or want.shape == (2, 1)  # K = 2: C is fixed (one entry per row), no gradient
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("k,b,alpha,seed", [(5, 7, 0.1, 31), (8, 20, 0.5, 32)])
def test_each_term_alone_trains_only_its_own_input_in_both_forms(k, b, alpha, seed):
    z, theta, y = draw(k, b, seed)
    z.requires_grad_(True)
    theta.requires_grad_(True)
    fused_net, fused_c = fused_terms(z, theta, y, alpha)
    ref_net, ref_c = lspp_terms_reference(z, theta, y, alpha)
    # net alone, scaled by -2.5: logits gradients agree, C gets exactly nothing
    (f_gz, f_gt), (r_gz, r_gt) = grads(-2.5 * fused_net, (z, theta)), grads(-2.5 * ref_net, (z, theta))
    torch.testing.assert_close(f_gz, r_gz, rtol=1e-10, atol=1e-14)
    assert f_gz.abs().sum() > 0
    assert torch.count_nonzero(f_gt) == 0 and torch.count_nonzero(r_gt) == 0
    # c alone, scaled by 4: C gradients agree, the logits get exactly nothing
    (f_gz, f_gt), (r_gz, r_gt) = grads(4 * fused_c, (z, theta)), grads(4 * ref_c, (z, theta))
    torch.testing.assert_close(f_gt, r_gt, rtol=1e-10, atol=1e-14)
    assert f_gt.abs().sum() > 0
    assert torch.count_nonzero(f_gz) == 0 and torch.count_nonzero(r_gz) == 0


@pytest.mark.parametrize("k,b,alpha,seed", [(5, 7, 0.1, 41), (10, 128, 0.2, 42), (3, 2, 0.7, 43)])
def test_loss_module_gives_the_same_terms_and_gradients_fused_or_not(k, b, alpha, seed):
    z0, theta, y = draw(k, b, seed, dtype=torch.float32)
    results = []
    for fused in (True, False):
        loss_fn = LSPPLoss(k, alpha, fused=fused)
        assert loss_fn.fused is fused
        with torch.no_grad():
            loss_fn.c_logits.copy_(theta)
        z = z0.clone().requires_grad_(True)
        terms = loss_fn.loss_terms(z, y)
        assert set(terms) == {"lspp_net", "lspp_c"}
        # the option really picks the path: only the fused form ends in the one custom node
        assert ("_LSPPTerms" in type(terms["lspp_net"].grad_fn).__name__) is fused
        (terms["lspp_net"] * 2 + terms["lspp_c"] * 0.25).backward()
        results.append((terms["lspp_net"].detach(), terms["lspp_c"].detach(), z.grad, loss_fn.c_logits.grad))
    for got, want in zip(*results):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fused_node_refuses_double_backward_and_the_definition_allows_it():
    z, theta, y = draw(4, 6, 51)
    z.requires_grad_(True)
    gz, = torch.autograd.grad(lspp_terms_reference(z, theta, y, 0.1)[0], z, create_graph=True)
    assert gz.requires_grad
    gz, = torch.autograd.grad(fused_terms(z, theta, y, 0.1)[0], z, create_graph=True)
    with pytest.raises(RuntimeError):  # not a silently wrong second derivative
        gz.sum().backward()


def test_bench_rows_time_both_forms():
    from benchmarks.harness import bench_rows

    assert LSPPLoss.bench_rows() == {"lspp": {}, "lspp-compiled": {"compiled": True}, "lspp-autograd": {"fused": False}}
    assert {"lspp", "lspp-compiled", "lspp-autograd"} <= set(bench_rows())
    fused = LSPPLoss.stand_in(SourceContext(7, options={}))
    plain = LSPPLoss.stand_in(SourceContext(7, options={"fused": False, "alpha": 0.3}))
    assert (fused.fused, fused.alpha, fused.num_classes) == (True, 0.1, 7)
    assert (plain.fused, plain.alpha, plain.num_classes) == (False, 0.3, 7)


def test_the_compiled_form_equals_the_definition_and_falls_back_to_the_fused_node(monkeypatch):
    import teachers.lspp as lspp

    k, b, alpha = 10, 64, 0.1
    z0, theta, y = draw(k, b, 61, dtype=torch.float32)
    results = []
    for kwargs in ({"fused": False}, {"compiled": True}):
        loss_fn = LSPPLoss(k, alpha, **kwargs)
        with torch.no_grad():
            loss_fn.c_logits.copy_(theta)
        z = z0.clone().requires_grad_(True)
        terms = loss_fn.loss_terms(z, y)
        (terms["lspp_net"] * 2 + terms["lspp_c"] * 0.25).backward()
        results.append((terms["lspp_net"].detach(), terms["lspp_c"].detach(), z.grad, loss_fn.c_logits.grad))
    if lspp._COMPILED.get("failed"):
        pytest.skip("torch.compile is not available here: the fallback is tested below")
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(lspp, "_COMPILED", {"terms": broken})
    z = z0.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="compiled loss is not available"):
        terms = LSPPLoss(k, alpha, compiled=True).loss_terms(z, y)
    assert "_LSPPTerms" in type(terms["lspp_net"].grad_fn).__name__  # the fused node took over
