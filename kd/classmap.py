"""Class maps: which output of a teacher trained on more or other classes stands for each class of the data.

A teacher with K' outputs serves a data set of K classes through an index vector of length K:
entry c is the teacher output that means data set class c. Its logits restricted to those K
outputs and renormalised by the softmax are its targets, for online KD, caching and proxy
export alike. A map comes from

- ``imagenet``: the data set's class names are WordNet ids (ImageNet subsets name their class
  folders so, ImageNet-100 among them) and the teacher is an ImageNet-1k network: timm's
  ``ImageNetInfo`` gives each id its output index; no file is needed;
- a JSON file: a list of K entries in the data set's class order, or an object whose keys are
  the data set's class names (or indices) and whose values are entries;
- a CSV file: rows ``DATA_SET_CLASS,TEACHER_CLASS`` (a header row is allowed).

An entry is the teacher's output index, or its class name where the teacher names its classes
(a run directory's class names, a safetensors file's ``class_names`` metadata, ImageNet's
WordNet ids). Out-of-range indices, a teacher output named twice, a class left unmapped and a
name nobody knows are refused in one line.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from kd.errors import KDError

IMAGENET = "imagenet"


def imagenet_class_names() -> list[str]:
    """The 1,000 WordNet ids of ImageNet-1k in the output order of ImageNet classifiers (timm's ImageNetInfo)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def _read_entries(path: Path) -> dict[str, Any] | list[Any]:
    if not path.is_file():
        raise KDError(f"class map {path} does not exist (give a JSON or CSV file, or 'imagenet')")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KDError(f"class map {path} cannot be read as UTF-8 text ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KDError(f"class map {path} is not valid JSON ({e})") from None
        if not isinstance(data, (list, dict)):
            raise KDError(f"class map {path} must hold a JSON list (one entry per data set class) or an object")
        return data
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if any(len(r) != 2 for r in rows):
            bad = next(i for i, r in enumerate(rows, 1) if len(r) != 2)
            raise KDError(f"class map {path}: row {bad} must have two cells, DATA_SET_CLASS,TEACHER_CLASS")
        return {"__rows__": [(a.strip(), b.strip()) for a, b in rows]}
    raise KDError(f"class map {path} must be a .json or .csv file (or the word 'imagenet')")


def _as_index(entry: Any, teacher_names: Sequence[str] | None, k_teacher: int, where: str) -> int:
    if isinstance(entry, bool):
        raise KDError(f"{where}: {entry!r} is not a teacher output index or class name")
    if isinstance(entry, int) or (isinstance(entry, str) and entry.strip().lstrip("-").isdigit()):
        i = int(entry)
        if not 0 <= i < k_teacher:
            raise KDError(f"{where}: teacher output {i} is out of range; the teacher has {k_teacher} outputs (0 to "
                          f"{k_teacher - 1})")
        return i
    if isinstance(entry, str):
        if not teacher_names:
            raise KDError(f"{where}: '{entry}' is a class name, but the teacher does not name its classes; give its "
                          f"output index instead")
        try:
            return list(teacher_names).index(entry)
        except ValueError:
            raise KDError(f"{where}: the teacher has no class named '{entry}'") from None
    raise KDError(f"{where}: {entry!r} is not a teacher output index or class name")


def _data_class(key: str, names: Sequence[str], where: str) -> int:
    if key in names:
        return list(names).index(key)
    if key.isdigit() and int(key) < len(names):
        return int(key)
    raise KDError(f"{where}: the data set has no class '{key}' (its classes: {', '.join(names[:10])}"
                  f"{', ...' if len(names) > 10 else ''})")


def resolve_class_map(spec: str | Path | Sequence[Any], data_class_names: Sequence[str], k_teacher: int,
                      teacher_names: Sequence[str] | None = None) -> torch.Tensor:
    """The K teacher output indices for the K data set classes (int64), from ``imagenet``, a file or a list."""
    names = list(data_class_names)
    k = len(names)
    where = f"class map {spec}" if isinstance(spec, (str, Path)) else "class map"
    if isinstance(spec, str) and spec.lower() == IMAGENET:
        if k_teacher != 1000:
            raise KDError(f"--class-map imagenet maps to the 1,000 outputs of an ImageNet-1k network; this teacher has "
                          f"{k_teacher}")
        teacher_names = imagenet_class_names()
        unknown = [n for n in names if n not in teacher_names]
        if unknown:
            raise KDError(f"--class-map imagenet needs the data set's classes named by WordNet id (n01440764, ...); "
                          f"'{unknown[0]}' is not an ImageNet-1k id: give a JSON or CSV map")
        entries: list[Any] = list(names)
    else:
        data = _read_entries(Path(spec)) if isinstance(spec, (str, Path)) else list(spec)
        if isinstance(data, list):
            if len(data) != k:
                raise KDError(f"{where} lists {len(data)} entries; the data set has {k} classes (one entry each, in "
                              f"the data set's class order)")
            entries = list(data)
        else:
            pairs = data["__rows__"] if "__rows__" in data else [(str(a), b) for a, b in data.items()]
            if pairs and "__rows__" in data and pairs[0][0] not in names and not pairs[0][0].isdigit():
                pairs = pairs[1:]  # a header row
            found: dict[int, Any] = {}
            for key, value in pairs:
                c = _data_class(str(key), names, where)
                if c in found:
                    raise KDError(f"{where}: data set class '{names[c]}' is mapped twice")
                found[c] = value
            missing = [names[c] for c in range(k) if c not in found]
            if missing:
                raise KDError(f"{where} leaves data set class '{missing[0]}' unmapped ({len(missing)} in all); map "
                              f"every class")
            entries = [found[c] for c in range(k)]
    index = [_as_index(e, teacher_names, k_teacher, f"{where}, class '{names[c]}'") for c, e in enumerate(entries)]
    seen: dict[int, int] = {}
    for c, i in enumerate(index):
        if i in seen:
            raise KDError(f"{where}: teacher output {i} is given to both '{names[seen[i]]}' and '{names[c]}'; each data "
                          f"set class needs an output of its own")
        seen[i] = c
    return torch.tensor(index, dtype=torch.long)


__all__ = ["resolve_class_map", "imagenet_class_names", "IMAGENET"]
