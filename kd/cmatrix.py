"""The C-matrix file in both its forms, and the alpha a proxy takes from it.

Dense (``proxykd-c-matrix-v1``, :func:`save_c_matrix`): tensor ``c_matrix``, K x K, rows probability
vectors. Top-k (``proxykd-c-matrix-topk-v1``, :func:`save_topk_c_matrix`, `kd proxy export --top-k K`):
``c_values`` and ``c_indices``, K x k, the k largest entries of each row renormalised to sum to 1, for a
large K (ImageNet-21k: K = 21,841, a dense C is 1.9 GB float32). Both record ``alpha`` and
``class_names`` in their metadata; :func:`artifact_format` tells them apart. The sources that read
them are ``teachers.proxy.ProxyTeacher`` and ``teachers.topk.TopKProxy``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kd import runs
from kd.errors import KDError
from kd.sources import fraction

DENSE_FORMAT = "proxykd-c-matrix-v1"
TOPK_FORMAT = "proxykd-c-matrix-topk-v1"
#: The proxy's one option, declared beside the file that records it (both proxy sources declare this one).
ALPHA = fraction("alpha", "weight of C in the target (unset: the alpha the C-matrix records)", None)
#: A proxy's alpha where neither the user nor the C-matrix's file gives one (a matrix in memory, a stand-in).
DEFAULT_ALPHA = 0.1


def proxy_alpha(given: float | None, recorded: float | None = None) -> float:
    """The one rule for a proxy's alpha: the one given (``--alpha``), else the one its C-matrix's file (or the run
    it comes from) records, else :data:`DEFAULT_ALPHA`; checked against the option's bounds."""
    alpha = given if given is not None else recorded if recorded is not None else DEFAULT_ALPHA
    return ALPHA.check(alpha, "proxy")


def save_c_matrix(path: Path, c_matrix: torch.Tensor, alpha: float, class_names: list[str],
                  extra: dict[str, str] | None = None) -> None:
    """A standalone C-matrix artifact: tensor ``c_matrix`` (K x K probabilities) plus metadata."""
    meta = {"alpha": repr(float(alpha)), "class_names": json.dumps(list(class_names)), "format": DENSE_FORMAT}
    meta.update(extra or {})
    runs.save_safetensors(path, {"c_matrix": c_matrix.detach().float().cpu().contiguous()}, meta)


def load_c_matrix(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read and check a C-matrix artifact; returns (K x K tensor, metadata with alpha and class names)."""
    path = Path(path)
    if path.is_dir():
        path = path / runs.C_MATRIX
    tensors = runs.load_safetensors(path)
    if "c_matrix" not in tensors:
        raise KDError(f"{path} holds no tensor named 'c_matrix'; export one with `kd proxy export`")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    c = tensors["c_matrix"].float()
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise KDError(f"{path}: c_matrix must be K x K, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all() or (c < 0).any() or not torch.allclose(c.sum(1), torch.ones(len(c)), atol=1e-3):
        raise KDError(f"{path}: c_matrix rows must be probability vectors (non-negative, summing to 1)")
    return c, c_matrix_metadata(path, raw)


def c_matrix_metadata(path, raw: dict[str, str]) -> dict[str, Any]:
    """A C-matrix file's metadata with ``alpha`` (float or None) and ``class_names`` (list or None) parsed."""
    meta: dict[str, Any] = dict(raw)
    try:
        meta["alpha"] = float(raw["alpha"]) if "alpha" in raw else None
        meta["class_names"] = json.loads(raw["class_names"]) if "class_names" in raw else None
    except (ValueError, json.JSONDecodeError):
        raise KDError(f"{path}: unreadable metadata (alpha, class_names)") from None
    return meta


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest stored dtype for class indices: int16 when every index fits (K <= 32,768), else int32."""
    return torch.int16 if num_classes <= 2 ** 15 else torch.int32


def check_top_k(top_k: int, num_classes: int, what: str = "--top-k") -> int:
    """``top_k`` must lie in [1, K): k = K is the dense form."""
    top_k = int(top_k)
    if not 1 <= top_k < num_classes:
        raise KDError(f"{what} must lie in [1, K) = [1, {num_classes}), got {top_k}; "
                      f"leave it out for the dense form")
    return top_k


def artifact_format(path: str | Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (None when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError) as e:
        raise KDError(f"{path} is not a readable safetensors file ({e}); it may be truncated, re-create it") from None


def top_k_rows(c_matrix: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of a K x K C-matrix, renormalised to sum to 1.

    Returns (values K x k float32, indices K x k int64), values in descending order.
    """
    c = torch.as_tensor(c_matrix, dtype=torch.float32)
    check_top_k(top_k, c.shape[1])
    values, indices = c.topk(top_k, dim=1)
    sums = values.double().sum(1, keepdim=True)
    if (sums <= 0).any():
        raise KDError("a row of the C-matrix has no mass in its top-k entries; cannot renormalise it")
    return (values.double() / sums).float(), indices


def save_topk_c_matrix(path: Path, values: torch.Tensor, indices: torch.Tensor, alpha: float,
                       class_names: list[str] | None, extra: dict[str, str] | None = None) -> None:
    """A sparse C-matrix artifact: ``c_values`` (K x k float32, rows summing to 1) and ``c_indices``
    (K x k column indices, int16 or int32), metadata ``format``, ``top_k``, ``num_classes``, alpha."""
    k_classes, top_k = values.shape
    meta = {"alpha": repr(float(alpha)), "class_names": json.dumps(list(class_names or [])), "format": TOPK_FORMAT,
            "top_k": str(top_k), "num_classes": str(k_classes)}
    meta.update(extra or {})
    tensors = {"c_values": values.detach().float().cpu().contiguous(),
               "c_indices": indices.detach().cpu().to(index_dtype(k_classes)).contiguous()}
    runs.save_safetensors(path, tensors, meta)


def load_topk_c_matrix(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read and check a top-k C-matrix; returns (values K x k, indices K x k int64, metadata)."""
    path = Path(path)
    tensors = runs.load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    redo = "re-export it with `kd proxy export RUN --top-k K`"
    missing = [n for n in ("c_values", "c_indices") if n not in tensors]
    if missing:
        raise KDError(f"{path} is a top-k C-matrix without tensor '{missing[0]}'; {redo}")
    values, indices = tensors["c_values"].float(), tensors["c_indices"]
    try:
        k_classes, top_k = int(raw["num_classes"]), int(raw["top_k"])
    except (KeyError, ValueError):
        raise KDError(f"{path}: a top-k C-matrix must record num_classes and top_k in its metadata; {redo}") from None
    if values.shape != (k_classes, top_k) or indices.shape != (k_classes, top_k):
        raise KDError(f"{path}: c_values and c_indices must both be K x k = {k_classes} x {top_k}, got "
                      f"{tuple(values.shape)} and {tuple(indices.shape)}; {redo}")
    if indices.is_floating_point() or indices.is_complex():
        raise KDError(f"{path}: c_indices must hold integers, got {indices.dtype}; {redo}")
    indices = indices.long()
    if top_k >= k_classes or (indices < 0).any() or (indices >= k_classes).any() or has_duplicates(indices):
        raise KDError(f"{path}: c_indices must hold k < K distinct classes in [0, {k_classes}) per row; {redo}")
    if not torch.isfinite(values).all() or (values < 0).any() \
            or not torch.allclose(values.sum(1), torch.ones(k_classes), atol=1e-3):
        raise KDError(f"{path}: c_values rows must be probability vectors (non-negative, summing to 1); {redo}")
    meta = c_matrix_metadata(path, raw)
    meta["top_k"], meta["num_classes"] = top_k, k_classes
    return values, indices, meta


def has_duplicates(indices: torch.Tensor) -> bool:
    """True when some row of an R x k index tensor names a class twice."""
    if indices.shape[1] < 2:
        return False
    s = indices.sort(dim=1).values
    return bool((s[:, 1:] == s[:, :-1]).any())
