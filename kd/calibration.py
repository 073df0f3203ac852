"""Temperature scaling (Guo et al., 2017): one scalar T > 0 divides a network's logits, fitted by the
negative log-likelihood on data the network never trained on. It leaves every prediction (and so the
accuracy) as it is and changes only the confidence, which is the fair way to compare the calibration of
networks trained with different targets: smoothed targets make a network under-confident by design
(Mueller et al., 2019), and one scalar undoes a uniform over- or under-confidence.

Which held-out data fits T:

- a run trained on a validation split (``val_fraction`` > 0): its validation share, and the whole test set
  is scaled and measured;
- a run trained on the whole training set (the study's final runs): no training data is left over, so the
  test set is cut into two stratified, seeded halves; T fitted on each half scales the other, and the
  calibrated metrics are measured over the whole test set. No test sample is scaled by a temperature
  fitted on itself, and the calibrated numbers stand on the same samples as the raw ones.

``kd calibrate RUN`` (``kd.app.jobs.calibrate_run``) writes ``RUN/calibration.json`` (a new file; nothing of
the run is changed): where T
was fitted, ``temperatures`` (one, or the two halves' [fitted on A, fitted on B]; ``temperature`` is then
their geometric mean, for reading only), and the test set's metrics before (``test_nll``, ``test_ece``,
``test_aece``, equal to the run's summary) and after scaling (``*_ts``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from kd.errors import KDError
from kd.metrics import classification_metrics

CALIBRATION = "calibration.json"
#: the range T is searched in; a T at either end says the held-out data pushed it as far as it goes
T_RANGE = (1e-3, 1e3)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """argmin over T of the mean NLL of softmax(logits / T) at ``labels``.

    The NLL is convex in b = 1/T (a log-sum-exp of b z minus the linear b z_y), so its derivative in b,
    mean(E_softmax(b z)[z] - z_y), rises with b and its root is the minimum: found by bisection on log b
    in float64 (to 1e-12 relative), inside ``T_RANGE``.
    """
    z = torch.as_tensor(logits).detach().double().cpu()  # numpy arrays and lists too
    y = torch.as_tensor(labels).detach().long().cpu()
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise KDError(f"temperature scaling needs N x K logits and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
    zy = z.gather(1, y[:, None]).squeeze(1)

    def slope(log_b: float) -> float:
        p = (z * math.exp(log_b)).softmax(1)
        return float(((p * z).sum(1) - zy).mean())

    lo, hi = -math.log(T_RANGE[1]), -math.log(T_RANGE[0])  # log b for the largest and smallest T
    if slope(lo) >= 0:
        return T_RANGE[1]
    if slope(hi) <= 0:
        return T_RANGE[0]
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return math.exp(-(lo + hi) / 2)


def halves(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A stratified, seeded cut of the samples into two halves: a bool mask, True for half A."""
    y = torch.as_tensor(labels).detach().long().cpu()
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        mask[idx[: (len(idx) + 1) // 2]] = True
    return mask


def crossed_temperatures(logits: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> list[float]:
    """[T fitted on half A, T fitted on half B] of :func:`halves`; :func:`scaled` applies each to the other half."""
    a = halves(labels, seed)
    return [fit_temperature(logits[a], labels[a]), fit_temperature(logits[~a], labels[~a])]


def scaled(logits: torch.Tensor, labels: torch.Tensor, calib: dict[str, Any]) -> torch.Tensor:
    """``logits`` of the run's test set divided by the temperature(s) ``calib`` (a calibration.json) gives them."""
    if calib["fitted_on"] == "test halves":  # half A is scaled by the T fitted on B, and B by A's
        t_a, t_b = (torch.tensor(float(t), dtype=torch.float64) for t in calib["temperatures"])
        return logits.double() / torch.where(halves(labels, int(calib["seed"])), t_b, t_a)[:, None]
    return logits.double() / float(calib["temperature"])


def calibrate_logits(test_logits: torch.Tensor, test_labels: torch.Tensor, fit_logits: torch.Tensor | None = None,
                     fit_labels: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """Fit and measure: T from ``fit_*`` when given, else from crossed halves of the test set; the test
    set's accuracy, NLL, ECE-15 and adaptive ECE before (``test_*``) and after (``test_*_ts``) scaling."""
    test_logits, test_labels = torch.as_tensor(test_logits).double(), torch.as_tensor(test_labels).long()
    raw = classification_metrics(test_logits, test_labels)
    if fit_logits is not None:
        fit_logits, fit_labels = torch.as_tensor(fit_logits), torch.as_tensor(fit_labels)
        t = fit_temperature(fit_logits, fit_labels)
        out: dict[str, Any] = {"fitted_on": "validation split", "temperature": t, "temperatures": [t],
                               "fit_samples": int(len(fit_labels))}
        after = classification_metrics(scaled(test_logits, test_labels, out), test_labels)
    else:
        ts = crossed_temperatures(test_logits, test_labels, seed)
        out = {"fitted_on": "test halves", "temperature": math.sqrt(ts[0] * ts[1]), "temperatures": ts,
               "fit_samples": int(len(test_labels) // 2), "seed": seed}
        after = classification_metrics(scaled(test_logits, test_labels, out), test_labels)
    if any(t in T_RANGE for t in out["temperatures"]):
        out["note"] = (f"T reached the end of its search range {T_RANGE}: the held-out data asks for outputs as flat "
                       f"(or as sharp) as they go, which logits unrelated to the labels do")
    out.update({"test_samples": int(len(test_labels)), **{f"test_{k}": v for k, v in raw.items()},
                **{f"test_{k}_ts": v for k, v in after.items() if k != "acc"}})
    return out


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / CALIBRATION
    return json.loads(p.read_text()) if p.is_file() else None
