"""The LS++ loss ablation (the paper's Table 5 and Figure 6): LS++'s learned C, other losses.

Both sources keep LS++'s C parameterisation and its target t = (1 - alpha) onehot(y) + alpha C[y],
but drop its stop-gradients, so that the entropy of t is minimised through C:

    lspp-ce:  H(t, p)                          (Table 5 "Vanilla cross-entropy")
    lspp-sce: 1/2 [H(t, p) + H(p, t)]          (Table 5 "SCE-Original")

with H(a, b) = -sum a * log b, batch means, and every term updating both the network and C.
The paper reports that both losses collapse C's rows toward one-hot vectors (Figure 6); the
runs write ``c_matrix.safetensors`` as ``lspp`` does so that this can be looked at.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd import cmatrix, runs
from kd.errors import KDError
from kd.sources import SourceContext
from teachers.lspp import LSPPLoss


def log_mixed_targets(log_table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """B x K log t, differentiable in ``log_table`` (K x K log T with T = (1 - alpha) I + alpha C).

    Integer labels y: row y of log T. Float labels m (B x K, rows summing to 1, from mixup or
    cutmix): log(m @ T), computed as a logsumexp over the classes each row of m gives weight
    to, log m_j + log T[j], so that it stays exact where entries of T underflow in float32
    (a collapsed C). Only the support of m is gathered (two rows for mixup), not B x K x K;
    finding its size costs one host sync per batch.
    """
    if not labels.is_floating_point():
        return log_table.index_select(0, labels)
    m = labels.float()
    positive = (m > 0).sum(1)
    most, fewest, low = torch.stack([positive.max().float(), positive.min().float(), m.min()]).tolist()  # one sync
    if fewest < 1 or low < 0:
        raise KDError("soft labels must be non-negative with rows summing to 1; check the input mixing")
    weights, rows = m.topk(int(most), dim=1)  # B x r; rows of m with fewer classes pad with 0
    return torch.logsumexp(weights.log().unsqueeze(2) + log_table[rows], dim=1)  # log 0 = -inf adds nothing


def cross_entropies(logits: torch.Tensor, log_table: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch means of (H(t, p), H(p, t)), p = softmax(logits), t from :func:`log_mixed_targets`; no stop-gradients."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_t = log_mixed_targets(log_table, labels)
    forward = -(log_t.exp() * log_p).sum(1).mean()
    reverse = -(log_p.exp() * log_t).sum(1).mean()
    return forward, reverse


class _LSPPAblation(LSPPLoss):
    """LS++'s C and targets with a different loss: subclasses define :meth:`loss_terms`."""

    spec_arg = "[ALPHA]"
    label_only = True

    @classmethod
    def bench_rows(cls):
        """One `kd bench` row, the plain-autograd loss (there is no fused form)."""
        return {cls.name: {}}

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "_LSPPAblation":
        return cls(ctx.num_classes, cls.value(ctx, "alpha"))

    def __init__(self, num_classes: int, alpha: float = 0.1):
        super().__init__(num_classes, alpha, fused=False)

    def write_artifacts(self, run_dir, class_names, meta) -> None:
        """The learned C-matrix, as ``lspp`` writes it, with this loss named in its metadata."""
        cmatrix.save_c_matrix(run_dir / runs.C_MATRIX, self.c_matrix(), self.alpha, class_names,
                           {"source": f"{self.name}-learned", "dataset": str(meta.get("dataset", ""))})


class LSPPCrossEntropy(_LSPPAblation):
    """LS++ targets trained by H(t, p) alone, gradients into both the network and C.

    Soft labels m: t = m @ ((1 - alpha) I + alpha C), still differentiable in C. ``targets``
    (inherited) gives that t without gradient.
    """

    name = "lspp-ce"
    summary = ("LS++ ablation (paper Table 5, CE): H(t, p) trains both the network and C, "
               "no stop-gradient (--alpha, default 0.1)")

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        log_p = F.log_softmax(logits.float(), dim=1)
        log_t = log_mixed_targets(self.log_target_table(), labels)
        return {"lspp_ce": -(log_t.exp() * log_p).sum(1).mean()}


class LSPPSymmetricCrossEntropy(_LSPPAblation):
    """LS++ targets trained by 1/2 [H(t, p) + H(p, t)], both terms updating both the network and C.

    Soft labels m: t = m @ ((1 - alpha) I + alpha C) in both terms, with log t exact in log
    space (:func:`log_mixed_targets`). ``targets`` (inherited) gives that t without gradient.
    """

    name = "lspp-sce"
    summary = ("LS++ ablation (paper Table 5, SCE-Original): 1/2 [H(t, p) + H(p, t)], both terms train "
               "the network and C (--alpha, default 0.1)")

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        forward, reverse = cross_entropies(logits, self.log_target_table(), labels)
        return {"sce_forward": 0.5 * forward, "sce_reverse": 0.5 * reverse}
