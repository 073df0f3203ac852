"""Teacher-free KD (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020).

``tfkd-reg`` is their label-only regulariser with a hand-made "virtual teacher"
(``loss_kd_regularization``); ``tfkd-self:RUN_DIR`` distils a trained run at temperature T
(``loss_kd_self``). Both keep the official scale: its ``nn.KLDivLoss()`` averages over all
B*K entries, i.e. the batch mean of the per-sample KL divided by K (the 1/K below).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from kd.errors import KDError
from kd.losses import soft_cross_entropy
from kd.sources import Option, SourceContext, TargetSource, fraction, label_matrix
from teachers.network import TEACHER_OPTIONS, NetworkTeacher, load_checked_teacher

#: p^d: the virtual teacher's probability on the true class (the official ``correct_prob``).
CORRECT_PROB = 0.99


def _options(alpha: float, temperature: float, multiplier: float, what: str) -> tuple[Option, ...]:
    """Tf-KD's three options with one variant's defaults."""
    return (fraction("alpha", f"weight of the {what} KL, (1 - alpha) on CE", alpha),
            Option("temperature", f"temperature of the {what} softmax", temperature, low=0.0, low_open=True),
            Option("multiplier", f"scale of the {what} KL", multiplier, low=0.0, low_open=True))


def _checked(cls, alpha, temperature, multiplier) -> tuple[float, float, float]:
    return tuple(cls.option(n).check(v, cls.name) for n, v in
                 (("alpha", alpha), ("temperature", temperature), ("multiplier", multiplier)))


def _label_ce(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean CE of float32 logits ``z``: integer labels, or soft labels m (soft CE)."""
    if labels.is_floating_point():
        return soft_cross_entropy(z, labels)
    return F.cross_entropy(z, labels)


class TfKDRegularization(TargetSource):
    """Tf-KD_reg: l_i = (1 - alpha) CE_i + (alpha * multiplier / K) KL(q_i || p_i).

    q = softmax(p^d / T), p^d = 0.99 on y and 0.01/(K-1) elsewhere (T divides a probability
    vector; the student is not temperature-scaled; no T^2), as in the official code.
    Soft labels m (mixup): p^d = 0.99 m + 0.01/(K-1) (1 - m), which is the same vector for a
    one-hot m and spreads the 0.99 over the mixed classes in proportion; CE uses m (soft CE).
    """

    name = "tfkd-reg"
    summary = ("Tf-KD regularisation: (1 - alpha) CE + alpha*multiplier/K KL(virtual teacher || p) "
               "(Yuan et al. 2020; --alpha 0.1, --temperature 20, --multiplier 100)")
    label_only = True
    options = _options(0.1, 20.0, 100.0, "virtual-teacher")

    def __init__(self, num_classes: int, alpha: float = 0.1, temperature: float = 20.0, multiplier: float = 100.0):
        if num_classes < 2:
            raise KDError(f"tfkd-reg needs at least 2 classes, got {num_classes}")
        super().__init__(num_classes)
        self.alpha, self.temperature, self.multiplier = _checked(type(self), alpha, temperature, multiplier)
        self.kl_weight = self.alpha * self.multiplier / self.num_classes

    def virtual_teacher(self, labels: torch.Tensor) -> torch.Tensor:
        """q = softmax(p^d / T), B x K, from integer labels or soft labels m (see the class docstring)."""
        k = self.num_classes
        other = (1.0 - CORRECT_PROB) / (k - 1)
        m = label_matrix(labels, k)
        p_d = CORRECT_PROB * m + other * (1.0 - m)
        return F.softmax(p_d / self.temperature, dim=1)

    def targets(self, labels, *, inputs=None, index=None):
        """t = ((1 - alpha) y + w q) / (1 - alpha + w), w = alpha * multiplier / K.

        The loss equals (1 - alpha + w) H(t, p) minus a constant, so t is exactly the
        distribution its gradient pulls p towards.
        """
        with torch.no_grad():
            y = label_matrix(labels, self.num_classes)
            w = self.kl_weight
            return ((1.0 - self.alpha) * y + w * self.virtual_teacher(labels)) / (1.0 - self.alpha + w)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        z = logits.float()
        q = self.virtual_teacher(labels)
        kl = (q * (q.log() - F.log_softmax(z, dim=1))).sum(1).mean()
        return {"ce": (1.0 - self.alpha) * _label_ce(z, labels), "tfkd_reg": self.kl_weight * kl}


class _LinearStandIn(nn.Module):
    """A fixed random linear map of the flattened input, shaped by the first batch (`kd bench` stand-in)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        if self.weight is None:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(flat.shape[1], self.num_classes, generator=g) / math.sqrt(flat.shape[1])
            self.weight = w.to(flat.device, flat.dtype)
        return flat @ self.weight.to(flat.dtype)


class TfKDSelf(NetworkTeacher):
    """Tf-KD_self: l_i = (1 - alpha) CE_i + (alpha T^2 multiplier / K) KL(softmax(t_i/T) || softmax(z_i/T)).

    t are the logits of a frozen teacher run (eval mode, no gradient). Yuan et al. pre-train the
    same architecture on the same data; here any finished `kd train-teacher` run of the data set
    works. Soft labels m (mixup): the CE part is the soft CE with m; the KD part needs no label.
    """

    name = "tfkd-self"
    summary = ("Tf-KD self-training: (1 - alpha) CE + alpha*T^2*multiplier/K KL at temperature T to a trained run "
               "(tfkd-self:RUN_DIR; --alpha 0.95, --temperature 6, --multiplier 50)")
    spec_arg = "RUN_DIR|MODEL@FILE"
    label_only = False
    needs_inputs = True
    options = _options(0.95, 6.0, 50.0, "distillation") + TEACHER_OPTIONS

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "TfKDSelf":
        t = load_checked_teacher(cls.name, arg, ctx)
        return cls(t.model, ctx.num_classes, *(cls.value(ctx, n) for n in ("alpha", "temperature", "multiplier")),
                   t.affine, t.class_index)

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "TfKDSelf":
        """The bench's teacher model when it built one (its ``network`` row), else a random linear teacher."""
        teacher = ctx.teacher_model if ctx.teacher_model is not None else _LinearStandIn(ctx.num_classes)
        return cls(teacher, ctx.num_classes, *(cls.value(ctx, n) for n in ("alpha", "temperature", "multiplier")))

    def __init__(self, teacher: nn.Module, num_classes: int, alpha: float = 0.95, temperature: float = 6.0,
                 multiplier: float = 50.0, input_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
                 class_index: torch.Tensor | None = None):
        alpha, temperature, multiplier = _checked(type(self), alpha, temperature, multiplier)
        super().__init__(teacher, num_classes, temperature, 0.0, input_affine, class_index)
        self.alpha, self.multiplier = alpha, multiplier
        self.kl_weight = alpha * temperature * temperature * multiplier / self.num_classes

    def targets(self, labels, *, inputs=None, index=None):
        """(1 - alpha) y + alpha softmax(t / T): the two distributions the loss pulls towards, at their
        nominal weights. The KD part acts at temperature T, so no single target gives the loss exactly."""
        if inputs is None:
            raise ValueError("a tfkd-self teacher needs the batch inputs")
        y = label_matrix(labels, self.num_classes)
        soft = F.softmax(self.teacher_logits(inputs) / self.temperature, dim=1)
        return (1.0 - self.alpha) * y + self.alpha * soft

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if inputs is None:
            raise ValueError("a tfkd-self teacher needs the batch inputs")
        z = logits.float()
        t = self.temperature
        log_q = F.log_softmax(self.teacher_logits(inputs) / t, dim=1)
        kl = (log_q.exp() * (log_q - F.log_softmax(z / t, dim=1))).sum(1).mean()
        return {"ce": (1.0 - self.alpha) * _label_ce(z, labels), "tfkd_self": self.kl_weight * kl}
