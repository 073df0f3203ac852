"""Online Label Smoothing (OLS; Zhang et al., "Delving Deep into Label Smoothing", IEEE TIP 2021).

The soft target of class y is S[y], a K x K matrix rebuilt after every epoch from the network's
own training predictions. Per sample of class y with p = softmax(logits):

    l = 0.5 * CE(y, p) + 0.5 * H(S[y], p),    H(a, b) = -sum_j a_j log b_j,

averaged over the batch. During epoch e, every training sample the network classifies correctly
(argmax p = y, p from the training forward, detached) adds p to row y of a sum and 1 to the
count of class y; at the end of the epoch row y of S becomes sum[y] / count[y], and a class with
no correctly classified sample gets the uniform row 1/K. S starts at zero, so epoch 1 trains
with 0.5 CE alone. This follows the authors' CIFAR script (``cifar/scripts/train_cifar_all_methods.py``
in zhangchbin/OnlineLabelSmoothing, ``--method ols``): the 0.5 / 0.5 weights are fixed there (its
``--olsalpha`` flag is never read), so this source takes no options.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kd.errors import KDError
from kd.sources import SourceContext, TargetSource, label_matrix


class OnlineLabelSmoothing(TargetSource):
    """OLS: loss terms ``ce`` = 0.5 CE and ``ols`` = 0.5 H(S[y], p), S the previous epoch's statistics.

    Soft labels m (B x K rows summing to 1, from mixup / cutmix): ``ce`` = 0.5 H(m, p) and
    ``ols`` = 0.5 H(m @ S, p), i.e. each label's target mixed with the weights of m; the
    statistics count a sample as correct when argmax p = argmax m (the label with the larger
    mixing weight) and add p to that label's row.

    State: buffers ``table`` (S), ``sums`` (K x K) and ``counts`` (K). The engine feeds
    :meth:`on_step` the detached logits of every training step and calls :meth:`on_epoch_end`
    after every epoch, which sums the statistics over processes before averaging, so every
    rank holds the same S.
    """

    name = "ols"
    summary = ("online label smoothing: 0.5 CE + 0.5 CE against S[y], row y of S the mean softmax of the "
               "previous epoch's correctly classified class-y samples (no options)")
    label_only = True
    observes_steps = True

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError("online label smoothing needs at least 2 classes")
        super().__init__(num_classes)
        k = self.num_classes
        self.register_buffer("table", torch.zeros(k, k))   # S: zero until the first epoch ends
        self.register_buffer("sums", torch.zeros(k, k))    # this epoch: sum of p over correct samples, by class
        self.register_buffer("counts", torch.zeros(k))     # this epoch: number of correct samples, by class

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "OnlineLabelSmoothing":
        """For `kd bench`: a random row-stochastic S, as after the first epoch."""
        source = cls(ctx.num_classes)
        g = torch.Generator().manual_seed(0)
        source.table.copy_(torch.rand(source.num_classes, source.num_classes, generator=g).softmax(1))
        return source

    def _soft_table(self, labels: torch.Tensor) -> torch.Tensor:
        """S[y] for integer labels, m @ S for soft labels m: B x K."""
        if labels.is_floating_point():
            return labels.float() @ self.table
        return self.table.index_select(0, labels)

    def targets(self, labels, *, inputs=None, index=None):
        """0.5 onehot(y) + 0.5 S[y] (0.5 m + 0.5 m @ S for soft labels): the loss is CE against it."""
        with torch.no_grad():
            hard = label_matrix(labels, self.num_classes)
            return 0.5 * hard + 0.5 * self._soft_table(labels)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        log_p = F.log_softmax(logits.float(), dim=1)
        if labels.is_floating_point():
            ce = -(labels.float() * log_p).sum(1).mean()
        else:
            ce = F.nll_loss(log_p, labels)
        smooth = -(self._soft_table(labels) * log_p).sum(1).mean()
        return {"ce": 0.5 * ce, "ols": 0.5 * smooth}

    @torch.no_grad()
    def on_step(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add softmax(logits) of the correctly classified samples to their class's row; count them.

        Masks by multiplying instead of selecting, so no host synchronisation on a GPU.
        """
        p = logits.float().softmax(1)
        hard = labels.argmax(1) if labels.is_floating_point() else labels
        correct = (p.argmax(1) == hard).to(p.dtype)
        self.sums.index_add_(0, hard, p * correct[:, None])
        self.counts.index_add_(0, hard, correct)

    @torch.no_grad()
    def on_epoch_end(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the statistics over processes (one collective), set S to the class means, reset them."""
        k = self.num_classes
        flat = torch.cat([self.sums.reshape(-1), self.counts])
        all_reduce(flat)
        sums, counts = flat[: k * k].view(k, k), flat[k * k:]
        means = sums / counts.clamp_min(1.0)[:, None]
        self.table.copy_(torch.where(counts[:, None] > 0, means, torch.full_like(means, 1.0 / k)))
        self.sums.zero_()
        self.counts.zero_()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """S alone: the engine checkpoints right after :meth:`on_epoch_end`, when the statistics are
        zero, and only rank 0 writes the checkpoint, so rank-local statistics would be wrong to keep."""
        return {"table": self.table.detach().clone()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore S and start the epoch's statistics from zero."""
        table = state.get("table")
        if table is None or tuple(table.shape) != tuple(self.table.shape):
            got = "none" if table is None else f"shape {tuple(table.shape)}"
            raise KDError(f"the checkpoint's OLS matrix ({got}) does not fit K={self.num_classes}; start the run anew")
        with torch.no_grad():
            self.table.copy_(table)
            self.sums.zero_()
            self.counts.zero_()
