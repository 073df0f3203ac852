"""Experiment trackers through accelerate (--log-with): what a run writes is read back with the trackers' own readers."""
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, Killed, kill_after

RECIPE = ["--epochs", 3, "--batch-size", 64, "--device", "cpu", "--quiet"]


def _tensorboard_scalars(folder):
    """{tag: {step: value}} from every TensorBoard event file under ``folder`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


EPOCH_TAGS = {"train/loss": "train_loss", "train/acc": "train_acc", "train/lspp_net": "loss_lspp_net",
              "train/lspp_c": "loss_lspp_c", "test/acc": "test_acc", "test/nll": "test_nll", "test/ece": "test_ece",
              "test/aece": "test_aece", "c/entropy_share": "c_entropy_share", "c/row_max": "c_row_max",
              "time/epoch_seconds": "seconds"}


def test_tensorboard_holds_every_epochs_metrics_and_loss_terms(kd_main, tmp_path):
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "lspp", "--c-lr-scale", 10, *RECIPE, "--log-with",
                           "tensorboard", "--log-every", 5, "--out", out)
    assert code == 0, err
    metrics = pd.read_csv(out / "metrics.csv")
    scalars = _tensorboard_scalars(out / "trackers")
    for tag, column in EPOCH_TAGS.items():
        assert scalars[tag] == pytest.approx(dict(zip(metrics["epoch"], metrics[column])), rel=1e-5), tag
    assert set(scalars["lr/network"]) == {1, 2, 3}
    for step in scalars["lr/c"]:
        assert scalars["lr/c"][step] == pytest.approx(10 * scalars["lr/network"][step])
    steps = sorted(scalars["step/loss"])
    assert steps == list(range(5, 3 * 21 + 1, 5))  # 21 steps an epoch at batch 64 on 1,347 digits
    for s in steps:
        assert scalars["step/loss"][s] == pytest.approx(scalars["step/lspp_net"][s] + scalars["step/lspp_c"][s])
    hparams = list((out / "trackers").rglob("hparams.yml"))
    assert hparams and "c_lr_scale: 10.0" in hparams[0].read_text()


def test_mlflow_file_store_in_the_run_holds_the_same(kd_main, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "lspp", *RECIPE, "--log-with", "mlflow", "--log-every", 0,
                           "--out", out)
    assert code == 0, err
    client = MlflowClient((out / "trackers" / "mlruns").resolve().as_uri())
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.run_name == "run" and run.data.params["method"] == "lspp" and run.data.params["epochs"] == "3"
    metrics = pd.read_csv(out / "metrics.csv")
    for tag, column in EPOCH_TAGS.items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert got == pytest.approx(dict(zip(metrics["epoch"], metrics[column])), rel=1e-6), tag
    assert not client.get_metric_history(run.info.run_id, "step/loss")  # --log-every 0: epochs only
    assert run.info.status == "FINISHED"


def test_the_kd_term_is_logged_apart_from_the_hard_label_term(kd_main, tmp_path):
    teacher = tmp_path / "teacher"
    assert kd_main("train-teacher", "--method", "onehot", *RECIPE, "--out", teacher)[0] == 0
    out = tmp_path / "student"
    code, _, err = kd_main("distill", "--teacher", f"network:{teacher}", "--temperature", 4, "--hard-weight", 0.3,
                           *RECIPE, "--log-with", "tensorboard", "--out", out)
    assert code == 0, err
    scalars = _tensorboard_scalars(out / "trackers")
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"train/kd", "train/hard_ce"} <= set(scalars)
    assert scalars["train/loss"] == pytest.approx(
        {e: scalars["train/kd"][e] + scalars["train/hard_ce"][e] for e in (1, 2, 3)}, rel=1e-5)
    assert list(metrics["loss_hard_ce"]) == pytest.approx([scalars["train/hard_ce"][e] for e in (1, 2, 3)], rel=1e-5)


def test_a_missing_tracker_package_is_refused_in_one_line_before_anything_is_written(kd_main, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", *RECIPE, "--log-with", "tensorboard,wandb", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'proxykd[wandb]'" in err and not out.exists()
    code, _, err = kd_main("train-teacher", *RECIPE, "--log-with", "tensorbored", "--out", out)
    assert code == 2 and "unknown tracker 'tensorbored'" in err and not out.exists()


def test_trackers_are_finished_on_a_stop(tmp_path, monkeypatch):
    """Ctrl-C (here a KeyboardInterrupt after epoch 2) still finishes the trackers: their files are complete."""
    from kd.app.jobs import train_teacher_job
    from kd.config import TrainConfig
    from kd.tracking import RunTracking

    finished = []
    real = RunTracking.finish
    monkeypatch.setattr(RunTracking, "finish", lambda self: (finished.append(True), real(self)))

    def interrupt(line):
        kill_after(2)(line)

    with pytest.raises(Killed):
        train_teacher_job(TrainConfig(method="lspp", epochs=4, batch_size=64, device="cpu", log_with="tensorboard"),
                          tmp_path / "run", progress=False, log=interrupt)
    assert finished == [True]
    assert set(_tensorboard_scalars(tmp_path / "run" / "trackers")["train/loss"]) == {1, 2}


def test_only_rank_0_logs_under_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kd",
           "train-teacher", "--method", "onehot", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--quiet",
           "--log-with", "tensorboard", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    scalar_files = [f for f in (out / "trackers").rglob("events.out.tfevents.*") if "hparams" not in str(f)]
    scalars = _tensorboard_scalars(out / "trackers")
    assert set(scalars["train/loss"]) == {1, 2} and len(scalar_files) == 2  # one writer and its hparams record
