"""Focal losses for calibration (Mukhoti et al., "Calibrating Deep Neural Networks using Focal Loss", NeurIPS 2020).

``fl-3``: l_i = -(1 - p_iy)^gamma log p_iy with the factor differentiated (their ``FocalLoss``);
``flsd-53``: the same with gamma_i = 5 if p_iy < 0.2 else 3, a constant per sample (their
``FocalLossAdaptive`` with ``--gamma 3``). The official code sums over the batch (and clips the
gradient norm at 2 in its training script); here the loss is the batch mean, like every other
source, and no clipping is applied.

Soft labels m (mixup): l_i = sum_k m_ik f(p_ik), with f the per-class focal term (and for
flsd-53 its gamma chosen from p_ik). For a mix of labels a and b with weight lam that is
lam l(a) + (1 - lam) l(b), the loss mixing of the mixup paper; a one-hot m gives the hard loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.sources import Option, TargetSource, label_matrix

_TINY = torch.finfo(torch.float32).tiny


def focal_terms(log_p: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """-(1 - p)^gamma log p elementwise, with 1 - p computed as -expm1(log p) (exact near p = 1).

    1 - p is floored at the smallest normal float so that gamma < 1 cannot give inf * 0 when p
    rounds to 1; the term and its gradient are 0 there anyway.
    """
    return -(-torch.expm1(log_p)).clamp_min(_TINY).pow(gamma) * log_p


class FocalLoss(TargetSource):
    """Focal loss with a fixed gamma (default 3: the paper's FL-3); see the module docstring."""

    name = "fl-3"
    summary = "focal loss -(1 - p_y)^gamma log p_y (Mukhoti et al. 2020; --gamma, default 3)"
    label_only = True
    options = (Option("gamma", "focusing exponent of (1 - p_y)", 3.0, low=0.0),)

    def __init__(self, num_classes: int, gamma: float = 3.0):
        super().__init__(num_classes)
        self.gamma = FocalLoss.option("gamma").check(gamma, self.name)

    def targets(self, labels, *, inputs=None, index=None):
        """onehot(y) (or m): focal loss reweights the CE against the labels, it has no other target."""
        return label_matrix(labels, self.num_classes)

    def _gamma(self, log_p: torch.Tensor) -> float | torch.Tensor:
        return self.gamma

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        log_p = F.log_softmax(logits.float(), dim=1)
        if labels.is_floating_point():
            per_class = focal_terms(log_p, self._gamma(log_p))
            return {"focal": (labels.float() * per_class).sum(1).mean()}
        log_py = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
        return {"focal": focal_terms(log_py, self._gamma(log_py)).mean()}


class AdaptiveFocalLoss(FocalLoss):
    """FLSD-53: gamma = 5 where p_y < 0.2, else 3, chosen from the detached probability; see the module docstring."""

    name = "flsd-53"
    summary = "sample-dependent focal loss: gamma 5 where p_y < 0.2, else 3 (Mukhoti et al. 2020)"
    options = ()

    def __init__(self, num_classes: int):
        super().__init__(num_classes, 3.0)

    def _gamma(self, log_p: torch.Tensor) -> torch.Tensor:
        p = log_p.detach().exp()
        return torch.where(p < 0.2, 5.0, 3.0)
