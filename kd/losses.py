"""Small loss functions, each named after what it computes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(targets, softmax(logits)) = -sum targets * log_softmax(logits).

    torch's cross-entropy with probability targets, faster than the written-out
    ``-(t * log_softmax).sum(1).mean()`` (benchmarks/step-cost.md, "Measurements behind implementation choices").
    """
    return F.cross_entropy(logits.float(), targets.float())


def hinton_kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    hard_weight: float,
) -> dict[str, torch.Tensor]:
    """Hinton et al.'s loss as its two named parts, each with its weight: ``kd`` = (1 - w) * T^2 * KL(p_T^t ||
    p_T^s) and, when w > 0, ``hard_ce`` = w * CE(labels, s); their sum is :func:`hinton_kd_loss`. Logged apart,
    the soft term shows what the teacher adds beyond the labels."""
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    soft = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * (t * t)
    if hard_weight == 0:
        return {"kd": soft}
    return {"kd": (1.0 - hard_weight) * soft, "hard_ce": hard_weight * F.cross_entropy(student_logits.float(), labels)}


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    hard_weight: float,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss: (1 - w) * T^2 * KL(p_T^t || p_T^s) + w * CE(labels, s).

    The T^2 factor keeps the soft term's gradient scale independent of T. ``labels`` may be
    soft (B x K, mixup / cutmix): the hard term is then the cross-entropy against them.
    """
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    soft = kl * t * t
    if hard_weight == 0:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - hard_weight) * soft + hard_weight * hard
