"""The 1-hot source: targets are the labels themselves."""
from __future__ import annotations

import torch.nn.functional as F

from kd.sources import TableSource, one_hot_table


class OneHot(TableSource):
    """Targets = onehot(y). Integer labels take torch's fused cross-entropy."""

    name = "onehot"
    summary = "the labels themselves (plain cross-entropy)"
    label_only = True

    def __init__(self, num_classes: int):
        super().__init__(one_hot_table(num_classes))

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if labels.is_floating_point():
            return super().loss_terms(logits, labels)
        return {"ce": F.cross_entropy(logits.float(), labels)}
