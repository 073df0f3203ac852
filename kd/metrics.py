"""Test metrics: top-1 accuracy, negative log-likelihood, expected calibration error (equal-width and equal-mass bins)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (lo, hi]: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    conf = conf.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    # bucketize with right=False maps conf in (edges[b-1], edges[b]] to b; conf == 0 goes to bin 1.
    bins = torch.bucketize(conf, edges[1:-1], right=False)
    n = conf.numel()
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    return float((conf_sum - acc_sum).abs().sum() / n)


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over equal-mass bins: sort by confidence (stable), the sample of rank r goes to bin
    floor(r * n_bins / N); sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels).double()
    order = torch.sort(conf, stable=True).indices
    n = conf.numel()
    bins = torch.div(torch.arange(n, dtype=torch.long, device=conf.device) * n_bins, n, rounding_mode="floor")
    gap = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, conf[order] - correct[order])
    return float(gap.abs().sum() / n)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """acc, nll, ece and aece (adaptive ECE; fractions) of a set of logits against integer labels."""
    logits = logits.float()
    probs = logits.softmax(dim=1)
    return {
        "acc": float((logits.argmax(dim=1) == labels).float().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "aece": adaptive_ece(probs, labels, n_bins),
    }


def row_entropy_bits(c: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a row-stochastic matrix (a C-matrix: its zero diagonal adds nothing)."""
    p = c.double()
    return -(p * torch.log2(p.clamp(min=1e-300))).where(p > 0, torch.zeros_like(p)).sum(1)
