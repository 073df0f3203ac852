"""The run directory: config.yaml, metrics.csv, model.safetensors, c_matrix.safetensors, summary.json."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kd.errors import KDError

CONFIG = "config.yaml"
METRICS = "metrics.csv"
WEIGHTS = "model.safetensors"
C_MATRIX = "c_matrix.safetensors"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
METRIC_COLUMNS = ["epoch", "train_loss", "test_acc", "test_nll", "test_ece", "seconds"]


def launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def check_new_run_dir(out: str | Path) -> Path:
    """Refuse an existing file or non-empty directory, so that nothing is overwritten."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise KDError(f"output {p} already exists and is not empty; choose a new --out (nothing was written)")
    return p


def check_new_file(out: str | Path) -> Path:
    """Refuse an output file that already exists, so that nothing is overwritten."""
    p = Path(out)
    if p.exists():
        raise KDError(f"{p} already exists; choose a new --out (nothing was written)")
    return p


def prepare_run_dir(out: str | Path) -> Path:
    """Create ``out`` after :func:`check_new_run_dir`."""
    p = check_new_run_dir(out)
    p.mkdir(parents=True, exist_ok=True)
    return p


def resumable_config(out: str | Path) -> dict[str, Any]:
    """The config.yaml of an unfinished run directory, for `--resume`."""
    p = Path(out)
    if (p / SUMMARY).is_file():
        raise KDError(f"{p} is a finished run (it has {SUMMARY}); nothing to resume")
    if not (p / CONFIG).is_file():
        raise KDError(f"{p} holds no {CONFIG}; --resume continues a run started by kd train-teacher or kd distill")
    try:
        data = yaml.safe_load((p / CONFIG).read_text())
    except yaml.YAMLError as e:
        raise KDError(f"{p / CONFIG} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KDError(f"{p / CONFIG} must hold a mapping of keys to values")
    return data


def start_run(out: str | Path, config: dict[str, Any]) -> Path:
    """Create the run directory and write config.yaml; in a multi-process launch only rank 0 does."""
    if launch_rank() != 0:
        return Path(out)
    run_dir = prepare_run_dir(out)
    write_config(run_dir, config)
    return run_dir


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    _atomic_write(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv with one row per finished epoch (extra loss-term columns follow)."""
    df = pd.DataFrame(rows)
    cols = METRIC_COLUMNS + [c for c in df.columns if c not in METRIC_COLUMNS]
    _atomic_write(run_dir / METRICS, df[cols].to_csv(index=False))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    _atomic_write(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


def save_weights(path: Path, module: torch.nn.Module) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_weights(path: Path, module: torch.nn.Module) -> None:
    state = load_safetensors(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise KDError(f"{path} does not fit the model: {str(e).splitlines()[0]}") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise KDError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise KDError(f"{path} is not a readable safetensors file ({e}); it may be truncated, re-create it") from None


def save_c_matrix(path: Path, c_matrix: torch.Tensor, alpha: float, class_names: list[str],
                  extra: dict[str, str] | None = None) -> None:
    """A standalone C-matrix artifact: tensor ``c_matrix`` (K x K probabilities) plus metadata."""
    meta = {"alpha": repr(float(alpha)), "class_names": json.dumps(list(class_names)), "format": "proxykd-c-matrix-v1"}
    meta.update(extra or {})
    tmp = path.with_name(path.name + ".tmp")
    save_file({"c_matrix": c_matrix.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_c_matrix(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read and check a C-matrix artifact; returns (K x K tensor, metadata with alpha and class names)."""
    path = Path(path)
    if path.is_dir():
        path = path / C_MATRIX
    tensors = load_safetensors(path)
    if "c_matrix" not in tensors:
        raise KDError(f"{path} holds no tensor named 'c_matrix'; export one with `kd proxy export`")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    c = tensors["c_matrix"].float()
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise KDError(f"{path}: c_matrix must be K x K, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all() or (c < 0).any() or not torch.allclose(c.sum(1), torch.ones(len(c)), atol=1e-3):
        raise KDError(f"{path}: c_matrix rows must be probability vectors (non-negative, summing to 1)")
    meta: dict[str, Any] = dict(raw)
    try:
        meta["alpha"] = float(raw["alpha"]) if "alpha" in raw else None
        meta["class_names"] = json.loads(raw["class_names"]) if "class_names" in raw else None
    except (ValueError, json.JSONDecodeError):
        raise KDError(f"{path}: unreadable metadata (alpha, class_names)") from None
    return c, meta


def save_checkpoint(path: Path, epoch: int, history: list[dict[str, Any]], total_seconds: float,
                    model: torch.nn.Module, source: torch.nn.Module, optimizer, scheduler,
                    loader_rng: torch.Generator | None = None) -> None:
    """Everything needed to continue a run after its last finished epoch, written atomically.

    Only the source's own state is kept (``checkpoint_state``: LS++'s C, OLS's statistics); a
    frozen teacher is rebuilt from its run.
    """
    state = {
        "epoch": epoch, "history": history, "total_seconds": total_seconds,
        "model": model.state_dict(),
        "source": source.checkpoint_state(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader_rng": loader_rng.get_state() if loader_rng is not None else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore_checkpoint(path: Path, model: torch.nn.Module, source: torch.nn.Module, optimizer, scheduler,
                       loader_rng: torch.Generator | None = None) -> tuple[int, list[dict[str, Any]], float]:
    """Load a checkpoint into the training objects; returns (finished epoch, history, seconds so far)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    source.load_checkpoint_state(state["source"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state.get("loader_rng") is not None and loader_rng is not None:
        loader_rng.set_state(state["loader_rng"])
    return state["epoch"], state["history"], state["total_seconds"]


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise KDError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0]}); start the run anew") from None


def read_summary(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / SUMMARY
    if not p.is_file():
        raise KDError(f"{run_dir} is not a finished run: no {SUMMARY}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise KDError(f"{p} is not valid JSON; the run may have been interrupted") from None
