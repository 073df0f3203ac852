"""A sweep file read and checked (:func:`load_sweep`), and what it says about each run: its config keys,
run directory, learning-rate grid and the validation runs that choose its rate."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

import teachers
from kd.config import TrainConfig, load_yaml_config
from kd.errors import KDError


VERBS = ("train-teacher", "distill", "proxy-export", "teacher-cache")
#: verbs that write one file from a finished run (``run: NAME``) instead of training; the file each writes
ARTIFACTS = {"proxy-export": "c_matrix.safetensors", "teacher-cache": "cache.safetensors"}
RUN_KEYS = ("name", "verb", "seeds", "table", "run", "from", "lr_grid", "lr_from", "exclusive")  # not config keys
SELECT_DEFAULTS = {"val_fraction": 0.1, "val_seed": 0, "seeds": [0], "extend": 3}
STOPPED = "stopped.json"  # in a validation run's directory: the run stopped on a non-finite loss (its result)
REFERENCE = re.compile(r"\{runs_dir\}/([^/]+)/")




def checked_grid(values, where: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise KDError(f"{where}: the learning-rate grid must be a non-empty list of positive numbers")
    try:
        grid = sorted({float(v) for v in values})
    except (TypeError, ValueError):
        raise KDError(f"{where}: the learning-rate grid must be a list of numbers, got {values}") from None
    if grid[0] <= 0:
        raise KDError(f"{where}: learning rates must be positive, got {values}")
    return grid


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file; every mistake is a KDError before anything runs."""
    spec = load_yaml_config(path)
    for key in ("runs_dir", "results", "runs"):
        if key not in spec:
            raise KDError(f"{path}: missing key '{key}' (a sweep needs runs_dir, results, seeds, base and runs)")
    spec.setdefault("seeds", [0])
    spec.setdefault("base", {})
    spec.setdefault("calibrate", False)
    if not isinstance(spec["calibrate"], bool):
        raise KDError(f"{path}: calibrate is true or false (temperature-scale every final run), got {spec['calibrate']!r}")
    if "select" in spec:
        sel = spec["select"]
        if not isinstance(sel, dict) or "lr" not in sel:
            raise KDError(f"{path}: select needs lr (the grid), optionally val_fraction, val_seed, seeds and extend")
        unknown = set(sel) - {"lr", *SELECT_DEFAULTS}
        if unknown:
            raise KDError(f"{path}: unknown select key '{sorted(unknown)[0]}'; use lr, val_fraction, val_seed, seeds, extend")
        spec["select"] = {**SELECT_DEFAULTS, **sel, "lr": checked_grid(sel["lr"], f"{path}: select.lr")}
        if not 0.0 < float(spec["select"]["val_fraction"]) < 1.0:
            raise KDError(f"{path}: select.val_fraction must lie in (0, 1), got {spec['select']['val_fraction']}")
        ext = spec["select"]["extend"]
        if isinstance(ext, bool) or not isinstance(ext, int) or ext < 0:
            raise KDError(f"{path}: select.extend is how many rates the grid may grow by on each side "
                          f"(a whole number, 0 to never extend), got {ext!r}")
    names: dict[str, dict] = {}
    for i, run in enumerate(spec["runs"]):
        if not isinstance(run, dict) or "name" not in run or run.get("verb") not in VERBS:
            raise KDError(f"{path}: runs[{i}] needs a name and a verb in {', '.join(VERBS)}")
        if run["name"] in names:
            raise KDError(f"{path}: run name '{run['name']}' appears twice")
        if run["verb"] in ARTIFACTS and not isinstance(run.get("run"), str):
            raise KDError(f"{path}: {run['name']}: a {run['verb']} needs run: NAME (the teacher run it reads)")
        names[run["name"]] = run
    for run in spec["runs"]:
        where = f"{path}: {run['name']}"
        for ref in references(run):
            if ref not in names:
                raise KDError(f"{where} names run '{ref}', which this sweep does not define")
        if "lr_from" in run and run["lr_from"] not in names:
            raise KDError(f"{where}: lr_from names run '{run['lr_from']}', which this sweep does not define")
        if "lr_grid" in run:
            run["lr_grid"] = checked_grid(run["lr_grid"], f"{where}: lr_grid")
        if run["verb"] in ARTIFACTS:
            missing = set(run.get("seeds", spec["seeds"])) - set(names[run["run"]].get("seeds", spec["seeds"]))
            if missing:
                raise KDError(f"{where}: run '{run['run']}' has no seed {sorted(missing)[0]} to export")
        else:  # check config keys now, not halfway through the sweep
            cfg = TrainConfig.from_dict({**spec["base"], **config_keys(run, spec["runs_dir"], 0)}, where=where,
                                        option_names=teachers.option_names()).with_cli_defaults().validate()
            if run["verb"] == "train-teacher":
                teachers.check_options(cfg.method, cfg.options, label_only=True)
            elif cfg.teacher:
                teachers.check_options(cfg.teacher.partition(":")[0], cfg.options)
    _check_acyclic(spec, names, path)
    return spec


def references(run: dict[str, Any]) -> set[str]:
    """Names of the runs whose directories ``run`` reads (``{runs_dir}/NAME/...`` values, a proxy-export's ``run``)."""
    refs = {m for v in run.values() if isinstance(v, str) for m in REFERENCE.findall(v)}
    if run["verb"] in ARTIFACTS:
        refs.add(run["run"])
    return refs


def _check_acyclic(spec, names: dict[str, dict], path) -> None:
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KDError(f"{path}: runs depend on each other in a circle ({' -> '.join(trail + [name])})")
        state[name] = 1
        run = names[name]
        for dep in sorted(references(run) | ({run["lr_from"]} if "lr_from" in run else set())):
            visit(dep, trail + [name])
        state[name] = 2

    for name in names:
        visit(name, [])


def config_keys(run: dict[str, Any], runs_dir: str, seed: int) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k not in RUN_KEYS}
    return {k: v.replace("{runs_dir}", runs_dir).replace("{seed}", str(seed)) if isinstance(v, str) else v
            for k, v in out.items()}


def run_dir(spec, name: str, seed: int) -> Path:
    return Path(spec["runs_dir"]) / name / f"seed{seed}"


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def selects(spec, run: dict[str, Any]) -> bool:
    """Whether ``run``'s learning rate is chosen on validation data by this sweep."""
    if run["verb"] in ARTIFACTS or "lr" in run or "lr_from" in run:
        return False
    return "lr_grid" in run or "select" in spec


def selection(spec) -> dict[str, Any]:
    return spec.get("select", {**SELECT_DEFAULTS, "lr": []})


def lr_grid(spec, run: dict[str, Any]) -> list[float]:
    """The grid as the file writes it (without the rates the edge rule adds: see :meth:`Plan.grid`)."""
    return run.get("lr_grid") or selection(spec)["lr"]


def best_rate(means: pd.Series) -> float:
    """The rate with the best mean validation accuracy (a stopped run counts as the worst); ties: the smaller."""
    means = means.fillna(float("-inf"))
    return float(means.index[means.values == means.max()].min())


def selection_dir(spec, name: str, lr: float, seed: int) -> Path:
    return Path(spec["runs_dir"]) / name / "select" / f"{lr_tag(lr)}-seed{seed}"
