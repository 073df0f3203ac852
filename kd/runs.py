"""The run directory: config.yaml, metrics.csv, model.safetensors, c_matrix.safetensors, summary.json."""
from __future__ import annotations

import json
import numbers
import os
from contextlib import contextmanager
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
# A safetensors file (no pickle): every tensor, plus the rest as JSON in its metadata. Its existence says
# "resumable". The name is the one older versions used for a torch.save pickle, which is refused, never read.
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "proxykd-checkpoint-v1"
#: metrics.csv's leading columns, those a run has (test_* or, for a validation run, val_*), in this order
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc",
                  *(f"{split}_{m}" for split in ("test", "val") for m in ("acc", "nll", "ece", "aece")), "seconds"]


def launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def check_new_run_dir(out: str | Path) -> Path:
    """Refuse an existing file or non-empty directory, so that nothing is overwritten."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(c.name != ".lock" for c in p.iterdir())):  # .lock: kd.lock
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


@contextmanager
def atomic_file(path: str | Path):
    """The one way proxykd replaces a file: the block writes the path it is given (a ``.tmp`` beside ``path``),
    which is then renamed over ``path``, so a reader never sees half a file; if the block fails, the ``.tmp`` is
    removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under the usual 0022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (a ``.tmp`` beside it, then a rename: a reader never sees half a file)
    with the mode the umask gives a new file (the safetensors writer alone makes it 0600, unreadable to others)."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, _file_mode())


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    atomic_write(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv with one row per finished epoch (extra loss-term columns follow)."""
    df = pd.DataFrame(rows)
    cols = [c for c in METRIC_COLUMNS if c in df.columns] + [c for c in df.columns if c not in METRIC_COLUMNS]
    atomic_write(run_dir / METRICS, df[cols].to_csv(index=False))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


def save_weights(path: Path, module: torch.nn.Module) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_safetensors(path, state)


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


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a state_dict value made of numbers, strings, bools, None, lists and dicts
    (tuples are marked so they come back as tuples)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_plain(v) for v in value]}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # a learning rate held as a tensor
        return float(value)
    if isinstance(value, numbers.Integral):  # numpy integers and the like
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint")


def _unplain(value: Any) -> Any:
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_unplain(v) for v in value["__tuple__"])
        return {k: _unplain(v) for k, v in value.items()}
    return value


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint and any half-written copy of it."""
    path = Path(path)
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)


def gather_rng_states(loader_rng: torch.Generator | None = None) -> dict[str, list[torch.Tensor]] | None:
    """Every rank's torch CPU RNG state and training-loader generator state, gathered to all ranks.

    A collective: call it on every rank (before rank 0's :func:`save_checkpoint`). The states have
    a fixed size, so one ``all_gather`` of equal-size uint8 tensors carries them (no pickle).
    Returns ``{"cpu": [state of rank 0, 1, ...], "loader": [...]}`` ("loader" empty without a
    generator), or None outside a multi-process launch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    parts = [torch.get_rng_state()] + ([loader_rng.get_state()] if loader_rng is not None else [])
    sizes = [p.numel() for p in parts]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.cat(parts).to(device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    split = [list(t.cpu().split(sizes)) for t in everyone]
    return {"cpu": [s[0] for s in split], "loader": [s[1] for s in split] if loader_rng is not None else []}


def save_checkpoint(path: Path, epoch: int, history: list[dict[str, Any]], total_seconds: float,
                    model: torch.nn.Module, source: torch.nn.Module, optimizer, scheduler,
                    loader_rng: torch.Generator | None = None,
                    rank_rng: dict[str, list[torch.Tensor]] | None = None) -> None:
    """Everything needed to continue a run after its last finished epoch, written without pickle.

    One safetensors file, replaced atomically: its tensors are the model state (``model.*``), the
    source's own state (``source.*``, from ``checkpoint_state``: LS++'s C, OLS's matrix; a frozen
    teacher is rebuilt from its run), the optimizer state (``optimizer.state.<param index>.<name>``)
    and the RNG states (``rng.cpu``, ``rng.cuda.<i>``, ``rng.loader``, uint8; under several processes
    also every rank's own, ``rng.cpu.<rank>`` and ``rng.loader.<rank>``, from :func:`gather_rng_states`
    passed as ``rank_rng``); its metadata entry
    ``checkpoint`` is a JSON document with the rest (epoch, history, seconds, scheduler state,
    optimizer param_groups and non-tensor state) and the key of every tensor.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> str:
        tensors[key] = t.detach().cpu().contiguous().clone()
        return key

    model_keys = {k: put(f"model.{k}", v) for k, v in model.state_dict().items()}
    source_keys = {k: put(f"source.{k}", v) for k, v in source.checkpoint_state().items()}
    opt = optimizer.state_dict()
    opt_tensors: dict[str, dict[str, str]] = {}
    opt_values: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                opt_tensors.setdefault(str(index), {})[name] = put(f"optimizer.state.{index}.{name}", value)
            else:
                opt_values.setdefault(str(index), {})[name] = _plain(value)
    rng = {"cpu": put("rng.cpu", torch.get_rng_state()), "cuda": None, "loader": None}
    if torch.cuda.is_available():
        rng["cuda"] = [put(f"rng.cuda.{i}", s) for i, s in enumerate(torch.cuda.get_rng_state_all())]
    if loader_rng is not None:
        rng["loader"] = put("rng.loader", loader_rng.get_state())
    if rank_rng is not None:
        rng["cpu_ranks"] = [put(f"rng.cpu.{r}", t) for r, t in enumerate(rank_rng["cpu"])]
        rng["loader_ranks"] = [put(f"rng.loader.{r}", t) for r, t in enumerate(rank_rng["loader"])]
    doc = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch), "history": _plain(history), "total_seconds": float(total_seconds),
        "model": model_keys, "source": source_keys,
        "optimizer": {"param_groups": _plain(opt["param_groups"]), "state_tensors": opt_tensors,
                      "state_values": opt_values},
        "scheduler": _plain(scheduler.state_dict()), "rng": rng,
    }
    save_safetensors(path, tensors, {"format": CHECKPOINT_FORMAT, "checkpoint": json.dumps(doc)})


def restore_checkpoint(path: Path, model: torch.nn.Module, source: torch.nn.Module, optimizer, scheduler,
                       loader_rng: torch.Generator | None = None,
                       rank: int = 0) -> tuple[int, list[dict[str, Any]], float]:
    """Load a checkpoint into the training objects; returns (finished epoch, history, seconds so far).

    ``rank`` takes this process's own CPU and loader RNG states when the checkpoint holds every
    rank's (``rng.cpu.<rank>``, ``rng.loader.<rank>``), rank 0's single ones otherwise.
    """
    state = load_checkpoint(path)
    if rank < len(state.get("rng_ranks") or []):
        state["rng"] = state["rng_ranks"][rank]
    if rank < len(state.get("loader_rng_ranks") or []):
        state["loader_rng"] = state["loader_rng_ranks"][rank]
    try:
        model.load_state_dict(state["model"])
        source.load_checkpoint_state(state["source"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("loader_rng") is not None and loader_rng is not None:
            loader_rng.set_state(state["loader_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KDError(f"{path} does not fit this run ({why}); start the run anew in a new --out") from None
    return state["epoch"], state["history"], state["total_seconds"]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (safetensors + JSON metadata, never a pickle) back into the dict
    :func:`restore_checkpoint` applies: model, source, optimizer and scheduler state dicts, RNG
    states, epoch, history and seconds so far."""
    path = Path(path)

    def bad(why: str) -> KDError:
        return KDError(f"{path} is not a readable checkpoint ({why}); start the run anew in a new --out")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise bad(f"not a safetensors file, e.g. an old pickle checkpoint, which is never read: {why}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or "checkpoint" not in meta:
        raise bad(f"no {CHECKPOINT_FORMAT} metadata")
    try:
        doc = json.loads(meta["checkpoint"])
    except ValueError as e:
        raise bad(f"its metadata is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise bad("its metadata is not a JSON object")

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise bad(f"tensor {key!r} is missing")
        return tensors[key]

    try:
        opt = doc["optimizer"]
        opt_state: dict[int, dict[str, Any]] = {}
        for index, names in opt["state_tensors"].items():
            opt_state.setdefault(int(index), {}).update({n: tensor(k) for n, k in names.items()})
        for index, values in opt["state_values"].items():
            opt_state.setdefault(int(index), {}).update(_unplain(values))
        rng = doc["rng"]
        cuda = rng.get("cuda")
        state = {
            "epoch": int(doc["epoch"]), "history": _unplain(doc["history"]),
            "total_seconds": float(doc["total_seconds"]),
            "model": {k: tensor(v) for k, v in doc["model"].items()},
            "source": {k: tensor(v) for k, v in doc["source"].items()},
            "optimizer": {"state": opt_state, "param_groups": _unplain(opt["param_groups"])},
            "scheduler": _unplain(doc["scheduler"]),
            "rng": tensor(rng["cpu"]),
            "cuda_rng": [tensor(k) for k in cuda] if cuda is not None else None,
            "loader_rng": tensor(rng["loader"]) if rng.get("loader") is not None else None,
            "rng_ranks": [tensor(k) for k in rng.get("cpu_ranks") or []],
            "loader_rng_ranks": [tensor(k) for k in rng.get("loader_ranks") or []],
        }
    except KDError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"missing or malformed entry {e}") from None
    if not isinstance(state["history"], list) or not isinstance(state["scheduler"], dict) \
            or not isinstance(state["optimizer"]["param_groups"], list):
        raise bad("malformed history, scheduler or optimizer entry")
    return state


def read_summary(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / SUMMARY
    if not p.is_file():
        raise KDError(f"{run_dir} is not a finished run: no {SUMMARY}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise KDError(f"{p} is not valid JSON; the run may have been interrupted") from None
