"""Temperature scaling (`kd calibrate`), checked against a computation of its own in numpy: the fitted T is the
minimiser of the held-out NLL, the crossed halves scale each half by the other's T, and the scaled metrics are
the test set's at those temperatures."""
import json

import numpy as np
import pytest
import torch

from kd.calibration import calibrate_logits, fit_temperature, halves, scaled
from kd.errors import KDError


def _logits(n=3000, k=6, sharpness=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, k, generator=g)
    z[torch.arange(n), y] += 1.5
    return z * sharpness, y


def _np_nll(z, y, t):
    a = z / t
    m = a.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(a - m).sum(1)) + m[:, 0] - a[np.arange(len(y)), y]))


def _np_argmin_t(z, y):
    grid = np.logspace(-2, 2, 8001)
    return grid[int(np.argmin([_np_nll(z, y, t) for t in grid]))]


def _np_ece(z, y, bins=15):
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("sharpness", [0.3, 1.0, 4.0])  # under-confident, about right, over-confident
def test_the_fitted_temperature_minimises_the_held_out_nll(sharpness):
    z, y = _logits(sharpness=sharpness)
    t = fit_temperature(z, y)
    assert t == pytest.approx(_np_argmin_t(z.double().numpy(), y.numpy()), rel=2e-3)
    if sharpness != 1.0:  # sharpens under-confident logits (T < 1), softens over-confident ones (T > 1)
        assert (t < 1) == (sharpness < 1)


def test_crossed_halves_scale_each_half_by_the_temperature_fitted_on_the_other():
    z, y = _logits(sharpness=4.0)
    a = halves(y, seed=3).numpy()
    counts = np.bincount(y.numpy(), minlength=6)
    assert np.all(np.abs(2 * np.bincount(y.numpy()[a], minlength=6) - counts) <= 1)  # stratified
    assert not np.array_equal(a, halves(y, seed=4).numpy())                             # seeded
    out = calibrate_logits(z, y, seed=3)
    zn, yn = z.double().numpy(), y.numpy()
    t_a, t_b = _np_argmin_t(zn[a], yn[a]), _np_argmin_t(zn[~a], yn[~a])
    assert out["temperatures"] == pytest.approx([t_a, t_b], rel=2e-3)
    both = np.where(a[:, None], zn / out["temperatures"][1], zn / out["temperatures"][0])
    assert out["test_nll_ts"] == pytest.approx(_np_nll(both, yn, 1.0), rel=1e-5)
    assert out["test_ece_ts"] == pytest.approx(_np_ece(both, yn), abs=1e-6)
    assert out["test_ece"] == pytest.approx(_np_ece(zn, yn), abs=1e-6) and out["test_ece_ts"] < out["test_ece"]
    assert scaled(z, y, out).numpy() == pytest.approx(both)  # what `kd report` draws after scaling


def test_a_validation_split_fits_the_temperature_and_the_whole_test_set_is_measured():
    z, y = _logits(sharpness=4.0)
    out = calibrate_logits(z[:2000], y[:2000], z[2000:], y[2000:])
    t = _np_argmin_t(z[2000:].double().numpy(), y[2000:].numpy())
    assert out["fitted_on"] == "validation split" and out["temperature"] == pytest.approx(t, rel=2e-3)
    assert out["test_samples"] == 2000 and out["test_nll_ts"] == pytest.approx(
        _np_nll(z[:2000].double().numpy(), y[:2000].numpy(), out["temperature"]), rel=1e-5)


def test_kd_calibrate_writes_a_new_file_keeps_the_run_and_refuses_what_is_not_a_run(tmp_path, capsys):
    from kd.app.cli import main

    run = tmp_path / "t"
    assert main(["train-teacher", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--method", "ls",
                 "--out", str(run), "--device", "cpu"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["calibrate", str(run), "--device", "cpu"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert cal["fitted_on"] == "test halves" and cal["test_samples"] == 450 and len(cal["temperatures"]) == 2
    for k in ("test_acc", "test_nll", "test_ece", "test_aece"):  # the raw numbers are the run's own
        assert cal[k] == pytest.approx(summary[k], abs=1e-6)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "calibration.json"} == before
    assert main(["calibrate", str(run), "--device", "cpu"]) == 0          # a second call keeps the file
    assert json.loads((run / "calibration.json").read_text())["made"] == cal["made"]
    assert "(kept)" in capsys.readouterr().out
    with pytest.raises(KDError, match="not a finished run"):
        from kd.app.jobs import calibrate_run
        calibrate_run(tmp_path)


def test_numpy_arrays_are_taken_as_they_come_and_a_hopeless_fit_says_so():
    """A user's float64 logits and int64 labels from numpy; logits unrelated to the labels push T to the end of its
    range, and the result says so."""
    z, y = _logits(sharpness=4.0)
    assert fit_temperature(z.double().numpy(), y.numpy()) == pytest.approx(fit_temperature(z, y), rel=1e-9)
    rng = np.random.default_rng(0)
    out = calibrate_logits(rng.normal(size=(400, 4)) * 4, rng.integers(0, 4, 400))
    assert "note" in out and max(out["temperatures"]) == 1000.0
    assert "note" not in calibrate_logits(z, y)
