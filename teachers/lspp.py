"""Label Smoothing++ (Section 3.2 of the paper): a learned K x K C-matrix of non-target targets.

For each class y the C logits hold K-1 values; their softmax, with a zero inserted at
position y, is row C[y]. The target is t = (1 - alpha) * onehot(y) + alpha * C[y], and

    loss = 1/2 * [ H(sg(t), p) + H(sg(p), t) ],   H(a, b) = -sum a * log b,

so the network is trained only by the first term and C only by the second. The paper's
equation has no 1/2; the authors' released code averages the two terms, and so do we.
Everything is computed in float32 and in log space (log t is exact, never log(t + eps)).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from kd.sources import TargetSource, proxy_table


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        from kd.errors import KDError

        raise KDError(f"alpha must lie in (0, 1), got {alpha}; LS++ uses 0.1 by default")
    return alpha


class LSPPLoss(TargetSource):
    """LS++ loss with its learnable C; the (K, K-1) logits are its only parameter."""

    def __init__(self, num_classes: int, alpha: float = 0.1):
        if num_classes < 2:
            raise ValueError("LS++ needs at least 2 classes")
        super().__init__(num_classes)
        self.alpha = _check_alpha(alpha)
        k = self.num_classes
        self.c_logits = nn.Parameter(torch.zeros(k, k - 1))
        # Off-diagonal positions in row-major order match the (K, K-1) layout row by row.
        self.register_buffer("_offdiag", ~torch.eye(k, dtype=torch.bool), persistent=False)

    def log_c_matrix(self) -> torch.Tensor:
        """K x K log C: log-softmax of each row's K-1 logits, -inf on the diagonal."""
        k = self.num_classes
        log_rows = F.log_softmax(self.c_logits.float(), dim=1)
        full = torch.full((k, k), -math.inf, device=log_rows.device, dtype=log_rows.dtype)
        return full.masked_scatter(self._offdiag, log_rows)

    def c_matrix(self) -> torch.Tensor:
        """The learned C-matrix, K x K probabilities: rows sum to 1, zero diagonal."""
        return self.log_c_matrix().exp()

    def log_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """B x K log t, differentiable with respect to the C logits."""
        log_c_rows = self.log_c_matrix()[labels]
        is_target = F.one_hot(labels, self.num_classes).bool()
        return torch.where(
            is_target,
            torch.full_like(log_c_rows, math.log1p(-self.alpha)),
            math.log(self.alpha) + log_c_rows,
        )

    def targets(self, labels, *, inputs=None, index=None):
        if labels.is_floating_point():  # soft labels m: m @ ((1 - alpha) I + alpha C)
            with torch.no_grad():
                return labels.float() @ proxy_table(self.c_matrix(), self.alpha)
        with torch.no_grad():
            return self.log_targets(labels).exp()

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if labels.is_floating_point():
            raise NotImplementedError("LS++ with soft (mixed) labels is not implemented")
        log_p = F.log_softmax(logits.float(), dim=-1)
        log_t = self.log_targets(labels)
        net_term = -(log_t.detach().exp() * log_p).sum(-1).mean()  # H(sg(t), p): trains the network
        c_term = -(log_p.detach().exp() * log_t).sum(-1).mean()  # H(sg(p), t): trains C
        return {"lspp_net": 0.5 * net_term, "lspp_c": 0.5 * c_term}

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scalar LS++ loss for a batch."""
        return sum(self.loss_terms(logits, labels).values())


def train_teacher(model: nn.Module, train_data, test_data, config=None, *, num_classes: int | None = None,
                  info=None, run_dir=None, meta=None, progress: bool = True, log=print):
    """Train ``model`` with ``config.method`` targets (LS++ by default) on (input, label) data.

    Returns the engine's FitResult: ``.model`` is the network teacher and, for LS++,
    ``.source.c_matrix()`` its learned C-matrix.
    """
    from kd.config import TrainConfig
    from kd.data import infer_num_classes
    from kd.engine import fit
    from teachers import label_source

    cfg = (config or TrainConfig()).validate()
    k = num_classes or (info.num_classes if info is not None else infer_num_classes(train_data))
    source = label_source(cfg.method, k, cfg.alpha)
    return fit(model, source, train_data, test_data, cfg, info=info, run_dir=run_dir, meta=meta,
               progress=progress, log=log)
