import math

import numpy as np
import pytest
import torch

from kd.metrics import classification_metrics, expected_calibration_error


def ece_by_hand(probs, labels, n_bins=15):
    conf = probs.max(1)
    pred = probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [(c > lo or (b == 0 and c == 0)) and c <= hi for c in conf]
        idx = np.nonzero(inside)[0]
        if len(idx):
            total += len(idx) / len(conf) * abs(np.mean(pred[idx] == labels[idx]) - np.mean(conf[idx]))
    return total


def test_ece_matches_a_loop_over_15_equal_width_bins():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 2
    labels = torch.randint(0, 7, (500,), generator=g)
    probs = logits.softmax(1)
    assert expected_calibration_error(probs, labels) == pytest.approx(ece_by_hand(probs.numpy(), labels.numpy()), abs=1e-6)


def test_bin_edge_goes_to_the_lower_bin():
    probs = torch.tensor([[2 / 3 + 0.0, 1 / 3]], dtype=torch.float64)  # exactly on edge 10/15
    assert expected_calibration_error(probs, torch.tensor([0])) == pytest.approx(1 / 3)


def test_accuracy_and_nll():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    m = classification_metrics(logits, labels)
    assert m["acc"] == pytest.approx(2 / 3)
    nll = -np.mean([math.log(math.exp(2) / (math.exp(2) + 1)), math.log(1 / (1 + math.e)), math.log(math.exp(3) / (math.exp(3) + 1))])
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
