"""Margin-based label smoothing (Liu et al., "The Devil is in the Margin: Margin-based Label Smoothing
for Network Calibration", CVPR 2022): CE plus a hinge on the gaps between the largest logit and the others.

Follows the official ``LogitMarginL1``, whose ``.mean()`` runs over all B*K gaps: that is the
batch mean of the per-sample sum divided by K.
"""
from __future__ import annotations

import torch.nn.functional as F

from kd.losses import soft_cross_entropy
from kd.sources import Option, TargetSource, label_matrix


class MarginLabelSmoothing(TargetSource):
    """l_i = CE_i + (alpha / K) sum_k relu(max_j z_ij - z_ik - margin); the max is not detached.

    The margin term uses no label, so soft labels m (mixup) change only the CE, which becomes
    the soft CE with m.
    """

    name = "mbls"
    summary = ("margin-based label smoothing: CE + alpha/K sum relu(max logit - logit - margin) "
               "(Liu et al. 2022; --alpha 0.1, --margin 10)")
    label_only = True
    options = (Option("alpha", "weight of the logit-margin penalty", 0.1, low=0.0, low_open=True),
               Option("margin", "logit gaps to the largest logit up to this are free", 10.0, low=0.0))

    def __init__(self, num_classes: int, alpha: float = 0.1, margin: float = 10.0):
        super().__init__(num_classes)
        self.alpha = self.option("alpha").check(alpha, self.name)
        self.margin = self.option("margin").check(margin, self.name)

    def targets(self, labels, *, inputs=None, index=None):
        """onehot(y) (or m): the CE's target; the margin term has no target distribution."""
        return label_matrix(labels, self.num_classes)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        z = logits.float()
        ce = soft_cross_entropy(z, labels) if labels.is_floating_point() else F.cross_entropy(z, labels)
        gaps = z.max(dim=1, keepdim=True).values - z
        return {"ce": ce, "margin": self.alpha * F.relu(gaps - self.margin).mean()}
