"""The 1-hot source: targets are the labels themselves."""
from __future__ import annotations

import torch.nn.functional as F

from kd.sources import TargetSource, label_matrix


class OneHot(TargetSource):
    """Targets = onehot(y). Integer labels take torch's fused cross-entropy.

    No K x K table is held (an identity would take 1.9 GB at K = 21,841): integer labels go
    straight to the fused cross-entropy and soft labels m are their own targets.
    """

    name = "onehot"
    summary = "the labels themselves (plain cross-entropy)"
    label_only = True

    def __init__(self, num_classes: int):
        super().__init__(num_classes)

    def targets(self, labels, *, inputs=None, index=None):
        return label_matrix(labels, self.num_classes)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if labels.is_floating_point():
            return super().loss_terms(logits, labels)
        return {"ce": F.cross_entropy(logits.float(), labels)}
