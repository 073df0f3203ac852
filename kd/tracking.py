"""Experiment trackers through accelerate: TensorBoard, MLflow, Weights & Biases, Aim, Trackio, ...

``--log-with NAME[,NAME]`` hands a run to accelerate's trackers: the run's config as
hyperparameters once, then every epoch's metrics at step = epoch, grouped as people group them
(``train/loss``, ``train/acc``, ``train/<term>`` for every named loss term, the KD term apart
from the hard-label term; ``test/acc`` ... or ``val/acc`` ...; ``c/entropy_share`` and
``c/row_max`` for LS++; ``lr/network`` and ``lr/c``; ``time/epoch_seconds``) and, every
``--log-every`` optimizer steps, the training loss and its terms at step = the optimizer step
(``step/loss``, ``step/<term>``, ``step/lr``). The trackers' files go under the run directory
(``RUN/trackers``) unless ``--log-dir`` says otherwise; MLflow gets a file store there
(``RUN/trackers/mlruns``) unless ``MLFLOW_TRACKING_URI`` names another. Only the main process
logs. The trackers are finished on every way out of a run (its end, a non-finite stop, Ctrl-C).

accelerate drops a tracker whose package is missing with only a warning; here a missing package
is refused in one line that names the extra to install (``pip install 'proxykd[tensorboard]'``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from kd.errors import KDError

#: tracker name -> (the module it needs, the proxykd extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "aim": ("aim", "aim"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}
PROJECT = "proxykd"


def parse_trackers(spec: str | None) -> list[str]:
    """The tracker names of ``--log-with`` (comma-separated), each known and installed, or a one-line KDError."""
    if not spec:
        return []
    names = [n.strip().lower() for n in str(spec).split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise KDError(f"--log-with: unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise KDError(f"--log-with {name} needs the {module} package, which is not installed: "
                          f"pip install 'proxykd[{extra}]'")
    return list(dict.fromkeys(names))


def _hparam(value: Any) -> bool | int | float | str:
    """A config value as the trackers' hyperparameter stores take it (scalars; anything else as text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


class RunTracking:
    """The trackers of one run: started with the run's config, fed each epoch and every ``every`` steps, finished once."""

    def __init__(self, accelerator, names: list[str], log_dir: Path, run_name: str, config: dict[str, Any],
                 every: int):
        self.accelerator, self.every, self.finished = accelerator, int(every), False
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "mlflow" in names:
            init_kwargs["mlflow"] = {"run_name": run_name}
            if accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store in the run, as TensorBoard's
                mlflow.set_tracking_uri((log_dir / "mlruns").resolve().as_uri())
        for name in ("wandb", "aim", "trackio", "swanlab"):
            if name in names:
                init_kwargs[name] = {"name": run_name} if name in ("wandb", "trackio", "swanlab") else {}
        accelerator.init_trackers(PROJECT, config={k: _hparam(v) for k, v in config.items()}, init_kwargs=init_kwargs)

    def log_epoch(self, row: dict[str, Any], eval_name: str, learning_rates: list[float]) -> None:
        """One epoch's row of metrics.csv, renamed into the trackers' groups, at step = epoch."""
        values: dict[str, float] = {}
        for key, value in row.items():
            if value is None or key == "epoch":
                continue
            if key == "train_loss":
                values["train/loss"] = value
            elif key == "train_acc":
                values["train/acc"] = value
            elif key.startswith("loss_"):
                values[f"train/{key[5:]}"] = value
            elif key.startswith(eval_name + "_"):
                values[f"{eval_name}/{key[len(eval_name) + 1:]}"] = value
            elif key.startswith("c_"):
                values[f"c/{key[2:]}"] = value
            elif key == "seconds":
                values["time/epoch_seconds"] = value
        for name, lr in zip(("network", "c"), learning_rates):
            values[f"lr/{name}"] = lr
        self.accelerator.log({k: float(v) for k, v in values.items()}, step=int(row["epoch"]))

    def log_step(self, step: int, terms: dict[str, Any], lr: float) -> None:
        """The training loss and its named terms at an optimizer step (reads them: one host sync per call)."""
        values = {f"step/{k}": float(v.detach()) for k, v in terms.items()}
        values["step/loss"] = sum(values.values())
        values["step/lr"] = float(lr)
        self.accelerator.log(values, step=step)

    def finish(self) -> None:
        """Finish every tracker (accelerate's ``end_training`` without its destruction of the process group, which
        the job still needs). Safe to call twice."""
        if self.finished:
            return
        self.finished = True
        for tracker in self.accelerator.trackers:
            tracker.finish()


__all__ = ["TRACKERS", "parse_trackers", "RunTracking"]
