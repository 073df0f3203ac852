"""Label smoothing: alpha spread uniformly over all K classes, as torch's ``label_smoothing``."""
from __future__ import annotations

from kd.sources import TableSource, fused_label_cross_entropy, smoothing_table


class LabelSmoothing(TableSource):
    """Targets = (1 - alpha) * onehot(y) + alpha / K."""

    def __init__(self, num_classes: int, alpha: float = 0.1):
        super().__init__(smoothing_table(num_classes, alpha))
        self.alpha = float(alpha)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if labels.is_floating_point():
            return super().loss_terms(logits, labels)
        return {"ce": fused_label_cross_entropy(logits, labels, self.alpha)}
