"""Sparse (top-k) teacher caches and proxies for a large K, and the large-k benchmark."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kd.app.cli import main
from kd.data.augment import MixedIndex
from kd.errors import KDError
from kd.losses import soft_cross_entropy
from kd.cmatrix import save_topk_c_matrix, top_k_rows
from teachers.cached import CachedTeacher, load_cache, save_cache
from teachers.proxy import ProxyTeacher, load_proxy
from teachers.topk import CACHE_TOPK_FORMAT as TOPK_FORMAT, TopKCached, TopKProxy, save_topk_cache


def cli(*argv):
    return main([str(a) for a in argv])


def fkd_targets(logits: np.ndarray, k: int) -> np.ndarray:
    """FKD's rebuilt targets, computed independently: float16 top-k probabilities, the rest uniform."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, classes = p.shape
    out = np.zeros((n, classes))
    for i in range(n):
        top = np.argsort(-p[i])[:k]
        kept = p[i, top].astype(np.float32).astype(np.float16).astype(np.float64)
        out[i, :] = (1.0 - kept.sum()) / (classes - k)
        out[i, top] = kept
    return out


# ---- (a) top-k teacher cache ------------------------------------------------------------------

@pytest.fixture
def topk_file(tmp_path):
    logits = torch.randn(20, 12, generator=torch.Generator().manual_seed(3)) * 3
    path = tmp_path / "cache.safetensors"
    save_topk_cache(path, logits, 4, "digits", "run")
    return path, logits


def test_topk_cache_rebuilds_fkd_targets(topk_file):
    path, logits = topk_file
    src = load_cache(path, "digits", 20, 12)
    assert isinstance(src, TopKCached) and src.top_k == 4
    assert src.probs.dtype == torch.float16 and src.indices.dtype == torch.int16
    t = src.targets(None, index=torch.arange(20)).double().numpy()
    expected = fkd_targets(logits.numpy(), 4)
    np.testing.assert_allclose(t, expected, atol=1e-6)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
    # the k kept entries are the teacher's probabilities (within float16), the rest equal
    p = torch.softmax(logits.double(), 1).numpy()
    for i in range(20):
        top = np.argsort(-p[i])[:4]
        np.testing.assert_allclose(t[i, top], p[i, top], rtol=1e-3)
        rest = np.delete(t[i], top)
        assert np.ptp(rest) < 1e-7 and rest[0] == pytest.approx((1 - t[i, top].sum()) / 8, abs=1e-6)


def test_topk_cache_loss_equals_the_dense_target_loss_with_and_without_mixing(topk_file):
    path, _ = topk_file
    src = load_cache(path)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 12, generator=g)
    index = torch.tensor([3, 0, 19, 7, 7, 11])
    dense = src.targets(None, index=index)
    assert src.loss_terms(logits, None, index=index)["ce"].item() == pytest.approx(
        soft_cross_entropy(logits, dense).item(), rel=1e-5)
    mixed = MixedIndex(index, torch.tensor([2, 5, 0, 1, 4, 3]), 0.3)
    t_mixed = src.targets(None, index=mixed)
    np.testing.assert_allclose(t_mixed.numpy(), (0.3 * dense + 0.7 * dense[mixed.perm]).numpy(), atol=1e-6)
    assert src.loss_terms(logits, None, index=mixed)["ce"].item() == pytest.approx(
        soft_cross_entropy(logits, t_mixed).item(), rel=1e-5)


def test_dense_cache_still_loads(tmp_path):
    path = tmp_path / "dense.safetensors"
    save_cache(path, torch.randn(5, 7), "digits", "run")
    src = load_cache(path, "digits", 5, 7)
    assert type(src) is CachedTeacher
    assert torch.allclose(src.targets(None, index=torch.arange(5)).sum(1), torch.ones(5))


def _meta(**over):
    m = {"format": TOPK_FORMAT, "dataset": "digits", "teacher_run": "r", "num_samples": "3", "num_classes": "6",
         "top_k": "2"}
    m.update(over)
    return m


def test_bad_topk_caches_are_refused(topk_file, tmp_path):
    path, _ = topk_file
    with pytest.raises(KDError, match="K=12 classes but the data set has 10"):
        load_cache(path, "digits", 20, 10)
    with pytest.raises(KDError, match="20 rows but the training set has 21"):
        load_cache(path, "digits", 21, 12)
    probs = torch.tensor([[0.5, 0.2], [0.6, 0.1], [0.3, 0.3]]).half()
    good_idx = torch.tensor([[0, 1], [2, 5], [4, 3]], dtype=torch.int16)
    cases = {
        "without tensor 'topk_indices'": ({"topk_probs": probs}, _meta()),
        "must both be N x k": ({"topk_probs": probs, "topk_indices": good_idx[:2]}, _meta()),
        "distinct classes in": ({"topk_probs": probs, "topk_indices": torch.tensor([[0, 0], [2, 5], [4, 3]],
                                                                                     dtype=torch.int16)}, _meta()),
        "distinct classes in [0, 4)": ({"topk_probs": probs, "topk_indices": good_idx}, _meta(num_classes="4")),
        "summing to at most 1": ({"topk_probs": probs * 2, "topk_indices": good_idx}, _meta()),
        "must record num_samples": ({"topk_probs": probs, "topk_indices": good_idx}, _meta(top_k="two")),
    }
    for i, (why, (tensors, meta)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(bad), metadata=meta)
        with pytest.raises(KDError, match=why.replace("[", r"\[").replace(")", r"\)")) as e:
            load_cache(bad)
        assert "\n" not in str(e.value)
    save_file({"topk_probs": probs, "topk_indices": good_idx}, str(tmp_path / "ok.safetensors"), metadata=_meta())
    assert isinstance(load_cache(tmp_path / "ok.safetensors", "digits", 3, 6), TopKCached)


def test_top_k_must_lie_below_k(tmp_path):
    with pytest.raises(KDError, match=r"\[1, K\) = \[1, 12\)"):
        save_topk_cache(tmp_path / "x.safetensors", torch.randn(4, 12), 12, "digits", "r")
    with pytest.raises(KDError, match="--top-k must lie in"):
        top_k_rows(torch.full((5, 5), 0.2), 5)
    with pytest.raises(KDError):
        top_k_rows(torch.full((5, 5), 0.2), 0)


# ---- (b) sparse proxy ---------------------------------------------------------------------------

def _c(k=8, seed=0):
    c = torch.rand(k, k, generator=torch.Generator().manual_seed(seed)).fill_diagonal_(0)
    return c / c.sum(1, keepdim=True)


def test_sparse_proxy_targets_equal_the_dense_proxy_of_the_renormalised_top_k_c(tmp_path):
    c = _c()
    values, indices = top_k_rows(c, 3)
    path = tmp_path / "c.safetensors"
    save_topk_c_matrix(path, values, indices, 0.2, [f"c{i}" for i in range(8)], {"dataset": "digits"})
    src = load_proxy(path, num_classes=8)
    assert isinstance(src, TopKProxy) and src.alpha == 0.2 and src.meta["top_k"] == 3
    # independent: numpy top-3 per row, renormalised, then (1 - alpha) I + alpha C3
    cn = c.double().numpy()
    c3 = np.zeros_like(cn)
    for r in range(8):
        top = np.argsort(-cn[r])[:3]
        c3[r, top] = cn[r, top] / cn[r, top].sum()
    table = 0.8 * np.eye(8) + 0.2 * c3
    labels = torch.tensor([0, 3, 7, 3, 5])
    np.testing.assert_allclose(src.targets(labels).double().numpy(), table[labels.numpy()], atol=1e-6)
    assert (src.targets(labels) > 0).sum(1).tolist() == [4] * 5  # the label and its 3 kept classes
    dense = ProxyTeacher(torch.tensor(c3, dtype=torch.float32), 0.2)  # the dense source on the same C3
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert src.loss_terms(logits, labels)["ce"].item() == pytest.approx(
        dense.loss_terms(logits, labels)["ce"].item(), rel=1e-5)
    m = torch.softmax(torch.randn(5, 8), 1)  # soft labels (mixup / cutmix)
    np.testing.assert_allclose(src.targets(m).double().numpy(), m.double().numpy() @ table, atol=1e-6)
    assert src.loss_terms(logits, m)["ce"].item() == pytest.approx(dense.loss_terms(logits, m)["ce"].item(), rel=1e-5)


def test_sparse_proxy_files_are_checked(tmp_path):
    values, indices = top_k_rows(_c(), 3)
    path = tmp_path / "c.safetensors"
    save_topk_c_matrix(path, values, indices, 0.1, None)
    with pytest.raises(KDError, match="K=8 classes but the data set has 10"):
        load_proxy(path, num_classes=10)
    bad = tmp_path / "bad.safetensors"
    meta = {"format": "proxykd-c-matrix-topk-v1", "alpha": "0.1", "top_k": "3", "num_classes": "8"}
    save_file({"c_values": values}, str(bad), metadata=meta)
    with pytest.raises(KDError, match="without tensor 'c_indices'"):
        load_proxy(bad)
    bad2 = tmp_path / "bad2.safetensors"
    save_file({"c_values": values * 2, "c_indices": indices.int()}, str(bad2), metadata=meta)
    with pytest.raises(KDError, match="probability vectors"):
        load_proxy(bad2)
    # the dense form still loads as before
    from kd import cmatrix
    cmatrix.save_c_matrix(tmp_path / "d.safetensors", _c(), 0.1, [])
    assert type(load_proxy(tmp_path / "d.safetensors")) is ProxyTeacher


# ---- (c) the CLI end to end on digits -------------------------------------------------------

def test_cli_top_k_export_cache_and_distill(tmp_path, capsys):
    assert cli("train-teacher", "--method", "lspp", "--epochs", 1, "--out", tmp_path / "t", "--device", "cpu",
               "--quiet") == 0
    assert cli("proxy", "export", tmp_path / "t", "--top-k", 3, "--out", tmp_path / "p.safetensors") == 0
    assert cli("teacher", "cache", tmp_path / "t", "--top-k", 3, "--out", tmp_path / "c.safetensors",
               "--device", "cpu") == 0
    p = load_proxy(tmp_path / "p.safetensors", num_classes=10)
    assert isinstance(p, TopKProxy) and p.c_values.shape == (10, 3)
    assert isinstance(load_cache(tmp_path / "c.safetensors", "digits", num_classes=10), TopKCached)
    for spec, extra in ((f"proxy:{tmp_path}/p.safetensors", ()), (f"cached:{tmp_path}/c.safetensors", ("--no-augment",))):
        out = tmp_path / spec.split(":")[0]
        assert cli("distill", "--teacher", spec, "--student", "mlp", "--epochs", 1, "--out", out, "--device", "cpu",
                   "--quiet", *extra) == 0
        assert np.isfinite(json.loads((out / "summary.json").read_text())["test_nll"])
    capsys.readouterr()
    assert cli("proxy", "export", tmp_path / "t", "--top-k", 10, "--out", tmp_path / "x.safetensors") == 2
    assert cli("teacher", "cache", tmp_path / "t", "--top-k", 0, "--out", tmp_path / "y.safetensors") == 2
    err = capsys.readouterr().err
    assert "--top-k must lie in [1, K) = [1, 10), got 10" in err and "--top-k must lie in [1, K) = [1, 10), got 0" in err
    assert len(err.strip().splitlines()) == 2
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# ---- (d) the large-k benchmark ------------------------------------------------------------------

def test_run_large_k_rows_ratios_and_artifact_bytes():
    from benchmarks.large_k import run_large_k

    df = run_large_k(ks=(50, 300), steps=1, repeats=1, warmup=0, top_k=5, n_cached=400, log=None)
    assert list(zip(df.num_classes, df.source)) == [(k, s) for k in (50, 300)
                                                    for s in ("onehot", "proxy", "proxy-topk", "cached-topk")]
    assert (df[df.source == "onehot"].paired_ratio_vs_onehot == 1.0).all()
    assert (df[df.source == "onehot"].ratio_vs_onehot == 1.0).all()
    assert (df.preset == "large-k").all() and (df.student == "linear-512").all()
    files = df[df.source != "onehot"]
    assert (files.artifact_bytes > files.artifact_tensor_bytes).all() and (files.artifact_bytes_kind == "disk").all()
    for k in (50, 300):
        row = df[(df.num_classes == k)].set_index("source")
        assert row.loc["proxy", "artifact_tensor_bytes"] == 4 * k * k
        assert row.loc["proxy", "source_buffer_bytes"] == 2 * 4 * k * k  # the target table and C
        assert row.loc["proxy-topk", "artifact_tensor_bytes"] == k * 5 * (4 + 2)  # float32 values, int16 indices
        assert row.loc["cached-topk", "artifact_tensor_bytes"] == 400 * 5 * (2 + 2)  # float16 probs, int16 indices
        # the header (metadata: class names for the proxies) is all that the file adds
        assert row.loc["cached-topk", "artifact_bytes"] - row.loc["cached-topk", "artifact_tensor_bytes"] < 1000
    small = run_large_k(ks=(50,), steps=1, repeats=1, warmup=0, top_k=5, n_cached=400, log=None,
                        max_dense_bytes=4 * 50 * 50 - 1)
    assert small.source.tolist() == ["onehot", "proxy-topk", "cached-topk"]
    with pytest.raises(KDError, match="top_k must be below K"):
        run_large_k(ks=(5,), steps=1, repeats=1, warmup=0, top_k=5, log=None)


def test_lspp_large_k_reports_measured_and_analytic_costs():
    from benchmarks.large_k import lspp_large_k

    df = lspp_large_k(k=40, big_k=30000, steps=1, repeats=1, warmup=0, log=None)
    small = df[df.num_classes == 40].set_index("source")
    c = 4 * 40 * 39
    assert small.loc["lspp", "c_param_bytes"] == c and small.loc["lspp", "c_grad_bytes"] == c
    assert small.loc["lspp", "c_optimizer_bytes"] == c  # SGD momentum
    assert small.loc["onehot", "c_state_bytes"] == 0 and small.loc["onehot", "paired_ratio_vs_onehot"] == 1.0
    big = df[df.num_classes == 30000].iloc[0]
    assert not big.measured and np.isnan(big.step_ms_median)
    assert big.c_state_bytes == 3 * 4 * 30000 * 29999
