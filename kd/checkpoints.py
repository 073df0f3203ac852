"""Weights from files proxykd did not write: a user's checkpoint as a teacher, a proxy's source or a start.

A file is read without running any of its code: safetensors, or a PyTorch file through
``torch.load(weights_only=True)``, which builds only tensors, numbers, strings and containers
(plus ``argparse.Namespace``, the run arguments that timm's ``train.py`` and torchvision's
reference scripts store beside the weights). A file that needs anything else to unpickle is
refused in one line, its payload never run.

The state dict is found where real checkpoints keep it: the file itself, or under
``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` (timm's order: the EMA weights
first when the file has them), with ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
prefixes removed. :func:`load_into` loads it strictly, naming the first missing or unexpected
key or shape mismatch; with ``reset_head`` the classifier keeps the fresh initialisation of a
model built for this data set's K (fine-tuning a 1000-class checkpoint on 10 classes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from _pickle import UnpicklingError  # what torch.load raises for a refused global (pickle re-exports it)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from kd.errors import KDError

#: Where a checkpoint may keep its weights, in the order they are looked for (EMA first, as timm does).
STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
#: Wrapper prefixes removed from every key (DDP, torch.compile), in either order.
PREFIXES = ("module.", "_orig_mod.")
#: Entries of a wrapper's state that are not weights (torchvision's ExponentialMovingAverage counts its steps).
NOT_WEIGHTS = ("n_averaged",)


@dataclass
class Checkpoint:
    """Weights read from a file: the state dict, which entry of the file held it, and what the file says."""

    path: Path
    state: dict[str, torch.Tensor]
    key: str | None             # None: the file is the state dict itself
    class_names: list[str] | None = None  # when the file names its classes (safetensors metadata)

    def describe(self) -> str:
        return f"{self.path}" + (f" ['{self.key}']" if self.key else "")


def sha256(path: str | Path) -> str:
    """The file's SHA-256, recorded in a run's config.yaml so that the weights it started from are known."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: containers, tensors and numbers only, plus argparse.Namespace."""
    file = str(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"'{found[1]}'" if found else "objects other than tensors, numbers, strings and containers"
        raise KDError(f"{path} needs code to unpickle ({what}); proxykd reads weights without running a file's code: "
                      f"save the state dict alone (torch.save(model.state_dict(), F) or safetensors)") from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KDError(f"{path} is not a readable PyTorch or safetensors file ({why}); it may be truncated") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(torch.is_tensor(v) for k, v in obj.items() if k not in NOT_WEIGHTS)


def _strip(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        while k.startswith(PREFIXES):
            k = k[len(next(p for p in PREFIXES if k.startswith(p))):]
        if k not in NOT_WEIGHTS:
            out[k] = v
    return out


def read_checkpoint(path: str | Path, *, use_ema: bool = True, key: str | None = None) -> Checkpoint:
    """The state dict of a weights file (safetensors, or PyTorch read with weights_only), without running its code.

    ``key`` picks the entry of a checkpoint that holds the weights; by default the first of
    :data:`STATE_KEYS` present (``use_ema=False`` skips the EMA entries), or the file itself when it
    is a bare state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise KDError(f"weights file {path} does not exist")
    names = None
    if path.suffix == ".safetensors":
        try:
            obj: Any = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise KDError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
        try:
            names = json.loads(meta["class_names"]) if "class_names" in meta else None
        except ValueError:
            names = None
    else:
        obj = _torch_load(path)
    chosen = None
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = ", ".join(str(k) for k in obj) if isinstance(obj, dict) else type(obj).__name__
            raise KDError(f"{path} has no entry '{key}' (it holds: {have[:200]})")
        chosen = key
    elif not _is_state_dict(obj) and isinstance(obj, dict):
        keys = [k for k in STATE_KEYS if use_ema or "ema" not in k]
        chosen = next((k for k in keys if _is_state_dict(obj.get(k))), None)
    state = obj[chosen] if chosen is not None else obj
    if not _is_state_dict(state):
        have = ", ".join(str(k) for k in obj)[:200] if isinstance(obj, dict) else type(obj).__name__
        raise KDError(f"{path} holds no state dict of tensors where one is looked for ({', '.join(STATE_KEYS)}, or "
                      f"the file itself); it holds: {have}")
    return Checkpoint(path, _strip(state), chosen, names if isinstance(names, list) else None)


def head_prefixes(model: nn.Module, num_classes: int | None = None) -> list[str]:
    """The module names of ``model``'s classifier: timm's ``pretrained_cfg['classifier']`` where a timm model
    declares it, else the last Linear (or 1x1 convolution) giving the model's ``num_classes`` outputs
    (torchvision's ``fc`` / ``classifier``, proxykd's nets)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    modules = dict(model.named_modules())
    if names:
        names = [names] if isinstance(names, str) else list(names)
        found = [n for n in names if n in modules and any(True for _ in modules[n].parameters())]
        if found:
            return found
    last = None
    for name, m in model.named_modules():
        out = m.out_features if isinstance(m, nn.Linear) else (
            m.out_channels if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) else None)
        if out is not None and (num_classes is None or out == num_classes):
            last = name
    if last is None:
        raise KDError(f"cannot find the classifier of {type(model).__name__} (a last Linear with {num_classes} "
                      f"outputs); load its weights without --reset-head")
    return [last]


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def checkpoint_num_classes(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> int | None:
    """How many classes the checkpoint's classifier outputs, read from the weight of ``model``'s head
    (``model`` built for ``num_classes``); None when the file holds no such weight."""
    for prefix in head_prefixes(model, num_classes):
        w = state.get(prefix + ".weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def load_into(model: nn.Module, weights: Checkpoint | dict[str, torch.Tensor] | str | Path, *, strict: bool = True,
              reset_head: bool = False, num_classes: int | None = None, what: str = "--init") -> list[str]:
    """Load ``weights`` (a file, a :class:`Checkpoint` or a state dict) into ``model``; returns the keys it left
    at their initial values (the classifier's with ``reset_head``, every absent key when not ``strict``).

    Strict by default: the first missing or unexpected key, or the first shape mismatch, is a one-line
    KDError. A classifier of another size is refused with a pointer to ``reset_head`` (``--reset-head``),
    which keeps the classifier ``model`` was built with (fresh, for this data set's K) and loads the rest.
    ``num_classes``: the K ``model`` was built for (default: read from its classifier).
    """
    ckpt = weights if isinstance(weights, Checkpoint) else (
        read_checkpoint(weights) if isinstance(weights, (str, Path)) else Checkpoint(Path("<state dict>"),
                                                                                     _strip(dict(weights)), None))
    own = model.state_dict()
    state = dict(ckpt.state)
    head: list[str] = []
    try:
        head = head_prefixes(model, num_classes)
    except KDError:
        if reset_head:
            raise
    kept: list[str] = []
    if reset_head:
        state = {k: v for k, v in state.items() if not _under(k, head)}
        kept = [k for k in own if _under(k, head)]
    src = ckpt.describe()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            if _under(k, head):
                raise KDError(f"{src}: the classifier '{k}' has shape {_shape(v)}, this model's {_shape(own[k])} "
                              f"(the weights were trained on {v.shape[0]} classes, the data has {own[k].shape[0]}); "
                              f"pass --reset-head (reset_head=True) to re-initialise it and fine-tune, or use the "
                              f"network as a teacher with --class-map")
            raise KDError(f"{src} does not fit {type(model).__name__}: '{k}' has shape {_shape(v)} in the file and "
                          f"{_shape(own[k])} in the model; is it the right model (or input channels)?")
    missing = [k for k in own if k not in state and k not in kept]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        more = ", ".join(p for p in (f"{len(missing)} missing" if missing else "",
                                     f"{len(unexpected)} unexpected" if unexpected else "") if p)
        raise KDError(f"{src} does not fit {type(model).__name__}: {first} ({more} in all); is it the right model? "
                      f"(in Python, load_into(..., strict=False) loads what matches)")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    return kept + (missing if not strict else [])


__all__ = ["Checkpoint", "read_checkpoint", "load_into", "head_prefixes", "checkpoint_num_classes", "sha256",
           "STATE_KEYS"]
