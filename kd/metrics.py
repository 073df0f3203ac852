"""Metrics: accuracy, NLL and calibration (equal-width and equal-mass bins) of a set of outputs, and what
the figures and analyses measure: reliability bins, class-centre distances, C-matrix row entropy and
neighbours, test confusions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


def _width_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int):
    """Equal-width confidence bins (lo, hi]: edges and per bin the count, summed confidence, summed correctness."""
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    # bucketize with right=False maps conf in (edges[b-1], edges[b]] to b; conf == 0 goes to bin 1.
    bins = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, torch.ones_like(conf))
    return edges, count, torch.zeros_like(count).index_add_(0, bins, conf), torch.zeros_like(count).index_add_(0, bins, correct)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (lo, hi]: sum_b |B|/N * |acc(B) - conf(B)|."""
    _, count, conf_sum, acc_sum = _width_bins(probs, labels, n_bins)
    return float((conf_sum - acc_sum).abs().sum() / count.sum())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> pd.DataFrame:
    """Per equal-width bin (lo, hi], the bins of :func:`expected_calibration_error`: count, mean confidence, accuracy."""
    edges, count, conf_sum, acc_sum = (t.cpu() for t in _width_bins(probs, labels, n_bins))
    safe = count.clamp(min=1)
    return pd.DataFrame({"bin_lo": edges[:-1].numpy(), "bin_hi": edges[1:].numpy(), "count": count.long().numpy(),
                         "mean_confidence": np.where(count > 0, (conf_sum / safe).numpy(), np.nan),
                         "accuracy": np.where(count > 0, (acc_sum / safe).numpy(), np.nan)})


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


def c_movement(c: torch.Tensor) -> dict[str, float]:
    """How far a C-matrix (zero diagonal, rows summing to 1) is from uniform over the other K - 1 classes:
    ``c_entropy_share``, the mean row entropy as a share of log(K - 1) (1: uniform, 0: every row one-hot),
    and ``c_row_max``, the mean of each row's largest entry (1 / (K - 1) when uniform, 1 when one-hot)."""
    k = c.shape[0]
    share = float(row_entropy_bits(c).mean() / math.log2(k - 1)) if k > 2 else 0.0
    return {"c_entropy_share": share, "c_row_max": float(c.double().max(dim=1).values.mean())}


def centre_distances(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """L1-normalised cosine distance among class centres: D = 1 - cos(m_i, m_j), zero diagonal, D / sum(D)."""
    f = features.double()
    centres = torch.zeros(k, f.shape[1], dtype=torch.float64).index_add_(0, labels, f)
    centres /= torch.bincount(labels, minlength=k).double().clamp(min=1)[:, None]
    unit = centres / centres.norm(dim=1, keepdim=True).clamp(min=1e-12)
    d = (1.0 - unit @ unit.T).clamp(min=0.0)
    d = (d + d.T) / 2
    d.fill_diagonal_(0.0)
    total = d.sum()
    return d / total if total > 0 else d


def c_neighbours(c: torch.Tensor, n: int = 2) -> list[list[int]]:
    """For each class, the n other classes its C row weights most (ties: the lower index)."""
    off = c.clone().float()
    off.fill_diagonal_(-1.0)
    return [torch.sort(row, descending=True, stable=True).indices[:n].tolist() for row in off]


#: A class's test errors name one of its confusions from this many errors into one class on; below that, the
#: classes the network gives most softmax after the true class stand in (a network that rarely errs still has
#: near classes).
MIN_ERRORS = 2


def c_beside_network(c: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, n: int = 2,
                     min_errors: int = MIN_ERRORS) -> list[dict]:
    """Per class i: the n classes C's row i weights most beside the n classes a network takes class i for.

    The network's near classes for i: its wrong predictions on i's samples made at least ``min_errors``
    times, most frequent first, then (where fewer than n are that frequent) the classes of highest mean
    softmax over i's samples after i itself; ties go to the lower index. Each row holds ``c``: [(j, C[i, j])],
    ``net``: [(j, errors, mean softmax)], ``shared``: how many classes the two lists have in common, and
    ``first``: whether C's strongest is the network's nearest. A class without samples has mean softmax 0.
    """
    k = len(c)
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    errors = torch.zeros(k, k, dtype=torch.long)
    errors.index_put_((labels, logits.argmax(1)), torch.ones_like(labels), accumulate=True)
    probs = logits.softmax(1)
    mean_p = torch.zeros(k, k).index_add_(0, labels, probs) / torch.bincount(labels, minlength=k).clamp(min=1)[:, None]
    rows = []
    for i, c_near in enumerate(c_neighbours(c, n)):
        others = [j for j in range(k) if j != i]
        frequent = sorted((j for j in others if errors[i, j] >= min_errors), key=lambda j: (-int(errors[i, j]), j))
        rest = sorted((j for j in others if j not in frequent), key=lambda j: (-float(mean_p[i, j]), j))
        net = (frequent + rest)[:n]
        rows.append({"c": [(j, float(c[i, j])) for j in c_near],
                     "net": [(j, int(errors[i, j]), float(mean_p[i, j])) for j in net],
                     "shared": len(set(c_near) & set(net)), "first": c_near[:1] == net[:1]})
    return rows
