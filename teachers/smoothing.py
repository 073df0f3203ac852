"""Label smoothing: alpha spread uniformly over all K classes, as torch's ``label_smoothing``."""
from __future__ import annotations

from kd.sources import SourceContext, TableSource, fraction, smoothing_table, spec_number


class LabelSmoothing(TableSource):
    """Targets = (1 - alpha) * onehot(y) + alpha / K.

    Trained through the table (a row gather and the fused soft-target cross-entropy): equal in
    value to ``F.cross_entropy(..., label_smoothing=alpha)`` and cheaper than torch's
    label-smoothing path, which is not fused (benchmarks/step-cost.md, "Measurements behind
    implementation choices").
    """

    name = "ls"
    summary = "label smoothing: alpha spread uniformly over the K classes (ls:ALPHA or --alpha, default 0.1)"
    spec_arg = "[ALPHA]"
    label_only = True
    options = (fraction("alpha", "mass spread uniformly (ls:ALPHA also sets it)"),)

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "LabelSmoothing":
        return cls(ctx.num_classes, spec_number(arg, ctx, cls.option("alpha"), cls.name))

    def __init__(self, num_classes: int, alpha: float = 0.1):
        alpha = self.option("alpha").check(alpha, self.name)
        super().__init__(smoothing_table(num_classes, alpha))
        self.alpha = alpha
