"""Online label smoothing: loss and gradient, the matrix S across epochs, resume and two processes.

Every check compares with a float64 numpy computation of the definition written here, apart
from the source: l = 0.5 CE(y, p) + 0.5 H(S[y], p); S[c] = mean p over the previous epoch's
correctly classified class-c samples, uniform 1/K where there were none, zero before epoch 1.
"""
import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, Killed, kill_after
from kd import runs
from kd.app.jobs import train_teacher_job
from kd.config import TrainConfig
from kd.errors import KDError
from teachers import SOURCES, label_methods, make_source
from teachers.ols import OnlineLabelSmoothing


def identity(t):
    return t


# --- the reference, float64 numpy with plain loops -----------------------------------------

def ref_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        m = z[i].max()
        out[i] = z[i] - m - np.log(np.exp(z[i] - m).sum())
    return out


def ref_loss_and_grad(z, targets_ce, targets_s):
    """mean_i [0.5 H(a_i, p_i) + 0.5 H(b_i, p_i)] and its gradient in the logits, b_i = S-part.

    d/dz of -sum_j t_j log p_j is (sum_j t_j) p - t for any non-negative t.
    """
    log_p = ref_log_softmax(z)
    p = np.exp(log_p)
    b, k = log_p.shape
    ce, sm, grad = 0.0, 0.0, np.zeros((b, k))
    for i in range(b):
        for j in range(k):
            ce -= targets_ce[i][j] * log_p[i, j]
            sm -= targets_s[i][j] * log_p[i, j]
        for t in (targets_ce[i], targets_s[i]):
            grad[i] += 0.5 * (np.sum(t) * p[i] - np.asarray(t)) / b
    return 0.5 * ce / b, 0.5 * sm / b, grad


def ref_matrix(epoch_batches, k):
    """S after an epoch: per class, mean softmax of the correctly classified samples, else 1/K."""
    sums, counts = np.zeros((k, k)), np.zeros(k)
    for logits, labels in epoch_batches:
        p = np.exp(ref_log_softmax(logits))
        for i, y in enumerate(labels):
            y = int(np.argmax(y)) if np.ndim(y) else int(y)
            if int(np.argmax(p[i])) == y:
                sums[y] += p[i]
                counts[y] += 1
    s = np.full((k, k), 1.0 / k)
    for c in range(k):
        if counts[c] > 0:
            s[c] = sums[c] / counts[c]
    return s


def random_stochastic(k, seed):
    rng = np.random.default_rng(seed)
    m = rng.random((k, k)) + 0.05
    return m / m.sum(1, keepdims=True)


# --- (1) loss value and gradient for a given S ----------------------------------------------

def test_registered_as_a_label_only_stateful_source():
    assert SOURCES["ols"] is OnlineLabelSmoothing and "ols" in label_methods()
    src = make_source("ols", 10, label_only=True, alpha=None)
    assert OnlineLabelSmoothing.observes_steps and src.options == ()
    assert torch.equal(src.table, torch.zeros(10, 10))
    with pytest.raises(KDError, match="takes no argument"):
        make_source("ols", 10, arg="0.3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_the_float64_reference(dtype):
    k, b = 5, 7
    s = random_stochastic(k, 0)
    s[2] = 1.0 / k  # a uniform row, as a class with no correct sample gets
    src = OnlineLabelSmoothing(k)
    src.table.copy_(torch.tensor(s, dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(b, k, generator=g) * 2).to(dtype).requires_grad_(True)
    y = torch.tensor([0, 2, 4, 1, 2, 3, 0])
    terms = src.loss_terms(z, y)
    assert set(terms) == {"ce", "ols"} and all(v.dtype == torch.float32 for v in terms.values())
    (terms["ce"] + terms["ols"]).backward()

    zn = z.detach().double().numpy()
    onehot = [np.eye(k)[int(c)] for c in y]
    ce, sm, grad = ref_loss_and_grad(zn, onehot, [s[int(c)] for c in y])
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["ols"].item() == pytest.approx(sm, rel=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient itself is rounded to bf16
    np.testing.assert_allclose(z.grad.double().numpy(), grad, atol=tol)
    # targets() is what the loss is the cross-entropy against: 0.5 onehot + 0.5 S[y]
    t = src.targets(y).double().numpy()
    np.testing.assert_allclose(t, 0.5 * np.array(onehot) + 0.5 * s[y.numpy()], atol=1e-7)
    assert -(t * ref_log_softmax(zn)).sum(1).mean() == pytest.approx(ce + sm, rel=1e-6)


def test_soft_labels_mix_both_parts_and_count_by_the_larger_weight():
    k = 4
    s = random_stochastic(k, 3)
    src = OnlineLabelSmoothing(k)
    src.table.copy_(torch.tensor(s, dtype=torch.float32))
    # Rows: 0.7 of class 1 + 0.3 of class 2 (prediction 1: counted in row 1);
    #       0.6 of class 0 + 0.4 of class 3 (prediction 3, the smaller weight: not counted);
    #       0.5 / 0.5 is not used: argmax of a tie is ambiguous.
    m = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.6, 0.0, 0.0, 0.4], [0.0, 0.0, 0.8, 0.2]])
    z = torch.tensor([[0.1, 2.0, 1.0, -1.0], [0.3, -0.5, 0.0, 1.5], [1.0, 0.2, 0.9, 0.0]], requires_grad=True)
    terms = src.loss_terms(z, m)
    (terms["ce"] + terms["ols"]).backward()
    mn = m.double().numpy()
    ce, sm, grad = ref_loss_and_grad(z.detach().double().numpy(), list(mn), list(mn @ s))
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["ols"].item() == pytest.approx(sm, rel=1e-6)
    np.testing.assert_allclose(z.grad.double().numpy(), grad, atol=1e-6)
    np.testing.assert_allclose(src.targets(m).double().numpy(), 0.5 * mn + 0.5 * mn @ s, atol=1e-7)

    src.on_step(z.detach(), m)
    p = np.exp(ref_log_softmax(z.detach().double().numpy()))
    np.testing.assert_allclose(src.counts.numpy(), [0, 1, 0, 0])
    np.testing.assert_allclose(src.sums.double().numpy()[1], p[0], atol=1e-6)
    assert src.sums[[0, 2, 3]].abs().sum() == 0
    src.on_epoch_end(identity)
    np.testing.assert_allclose(src.table.double().numpy(), ref_matrix([(z.detach().numpy(), mn)], k), atol=1e-6)


# --- (2) the matrix after known batches and epochs ------------------------------------------

def test_matrix_follows_the_definition_over_batches_and_epochs():
    k = 4
    g = torch.Generator().manual_seed(5)
    # Labels are chosen so that class 3 is never predicted correctly in epoch 1 (its rows are
    # pushed towards class 0), and some samples of other classes are wrong too.
    def batch(labels, wrong_to=None):
        y = torch.tensor(labels)
        z = torch.randn(len(labels), k, generator=g)
        z[torch.arange(len(labels)), y] += 3.0
        if wrong_to is not None:
            for i, w in wrong_to.items():
                z[i, w] += 10.0
        return z, y

    epoch1 = [batch([0, 1, 3, 2, 1], {2: 0, 4: 2}), batch([3, 0, 0, 2], {0: 1}), batch([1, 1, 2, 3], {3: 2})]
    epoch2 = [batch([3, 3, 0, 2, 1, 1], {1: 0}), batch([0, 2, 2], {0: 3, 1: 3, 2: 3})]
    src = OnlineLabelSmoothing(k)
    for z, y in epoch1:
        terms = src.loss_terms(z, y)
        assert terms["ols"].item() == 0.0  # S is zero throughout epoch 1
        src.on_step(z, y)
    assert src.counts[3] == 0 and src.counts.sum() < sum(len(y) for _, y in epoch1)  # wrong ones not counted
    src.on_epoch_end(identity)
    s1 = ref_matrix([(z.numpy(), y.numpy()) for z, y in epoch1], k)
    np.testing.assert_allclose(s1[3], 0.25)  # the reference agrees the row is uniform
    np.testing.assert_allclose(src.table.double().numpy(), s1, atol=1e-6)
    assert src.counts.sum() == 0 and src.sums.abs().sum() == 0  # accumulators reset

    for z, y in epoch2:  # S stays epoch 1's during epoch 2, and the loss uses it
        terms = src.loss_terms(z, y)
        _, sm, _ = ref_loss_and_grad(z.double().numpy(), [np.eye(k)[c] for c in y], [s1[c] for c in y])
        assert terms["ols"].item() == pytest.approx(sm, rel=1e-6)
        src.on_step(z, y)
        np.testing.assert_allclose(src.table.double().numpy(), s1, atol=1e-6)
    src.on_epoch_end(identity)
    s2 = ref_matrix([(z.numpy(), y.numpy()) for z, y in epoch2], k)  # epoch 2's statistics only
    np.testing.assert_allclose(src.table.double().numpy(), s2, atol=1e-6)
    assert not np.allclose(s1, s2)


def test_epoch_end_reduces_before_averaging():
    """A stand-in all_reduce that adds a second rank's statistics: S must be the pooled means."""
    k = 3
    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    a = OnlineLabelSmoothing(k)
    a.on_step(z, y)
    other = torch.cat([torch.zeros(k * k), torch.tensor([0.0, 0.0, 2.0])])  # the other rank: two class-2 samples
    other[2 * k: 3 * k] = torch.tensor([0.2, 0.2, 1.6])  # and the sum of their p

    def add_other(t):
        t.add_(other)
        return t

    a.on_epoch_end(add_other)
    p = np.exp(ref_log_softmax(z.numpy()))
    expect = np.array([(p[0] + p[2]) / 2, p[1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(a.table.double().numpy(), expect, atol=1e-6)


# --- (3) S starts at zero -------------------------------------------------------------------

def test_epoch_one_loss_is_exactly_half_the_cross_entropy():
    src = OnlineLabelSmoothing(10)
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    terms = src.loss_terms(z, y)
    assert torch.equal(terms["ce"] + terms["ols"], 0.5 * F.cross_entropy(z, y))
    assert terms["ols"].item() == 0.0


# --- (4) through the CLI, and resume ----------------------------------------------------------

def test_cli_trains_a_teacher_with_both_terms_logged(tmp_path, kd_main):
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "ols", "--epochs", "3", "--device", "cpu", "--quiet",
                           "--out", out)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 and {"loss_ce", "loss_ols"} <= set(rows[0])
    assert float(rows[0]["loss_ols"]) == 0.0  # S is zero in epoch 1
    # afterwards S has rows summing to 1, so the term is at least 0.5 * entropy > 0
    assert all(float(r["loss_ols"]) > 0.1 for r in rows[1:])


def test_resumed_ols_run_equals_the_uninterrupted_one(tmp_path):
    cfg = TrainConfig(method="ols", epochs=4, batch_size=64, device="cpu")
    straight = train_teacher_job(cfg, tmp_path / "straight", progress=False, log=None)
    with pytest.raises(Killed):
        train_teacher_job(cfg, tmp_path / "killed", progress=False, log=kill_after(2))
    state = runs.load_checkpoint(tmp_path / "killed" / runs.CHECKPOINT)["source"]
    assert set(state) == {"table"} and torch.allclose(state["table"].sum(1), torch.ones(10))
    resumed = train_teacher_job(cfg, tmp_path / "killed", progress=False, log=None, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert torch.equal(resumed.source.table, straight.source.table)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss_ols"] for h in resumed.history] == [h["loss_ols"] for h in straight.history]


def test_load_checkpoint_state_refuses_a_matrix_of_the_wrong_size():
    with pytest.raises(KDError, match="K=10"):
        OnlineLabelSmoothing(10).load_checkpoint_state({"table": torch.zeros(4, 4)})


# --- (5) two processes ------------------------------------------------------------------------

RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from kd.app.cli import finish, main
from teachers.ols import OnlineLabelSmoothing

seen = {{}}
plain_epoch_end = OnlineLabelSmoothing.on_epoch_end


def recording_epoch_end(self, all_reduce):
    # keep this rank's own statistics of the epoch, taken before the all-reduce
    seen.update(sums=self.sums.clone(), counts=self.counts.clone(), source=self)
    plain_epoch_end(self, all_reduce)


OnlineLabelSmoothing.on_epoch_end = recording_epoch_end
code = main(sys.argv[1:])  # what `python -m kd ...` runs, and how it ends
save_file({{"table": seen["source"].table, "sums": seen["sums"], "counts": seen["counts"]}},
          os.path.join({out!r}, "rank%s.safetensors" % os.environ["RANK"]))
finish(code)
"""


def test_two_processes_share_one_matrix_pooled_over_both_ranks(tmp_path):
    """`kd train-teacher --method ols` under torchrun (through the CLI's main, as `python -m kd`),
    each rank saving its S and its own last-epoch statistics for the comparison."""
    out = tmp_path / "run"
    script = tmp_path / "ols_ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT).format(root=str(ROOT), out=str(tmp_path)))
    # no warm-up: more classes are learnt in 2 epochs, so more rows of S are pooled means
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "train-teacher",
           "--method", "ols", "--epochs", "2", "--batch-size", "64", "--warmup-epochs", "0", "--device", "cpu",
           "--quiet", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ols teacher") == 1  # only rank 0 reports
    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2 and s["method"] == "ols"
    assert {"loss_ce", "loss_ols"} <= set(next(csv.DictReader((out / "metrics.csv").open())))

    r0, r1 = (load_file(str(tmp_path / f"rank{i}.safetensors")) for i in (0, 1))
    assert torch.equal(r0["table"], r1["table"])  # every rank holds the same S
    assert not torch.equal(r0["counts"], r1["counts"])  # the ranks did see different samples
    sums = r0["sums"].double().numpy() + r1["sums"].double().numpy()
    counts = r0["counts"].double().numpy() + r1["counts"].double().numpy()
    k = counts.shape[0]
    pooled = np.array([sums[c] / counts[c] if counts[c] > 0 else np.full(k, 1.0 / k) for c in range(k)])
    np.testing.assert_allclose(r0["table"].double().numpy(), pooled, atol=1e-6)
    local = np.array([r0["sums"][c].double().numpy() / r0["counts"][c].item() if r0["counts"][c] > 0
                      else np.full(k, 1.0 / k) for c in range(k)])
    assert not np.allclose(local, pooled, atol=1e-6)  # one rank's means alone would not do
