"""Zipf's label smoothing (Liang et al., "Efficient One Pass Self-distillation with Zipf's Label Smoothing", ECCV 2022).

The non-target classes get a Zipf distribution over the ranks of the model's own (detached)
logits, and the network's non-target softmax is pulled towards it. This follows the official
``gen_pdf`` without ``--dense``; the dense variant ranks classes by per-pixel votes, needs
spatial logits that a classifier here does not expose, and is left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.errors import KDError
from kd.losses import soft_cross_entropy
from kd.sources import Option, TargetSource, label_matrix


def zipf_ranks(logits: torch.Tensor) -> torch.Tensor:
    """B x K ranks of each row, 1 for the largest; ties share the smallest rank ([3, 1, 3, 0] -> [1, 3, 1, 4])."""
    ascending = logits.sort(dim=1).values
    not_above = torch.searchsorted(ascending, logits.contiguous(), right=True)  # how many logits are <= each one
    return logits.shape[1] - not_above + 1


class ZipfLabelSmoothing(TargetSource):
    """l_i = CE_i + alpha KL(P_i || q_i), over the K-1 non-target classes of sample i.

    P: d_k = rank_k^(-power) (ranks of the detached logits), the target dropped and the rest
    renormalised; q: the softmax of the K-1 non-target logits. Soft labels m (mixup): CE is the
    soft CE with m and the KL term takes m.argmax(1) (the label with the larger weight) as target.
    """

    name = "zipf-ls"
    summary = ("Zipf's label smoothing: CE + alpha KL(Zipf over the logits' ranks || non-target softmax) "
               "(Liang et al. 2022; --alpha 0.1, --power 1)")
    label_only = True
    options = (Option("alpha", "weight lambda of the Zipf KL term", 0.1, low=0.0, low_open=True),
               Option("power", "Zipf exponent: the non-target class of rank r gets r^-power before renormalising",
                      1.0, low=0.0, low_open=True))

    def __init__(self, num_classes: int, alpha: float = 0.1, power: float = 1.0):
        if num_classes < 2:
            raise KDError(f"zipf-ls needs at least 2 classes, got {num_classes}")
        super().__init__(num_classes)
        self.alpha = self.option("alpha").check(alpha, self.name)
        self.power = self.option("power").check(power, self.name)
        k = self.num_classes
        offdiag = ~torch.eye(k, dtype=torch.bool)
        # Row y: the K-1 classes other than y, in order.
        self.register_buffer("_other_cols", torch.arange(k).expand(k, k)[offdiag].view(k, k - 1), persistent=False)

    def _hard(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.argmax(1) if labels.is_floating_point() else labels

    def _log_zipf(self, z: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log P over the non-target columns ``cols`` (B x (K-1)), from the ranks of the detached logits."""
        ranks = zipf_ranks(z.detach()).gather(1, cols).float()
        return F.log_softmax(-self.power * ranks.log(), dim=1)

    def targets(self, labels, *, inputs=None, index=None):
        """Needs the logits, which targets() does not get: returns the label alone (onehot(y) or m).

        The KL pulls the non-target softmax towards P; :meth:`zipf_targets` gives that target
        for a batch of logits.
        """
        return label_matrix(labels, self.num_classes)

    def zipf_targets(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(y + alpha P) / (1 + alpha), P zero on the target: the mixture the CE and KL terms pull towards."""
        with torch.no_grad():
            z = logits.float()
            y = self._hard(labels)
            cols = self._other_cols.index_select(0, y)
            p_full = torch.zeros_like(z).scatter_(1, cols, self._log_zipf(z, cols).exp())
            return (self.targets(labels) + self.alpha * p_full) / (1.0 + self.alpha)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        z = logits.float()
        if labels.is_floating_point():
            ce = soft_cross_entropy(z, labels)
        else:
            ce = F.cross_entropy(z, labels)
        cols = self._other_cols.index_select(0, self._hard(labels))
        log_p = self._log_zipf(z, cols)
        log_q = F.log_softmax(z.gather(1, cols), dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
        return {"ce": ce, "zipf_kl": self.alpha * kl}
