"""`kd sweep FILE.yaml [--jobs N]`: runs x seeds from one YAML file, resumable, summarised as CSV + markdown.

The file holds ``runs_dir`` (where run directories go), ``results`` (path prefix of the tidy
CSV and the markdown table), ``seeds``, ``base`` (config keys shared by every run) and
``runs``: a list of entries with a ``name``, a ``verb`` (``train-teacher``, ``distill``,
``proxy-export`` or ``teacher-cache``: the last two write ``NAME/seedS/c_matrix.safetensors``
or ``NAME/seedS/cache.safetensors`` from the finished run ``run: OTHER``; a proxy export takes
``from: learned|measured|auto``), optional ``seeds`` overriding the global ones, ``table:
false`` to leave it out of the table, ``exclusive: true`` to train it alone on the machine
(no other run of the sweep at the same time, all threads: its ``train_seconds`` is then a
clean wall-clock time), and config keys. In a value, ``{runs_dir}`` is replaced by the runs
directory and ``{seed}`` by the run's seed, so a student can name a teacher run:
``teacher: network:{runs_dir}/teacher-lspp/seed{seed}``; such a run waits for that one.

Learning rates chosen on validation data: with a top-level ``select`` mapping (``lr``: the
grid; ``val_fraction``, default 0.1; ``val_seed``, default 0; ``seeds``, default [0]) every
train or distill run without an ``lr`` of its own (and without ``lr_from``) is first trained
once per grid value and selection seed on the training set minus a stratified, seeded
validation share (``NAME/select/lr{LR}-seed{S}``, evaluated on that share, never on the test
set). The rate with the best mean validation accuracy (ties: the smaller rate) is then used
for every seed on the full training set (``NAME/seed{S}``), whose test metrics alone make the
table. A run's ``lr_grid`` replaces the grid for that run; ``lr_from: OTHER`` reuses the rate
chosen for run OTHER. The chosen rate is in the CSV's ``lr`` column and every validation
result in ``RESULTS_selection.csv``.

A grid must bracket its optimum: when the best rate is the grid's largest, the grid grows by its
own top ratio (0.2 after 0.1 adds 0.4), and when it is the smallest, by its bottom ratio downwards,
until the best rate is interior or ``select.extend`` rates (default 3) were added on that side.
The added rates are validation runs like the others (``extended`` in the selection CSV), and the
CSVs' ``grid`` column says for each run whether its rate is ``interior``, at an edge after the
``cap`` of extensions, or at an ``edge`` of a grid that cannot grow (one value, or ``extend: 0``).
A validation run whose loss stops being finite counts as the worst result (``stopped.json`` in its
directory says why; ``stopped`` in the CSV); the other runs go on.

With ``calibrate: true`` every final run is also temperature-scaled when it finishes (``kd calibrate``:
``calibration.json``), and the CSV gains ``temperature`` and the test set's NLL, ECE and adaptive ECE after
scaling (``test_nll_ts``, ``test_ece_ts``, ``test_aece_ts``); a committed row without them is trained again
(and stays in the table until its new run replaces it, so the results can be committed while that goes on).

A run whose ``summary.json`` exists is skipped (after checking that its config.yaml holds
the values this file asks for, so two sweep files can share runs), so an interrupted sweep
resumes where it stopped. The results are rewritten after every finished run, so that they can
be committed as they grow. A run whose directory is gone (a fresh clone, another machine) but
whose row is in the committed results of a sweep file beside this one with the same
``runs_dir`` is not trained again: the row is kept, and a validation row still chooses its
rate. Such a row is used only when its name, seed, verb, model, method, preprocessing, epochs
and learning rate are what this file asks for (validation rows: the rate, split share and
split seed). A run whose directory other runs read (a teacher, an export's source) and an
export are run again only when a run that reads them has to run. A run killed between epochs
continues from its checkpoint. A run directory left with neither a summary nor a checkpoint is
moved aside to ``seedS.interrupted-TIME``, never deleted. With ``--jobs N`` N runs train at once, each in a
process of its own with the machine's threads split between them (on a GPU they share it);
a run starts when the runs it names have finished. A failed run is reported and the others
go on; its dependants are skipped.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

import teachers
from kd import cmatrix, runs
from kd.calibration import CALIBRATION, read_calibration
from kd.config import TrainConfig, load_yaml_config
from kd.errors import KDError, NonFiniteError
from kd.metrics import row_entropy_bits

VERBS = ("train-teacher", "distill", "proxy-export", "teacher-cache")
#: verbs that write one file from a finished run (``run: NAME``) instead of training; the file each writes
ARTIFACTS = {"proxy-export": "c_matrix.safetensors", "teacher-cache": "cache.safetensors"}
RUN_KEYS = ("name", "verb", "seeds", "table", "run", "from", "lr_grid", "lr_from", "exclusive")  # not config keys
SELECT_DEFAULTS = {"val_fraction": 0.1, "val_seed": 0, "seeds": [0], "extend": 3}
STOPPED = "stopped.json"  # in a validation run's directory: the run stopped on a non-finite loss (its result)
REFERENCE = re.compile(r"\{runs_dir\}/([^/]+)/")


def _grid(values, where: str) -> list[float]:
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
        spec["select"] = {**SELECT_DEFAULTS, **sel, "lr": _grid(sel["lr"], f"{path}: select.lr")}
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
            run["lr_grid"] = _grid(run["lr_grid"], f"{where}: lr_grid")
        if run["verb"] in ARTIFACTS:
            missing = set(run.get("seeds", spec["seeds"])) - set(names[run["run"]].get("seeds", spec["seeds"]))
            if missing:
                raise KDError(f"{where}: run '{run['run']}' has no seed {sorted(missing)[0]} to export")
        else:  # check config keys now, not halfway through the sweep
            cfg = TrainConfig.from_dict({**spec["base"], **_config_keys(run, spec["runs_dir"], 0)}, where=where,
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


def _config_keys(run: dict[str, Any], runs_dir: str, seed: int) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k not in RUN_KEYS}
    return {k: v.replace("{runs_dir}", runs_dir).replace("{seed}", str(seed)) if isinstance(v, str) else v
            for k, v in out.items()}


def _run_dir(spec, name: str, seed: int) -> Path:
    return Path(spec["runs_dir"]) / name / f"seed{seed}"


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def selects(spec, run: dict[str, Any]) -> bool:
    """Whether ``run``'s learning rate is chosen on validation data by this sweep."""
    if run["verb"] in ARTIFACTS or "lr" in run or "lr_from" in run:
        return False
    return "lr_grid" in run or "select" in spec


def _selection(spec) -> dict[str, Any]:
    return spec.get("select", {**SELECT_DEFAULTS, "lr": []})


def lr_grid(spec, run: dict[str, Any]) -> list[float]:
    """The grid as the file writes it (without the rates the edge rule adds: see :meth:`Plan.grid`)."""
    return run.get("lr_grid") or _selection(spec)["lr"]


def _best(means: pd.Series) -> float:
    """The rate with the best mean validation accuracy (a stopped run counts as the worst); ties: the smaller."""
    means = means.fillna(float("-inf"))
    return float(means.index[means.values == means.max()].min())


def _selection_dir(spec, name: str, lr: float, seed: int) -> Path:
    return Path(spec["runs_dir"]) / name / "select" / f"{_lr_tag(lr)}-seed{seed}"


def ledger(spec, sweeps_dir: Path | None) -> dict[Path, dict[str, Any]]:
    """Runs recorded in the committed results of the sweep files in ``sweeps_dir`` that share this
    sweep's ``runs_dir``: run directory -> its CSV row (``_kind`` final) or validation row (select)."""
    out: dict[Path, dict[str, Any]] = {}
    if sweeps_dir is None:
        return out
    for f in sorted(Path(sweeps_dir).glob("*.yaml")):
        try:
            other = load_sweep(f)
        except (KDError, OSError, yaml.YAMLError):
            continue  # not a sweep file, or one this version cannot read: nothing recorded
        if other["runs_dir"] != spec["runs_dir"]:
            continue
        prefix = Path(other["results"])
        for path, kind in ((prefix.with_suffix(".csv"), "final"),
                           (prefix.with_name(prefix.name + "_selection.csv"), "select")):
            if not path.is_file():
                continue
            for r in pd.read_csv(path).to_dict("records"):
                if kind == "final":
                    out[_run_dir(other, r["name"], int(r["seed"]))] = {**r, "_kind": kind}
                else:
                    out[_selection_dir(other, r["name"], float(r["lr"]), int(r["seed"]))] = {**r, "_kind": kind}
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


@dataclass
class Task:
    """One run directory to fill: a selection run, a final run or a proxy export."""

    name: str
    kind: str                     # "select" | "final" | "export"
    seed: int
    out: Path
    lr: float | None = None       # selection runs: the grid value
    deps: set = field(default_factory=set)  # keys of the tasks that must finish first

    @property
    def key(self) -> tuple:
        return (self.name, self.kind, self.lr, self.seed)

    def label(self) -> str:
        lr = f" lr {self.lr:g} (validation)" if self.kind == "select" else ""
        return f"{self.name} seed {self.seed}{lr}"


class Plan:
    """Every task of a sweep with its dependencies, and the learning rates chosen so far."""

    def __init__(self, spec, sweeps_dir: Path | None = None):
        self.spec = spec
        self.runs = {r["name"]: r for r in spec["runs"]}
        self.ledger = ledger(spec, sweeps_dir)
        self.read_by_others = {ref for r in spec["runs"] for ref in references(r)}
        self.tasks: dict[tuple, Task] = {}
        for run in spec["runs"]:
            name = run["name"]
            if selects(spec, run):
                for lr in self.grid(name)[0]:
                    self._add_select(name, lr)
            kind = "export" if run["verb"] in ARTIFACTS else "final"
            for s in run.get("seeds", spec["seeds"]):
                self._add(Task(name, kind, s, _run_dir(spec, name, s)))
        for t in self.tasks.values():
            run = self.runs[t.name]
            for ref in references(run):
                t.deps |= self.finals(ref)
            if t.kind == "final":
                source = run.get("lr_from", t.name)
                t.deps |= {k for k, u in self.tasks.items() if u.name == source and u.kind == "select"}
                if "lr_from" in run and not selects(spec, self.runs[source]):
                    t.deps |= self.finals(source)  # nothing to choose: its rate is its config's

    def _add(self, task: Task) -> None:
        self.tasks[task.key] = task

    def _add_select(self, name: str, lr: float) -> list[Task]:
        new = []
        for s in _selection(self.spec)["seeds"]:
            t = Task(name, "select", s, _selection_dir(self.spec, name, lr, s), lr)
            if t.key not in self.tasks:
                self._add(t)
                new.append(t)
        return new

    def val_row(self, name: str, lr: float, seed: int) -> dict[str, Any] | None:
        """The validation result of ``name`` at ``lr`` and selection seed ``seed``: from its run directory
        (a summary, or ``stopped.json`` for a run that stopped non-finite), else the committed results."""
        sel = _selection(self.spec)
        d = _selection_dir(self.spec, name, lr, seed)
        head = {"name": name, "lr": lr, "seed": seed, "val_fraction": sel["val_fraction"], "val_seed": sel["val_seed"]}
        if (d / runs.SUMMARY).is_file():
            m = json.loads((d / runs.SUMMARY).read_text())
            return {**head, **{k: m[k] for k in m if k.startswith("val_") and k not in ("val_fraction", "val_seed")}}
        if (d / STOPPED).is_file():
            return {**head, "val_acc": float("nan"), "stopped": json.loads((d / STOPPED).read_text())["stopped"]}
        row = self.committed(Task(name, "select", seed, d, lr))  # gone, or interrupted: the committed row stands
        if row is None:
            return None
        return {k: v for k, v in row.items() if k not in ("_kind", "chosen", "grid", "extended")}

    def grid(self, name: str) -> tuple[list[float], str]:
        """``name``'s grid with the rates the edge rule has added so far, and where its best rate lies:
        ``interior``, ``cap`` (at an edge after ``select.extend`` additions on that side), ``edge`` (a grid
        that cannot grow) or ``pending`` (validation runs still to come)."""
        base = sorted(lr_grid(self.spec, self.runs[name]))
        sel = _selection(self.spec)
        cap = int(sel["extend"]) if len(base) > 1 else 0
        grid, up, down = list(base), 0, 0
        while True:
            rows = [self.val_row(name, lr, s) for lr in grid for s in sel["seeds"]]
            if any(r is None for r in rows):
                return grid, "pending"
            best = _best(pd.DataFrame(rows).groupby("lr")["val_acc"].mean())
            if len(grid) > 1 and grid[0] < best < grid[-1]:
                return grid, "interior"
            if best == grid[-1] and up < cap:
                grid.append(float(f"{grid[-1] * base[-1] / base[-2]:.12g}"))
                up += 1
            elif best == grid[0] and down < cap:
                grid.insert(0, float(f"{grid[0] * base[0] / base[1]:.12g}"))
                down += 1
            else:
                return grid, "cap" if cap else "edge"

    def extend(self, name: str) -> list[Task]:
        """The validation tasks the edge rule adds to ``name``'s grid now that more of its results are in;
        every final run whose rate comes from ``name`` waits for them."""
        if not selects(self.spec, self.runs[name]):
            return []
        new = [t for lr in self.grid(name)[0] for t in self._add_select(name, lr)]
        for t in new:  # a student's validation runs read its teacher, as its first ones do
            for ref in references(self.runs[name]):
                t.deps |= self.finals(ref)
        if new:
            keys = {t.key for t in new}
            for t in self.tasks.values():
                if t.kind == "final" and self.rate_source(t.name) == name:
                    t.deps |= keys
        return new

    def rate_source(self, name: str) -> str:
        run = self.runs[name]
        return self.rate_source(run["lr_from"]) if "lr_from" in run else name

    def finals(self, name: str) -> set:
        return {k for k, t in self.tasks.items() if t.name == name and t.kind in ("final", "export")}

    def chosen_lr(self, name: str) -> float | None:
        """The learning rate ``name``'s final runs use: chosen on validation, taken from another run, or set."""
        run = self.runs[name]
        if "lr_from" in run:
            return self.chosen_lr(run["lr_from"])
        if not selects(self.spec, run):
            return None  # the config's own
        table = selection_frame(self.spec, [run], ledger_of=self)
        if table.empty:
            return None
        return _best(table.groupby("lr")["val_acc"].mean())

    def recorded(self, task: Task) -> dict[str, Any] | None:
        """``task``'s row in the committed results when its directory holds no run and the row
        matches what this sweep asks (see the module's docstring); else None."""
        if task.kind == "export" or task.out.exists():
            return None
        return self.committed(task)

    def committed(self, task: Task) -> dict[str, Any] | None:
        """``task``'s row in the committed results when it matches what this sweep asks; else None."""
        row = self.ledger.get(task.out)
        if row is None or row["_kind"] != task.kind:
            return None
        if task.kind == "select":
            sel = _selection(self.spec)
            want = {"lr": task.lr, "val_fraction": sel["val_fraction"], "val_seed": sel["val_seed"]}
        else:
            run = self.runs[task.name]
            if not all(self._holds(ref, task.seed) for ref in references(run)):
                return None  # it read a run that has to run again (a teacher whose chosen rate moved)
            cfg = self.config(task)
            want = {"verb": run["verb"], "model": cfg.model, "preprocess": cfg.preprocess, "epochs": cfg.epochs,
                    "lr": cfg.lr, **({"method": cfg.method} if run["verb"] == "train-teacher" else {}),
                    **({"c_lr_scale": cfg.c_lr_scale} if cfg.c_lr_scale != 1 else {}),
                    **({"optimizer": cfg.optimizer} if cfg.optimizer != "sgd" else {})}
        return row if all(_same(row.get(k), v) for k, v in want.items()) else None

    def _holds(self, name: str, seed: int) -> bool:
        """Whether run ``name``'s directory for ``seed`` (every seed when it has no such seed) is finished or
        in the committed results as this sweep asks for it now."""
        tasks = [t for t in self.tasks.values() if t.name == name and t.kind != "select"]
        tasks = [t for t in tasks if t.seed == seed] or tasks
        verb = self.runs[name]["verb"]
        for t in tasks:
            if t.kind == "export":
                if not all(self._holds(ref, t.seed) for ref in references(self.runs[name])):
                    return False
            elif t.out in self.ledger:  # the committed rows of its readers were made from this one
                if self.committed(t) is None:
                    return False  # made with other values than this sweep asks now
            elif not _finished(t, verb) and self.runs[name].get("table", True) is not False:
                return False  # neither here nor committed (a run out of the table cannot be checked: it holds)
        return True

    def must_run(self, task: Task) -> bool:
        """Whether ``task`` has to train or write now: it is not finished, and it is neither in the
        committed results nor, for an export or a run other runs read, needed by no unfinished reader."""
        if _finished(task, self.runs[task.name]["verb"]):
            return False
        if task.kind == "export" or (task.kind == "final" and task.name in self.read_by_others):
            return self.needed(task.name)
        row = self.recorded(task)
        return row is None or self._uncalibrated(task, row)

    def needs_calibration(self, task: Task) -> bool:
        """A finished final run of a sweep that asks for calibration, not yet temperature-scaled."""
        return task.kind == "final" and self.spec["calibrate"] and not (task.out / CALIBRATION).is_file()

    def _uncalibrated(self, task: Task, row: dict[str, Any]) -> bool:
        """A committed final row made before the sweep asked for calibration: it stays in the table until
        its run is trained again (its network is gone, and temperature scaling needs it)."""
        return task.kind == "final" and self.spec["calibrate"] and pd.isna(row.get("test_ece_ts", float("nan")))

    def needed(self, name: str) -> bool:
        """Whether run ``name``'s directories must exist: a run that reads them still has to run
        (neither finished nor in the committed results), or nothing reads them (the run is a product)."""
        readers = {r["name"] for r in self.spec["runs"] if name in references(r)}
        return not readers or any(self.must_run(t) for t in self.tasks.values() if t.name in readers)

    def config(self, task: Task) -> TrainConfig:
        run = self.runs[task.name]
        keys = {**self.spec["base"], **_config_keys(run, self.spec["runs_dir"], task.seed), "seed": task.seed}
        if task.kind == "select":
            sel = _selection(self.spec)
            keys.update(lr=task.lr, val_fraction=sel["val_fraction"], val_seed=sel["val_seed"])
        else:
            lr = self.chosen_lr(task.name)
            if lr is not None:
                keys["lr"] = lr
        return TrainConfig.from_dict(keys, where=f"{task.name}", option_names=teachers.option_names()).with_cli_defaults()

    def asked(self, task: Task) -> dict[str, Any]:
        """The config values the sweep sets for ``task`` (the rest are defaults or resolved at run time)."""
        run = self.runs[task.name]
        keys = set(self.spec["base"]) | set(_config_keys(run, self.spec["runs_dir"], task.seed)) | {"seed", "lr"}
        if task.kind == "select":
            keys |= {"val_fraction", "val_seed"}
        full = self.config(task).to_dict()
        return {k.replace("-", "_"): full[k.replace("-", "_")] for k in keys}


def _finished(task: Task, verb: str) -> bool:
    if task.kind == "select" and (task.out / STOPPED).is_file():
        return True  # its result is that it stopped
    return (task.out / ARTIFACTS.get(verb, runs.SUMMARY)).is_file()


def _check_same_config(task: Task, asked: dict[str, Any]) -> None:
    """A finished run is reused only when it was run with the values this sweep asks for."""
    path = task.out / runs.CONFIG
    try:
        have = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        raise KDError(f"{task.out} is finished but its {runs.CONFIG} cannot be read; move it aside to rerun it") from None
    names = teachers.option_names()
    have = TrainConfig.from_dict({k: v for k, v in have.items() if k in TrainConfig.__dataclass_fields__ or k in names},
                                 option_names=names).to_dict()
    for k, v in asked.items():
        if have.get(k) != v:
            raise KDError(f"{task.out} is a finished run with {k} = {have.get(k)!r}, but this sweep asks for {v!r}; "
                          f"give the sweep another runs_dir or the run another name (nothing was changed)")


def _move_aside_if_interrupted(task: Task, log) -> bool:
    """True when ``task.out`` holds a checkpoint to resume; an unfinished directory without one is moved aside."""
    if (task.out / runs.CHECKPOINT).is_file():
        return True
    if task.out.exists():
        aside = task.out.with_name(f"{task.out.name}.interrupted-{time.strftime('%Y%m%dT%H%M%S')}")
        task.out.rename(aside)
        log(f"[sweep] {task.out} had no summary and no checkpoint (interrupted); moved to {aside}")
    return False


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one task described by plain values (so that a worker process can take it); returns its summary."""
    from kd.app.jobs import cache_job, calibrate_run, distill_job, export_proxy_job, train_teacher_job

    if job["verb"] == "calibrate":
        return calibrate_run(job["out"], data_root=job["data_root"], device=job["device"])
    if job["verb"] in ARTIFACTS:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        if job["verb"] == "proxy-export":
            export_proxy_job(job["src"], out / ARTIFACTS["proxy-export"], job["from"], device=job["device"])
        else:
            cache_job(job["src"], None, out / ARTIFACTS["teacher-cache"], device=job["device"])
        return {}
    fn = train_teacher_job if job["verb"] == "train-teacher" else distill_job
    cfg = TrainConfig.from_dict(job["config"], option_names=teachers.option_names())
    summary = fn(cfg, job["out"], progress=False, log=None, resume=job["resume"]).summary
    if job.get("calibrate"):
        calibrate_run(job["out"], data_root=cfg.data_root, device=cfg.device)
    return summary


def _init_worker(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


class _Inline:
    """An executor that runs each task when it is submitted, in this process (``--jobs 1``)."""

    def submit(self, fn, *args) -> cf.Future:
        f: cf.Future = cf.Future()
        try:
            f.set_result(fn(*args))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # reported like a worker's failure
            f.set_exception(e)
        return f

    def shutdown(self, *args, **kwargs) -> None:
        pass


def run_sweep(path: str | Path, log: Callable[[str], None] | None = print, jobs: int = 1) -> pd.DataFrame:
    """Run every unfinished task of the sweep file (``jobs`` at a time), then write the results."""
    if jobs < 1:
        raise KDError(f"--jobs must be at least 1, got {jobs}")
    spec = load_sweep(path)
    log = log or (lambda *_: None)
    plan = Plan(spec, Path(path).parent)
    started = time.perf_counter()
    done: set = set()
    failed: dict[tuple, str] = {}
    waiting = list(plan.tasks.values())  # file order: runs, then seeds
    running: dict[cf.Future, tuple[Task, float]] = {}
    inline = _Inline()

    def grow(task: Task) -> None:  # a validation result is in: the edge rule may add rates to its grid
        if task.kind == "select":
            for t in plan.extend(task.name):
                log(f"[sweep] {t.name}: the best rate so far is at the edge of its grid; adding lr {t.lr:g} (validation)")
                waiting.insert(0, t)

    if jobs == 1:
        pool = inline
    else:
        import torch

        threads = max(1, torch.get_num_threads() // jobs)
        log(f"[sweep] {jobs} runs at a time, {threads} thread(s) each")
        pool = cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(threads,))
    try:
        while waiting or running:
            for task in list(waiting):
                if len(running) >= jobs:
                    break
                if task.deps & set(failed):
                    waiting.remove(task)
                    failed[task.key] = "a run it needs failed"
                    log(f"[sweep] {task.label()}: skipped, a run it needs failed")
                    continue
                if not task.deps <= done:
                    continue
                alone = bool(plan.runs[task.name].get("exclusive", False))
                if alone and running:
                    break  # let the running ones finish; start nothing else before it
                waiting.remove(task)
                job = _job(plan, task, log)
                if job is None:
                    done.add(task.key)
                    grow(task)
                    continue
                log(f"[sweep] {task.label()}{' resumed' if job.get('resume') else ''}{' (alone)' if alone else ''} ...")
                t0 = time.perf_counter()
                # an exclusive run trains in this process, with all its threads, while nothing else runs
                running[(inline if alone else pool).submit(execute, job)] = (task, t0)
            if not running:
                if waiting and not any(t.deps <= done | set(failed) for t in waiting):
                    raise KDError("sweep: runs wait on runs that never finish (a dependency cycle)")
                continue
            finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for f in finished:
                task, t0 = running.pop(f)
                try:
                    summary = f.result()
                except Exception as e:
                    if not (isinstance(e, NonFiniteError) and task.kind == "select"):
                        failed[task.key] = f"{type(e).__name__}: {e}"  # one failed run does not stop the others
                        log(f"[sweep] {task.label()}: FAILED ({failed[task.key]})")
                        continue
                    # a rate at which training stops is a result of the selection: the worst one
                    (task.out / STOPPED).write_text(json.dumps({"stopped": str(e), "lr": task.lr}, indent=1) + "\n")
                    summary = {}
                    log(f"[sweep] {task.label()}: stopped, not finite (counts as the worst rate)")
                done.add(task.key)
                grow(task)
                ev = summary.get("evaluated_on")
                score = (f"{ev} acc {summary[ev + '_acc']:.4f} " if ev else "written " if task.kind == "export" else
                         f"calibrated, T {summary['temperature']:.3f} " if "fitted_on" in summary else "")
                if summary or task.kind == "export":
                    log(f"[sweep] {task.label()}: {score}({time.perf_counter() - t0:.0f}s)")
                if task.kind != "export":  # the results grow run by run: commit them as they come
                    write_results(spec, collect(spec, plan), selection_frame(spec, spec["runs"], plan),
                                  time.perf_counter() - started, path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    df = collect(spec, plan)
    write_results(spec, df, selection_frame(spec, spec["runs"], plan), time.perf_counter() - started, path)
    if failed:
        first = next(iter(failed.items()))
        raise KDError(f"{len(failed)} run(s) of the sweep did not finish (first: {first[0][0]} seed {first[0][3]}: "
                      f"{first[1]}); the finished ones are in {spec['results']}.csv; fix the cause and rerun the sweep")
    return df


def pending(path: str | Path) -> str:
    """What `kd sweep FILE` would do now, without doing it: each run's grid and where its chosen rate lies,
    then the tasks that would train or write (those waiting on a result that may add rates are not listed yet)."""
    spec = load_sweep(path)
    plan = Plan(spec, Path(path).parent)
    lines = []
    for run in spec["runs"]:
        if selects(spec, run):
            grid, where = plan.grid(run["name"])
            chosen = plan.chosen_lr(run["name"])
            lines.append(f"{run['name']}: grid {', '.join(f'{v:g}' for v in grid)}; "
                         f"chosen {'-' if chosen is None else f'{chosen:g}'} ({where})")
    todo = []
    for t in plan.tasks.values():
        verb = plan.runs[t.name]["verb"]
        if _finished(t, verb):
            if plan.needs_calibration(t):
                todo.append(f"  {t.label()}: calibrate")
            continue
        if plan.must_run(t):
            todo.append(f"  {t.label()}" + ("" if t.kind != "final" or plan.recorded(t) is None else
                                            " (committed row without calibration: train again)"))
    lines.append(f"{len(todo)} task(s) to run now" + (":" if todo else ""))
    return "\n".join(lines + todo)


def _job(plan: Plan, task: Task, log) -> dict[str, Any] | None:
    """The plain description of ``task`` for :func:`execute`, or None when it is already finished."""
    run = plan.runs[task.name]
    if task.kind == "export":
        if not plan.must_run(task):
            return None
        src = Path(plan.spec["runs_dir"]) / run["run"] / f"seed{task.seed}"
        return {"verb": run["verb"], "out": str(task.out), "src": str(src), "from": run.get("from", "auto"),
                "device": plan.spec["base"].get("device", "auto")}
    asked = plan.asked(task)
    if _finished(task, run["verb"]):
        _check_same_config(task, asked)
        if plan.needs_calibration(task):
            return {"verb": "calibrate", "out": str(task.out), "device": plan.spec["base"].get("device", "auto"),
                    "data_root": plan.spec["base"].get("data_root")}
        return None
    if not plan.must_run(task):
        log(f"[sweep] {task.label()}: in the committed results, or read only by runs that are; not run again")
        return None
    resume = _move_aside_if_interrupted(task, log)
    if resume:
        _check_same_config(task, asked)
    return {"verb": run["verb"], "config": plan.config(task).to_dict(), "out": str(task.out), "resume": resume,
            "calibrate": task.kind == "final" and plan.spec["calibrate"]}


def selection_frame(spec, run_list: list[dict[str, Any]], plan: Plan | None = None,
                    ledger_of: Plan | None = None) -> pd.DataFrame:
    """One row per finished validation run of the runs in ``run_list``: name, lr, seed, val metrics, chosen.
    A run whose directory is gone comes from the committed results of ``ledger_of`` (or ``plan``)."""
    rows = []
    sel = _selection(spec)
    book = ledger_of or plan or Plan(spec)
    for run in run_list:
        if not selects(spec, run):
            continue
        grid, where = book.grid(run["name"])
        base = lr_grid(spec, run)
        for lr in grid:
            for s in sel["seeds"]:
                if (row := book.val_row(run["name"], lr, s)) is not None:
                    rows.append({**row, "extended": not any(_same(lr, b) for b in base), "grid": where})
    df = pd.DataFrame(rows)
    if plan is not None and not df.empty:
        chosen = {n: plan.chosen_lr(n) for n in df["name"].unique()}
        df["chosen"] = [chosen[n] == lr for n, lr in zip(df["name"], df["lr"])]
    return df


def collect(spec, plan: Plan | None = None) -> pd.DataFrame:
    """One tidy row per finished (run, seed) that belongs in the table."""
    plan = plan or Plan(spec)
    sel = selection_frame(spec, spec["runs"], ledger_of=plan)
    rows = []
    for run in spec["runs"]:
        if run["verb"] in ARTIFACTS or run.get("table", True) is False:
            continue
        how = ("validation" if selects(spec, run) else f"as {run['lr_from']}" if "lr_from" in run else "fixed")
        src = plan.rate_source(run["name"])
        where = plan.grid(src)[1] if selects(spec, plan.runs[src]) else ""
        for seed in run.get("seeds", spec["seeds"]):
            p = _run_dir(spec, run["name"], seed) / runs.SUMMARY
            if not p.is_file():
                # committed earlier, its directory gone or holding an interrupted run: the committed row stands
                row = plan.committed(Task(run["name"], "final", seed, p.parent))
                if row is not None:
                    rows.append({**{k: v for k, v in row.items() if k != "_kind"}, "grid": where})
                continue
            s = json.loads(p.read_text())
            cfg = yaml.safe_load((p.parent / runs.CONFIG).read_text()) or {}
            c_path = p.parent / runs.C_MATRIX
            entropy = float(row_entropy_bits(cmatrix.load_c_matrix(c_path)[0]).mean()) if c_path.is_file() else float("nan")
            cal = read_calibration(p.parent) or {}
            source = run.get("lr_from", run["name"])
            val = sel[(sel["name"] == source) & (sel["lr"] == cfg.get("lr"))] if not sel.empty else sel
            rows.append({"name": run["name"], "verb": run["verb"], "method": s.get("method"),
                         "teacher": s.get("teacher"), "model": s["model"], "preprocess": s.get("preprocess", "matched"),
                         "seed": seed, "lr": cfg.get("lr"), "lr_chosen_by": how, "grid": where,
                         "val_acc_at_lr": float(val["val_acc"].mean()) if len(val) else float("nan"),
                         "test_acc": s["test_acc"], "test_nll": s["test_nll"], "test_ece": s["test_ece"],
                         "test_aece": s.get("test_aece", float("nan")),
                         **({k: cal.get(k, float("nan")) for k in ("temperature", "test_nll_ts", "test_ece_ts", "test_aece_ts")}
                            if spec["calibrate"] or cal else {}),
                         "c_row_entropy_bits": entropy,
                         "c_row_max": s.get("c_row_max", float("nan")), "train_acc": s.get("train_acc", float("nan")),
                         "optimizer": cfg.get("optimizer"), "c_lr_scale": cfg.get("c_lr_scale", 1.0),
                         "epochs": s["epochs"],
                         "train_seconds": s["train_seconds"], "seconds_per_epoch": s["seconds_per_epoch"],
                         "timed_alone": bool(run.get("exclusive", False)), "machine": s.get("machine", "")})
    return pd.DataFrame(rows)


def summary_table(df) -> str:
    """mean +- std over seeds (accuracy and ECE in percent, as the paper reports them); the learning
    rate, adaptive ECE, temperature-scaled (TS) NLL and ECEs, C row entropy and training time columns
    appear when the results have them
    (training time only for runs trained alone on the machine, ``exclusive: true``)."""
    has_lr = "lr" in df.columns
    has_aece = "test_aece" in df.columns and df["test_aece"].notna().any()
    has_ts = "test_ece_ts" in df.columns and df["test_ece_ts"].notna().any()
    has_c = "c_row_entropy_bits" in df.columns and df["c_row_entropy_bits"].notna().any()
    has_max = "c_row_max" in df.columns and df["c_row_max"].notna().any()
    has_time = "timed_alone" in df.columns and df["timed_alone"].any()
    head = ["run", "model"] + (["lr"] if has_lr else []) + ["seeds", "test acc (%)", "NLL", "ECE (%)"] + \
        (["adaptive ECE (%)"] if has_aece else []) + \
        (["T", "NLL after TS", "ECE after TS (%)", "adaptive ECE after TS (%)"] if has_ts else []) + \
        (["C row entropy (bits)"] if has_c else []) + \
        (["C row max"] if has_max else []) + \
        (["training time (s)"] if has_time else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in df.groupby("name", sort=False):
        def ms(col, scale=1.0, fmt=".2f"):
            std = g[col].std(ddof=1) if len(g) > 1 else float("nan")
            return f"{g[col].mean() * scale:{fmt}} ± {std * scale:{fmt}}"
        cells = [name, g["model"].iloc[0]] + ([", ".join(f"{v:g}" for v in sorted(g["lr"].unique()))] if has_lr else []) + \
            [str(len(g)), ms("test_acc", 100), ms("test_nll", 1, ".3f"), ms("test_ece", 100)] + \
            ([ms("test_aece", 100)] if has_aece else []) + \
            ([ms("temperature", 1, ".3f"), ms("test_nll_ts", 1, ".3f"), ms("test_ece_ts", 100), ms("test_aece_ts", 100)]
             if has_ts and g["test_ece_ts"].notna().all() else ["", "", "", ""] if has_ts else []) + \
            ([ms("c_row_entropy_bits") if g["c_row_entropy_bits"].notna().all() else ""] if has_c else []) + \
            ([ms("c_row_max", 1, ".3f") if g["c_row_max"].notna().all() else ""] if has_max else []) + \
            ([ms("train_seconds", 1, ".0f") if g["timed_alone"].all() else ""] if has_time else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(sel: pd.DataFrame) -> str:
    """Validation accuracy (%) per run and grid value (mean over selection seeds); the chosen rate in bold,
    rates the edge rule added in italics, a rate whose run stopped non-finite as "stopped"; the last
    column says where the chosen rate lies in its grid."""
    if sel.empty:
        return ""
    grid = sorted(sel["lr"].unique())
    has_grid = "grid" in sel.columns
    lines = ["| run | " + " | ".join(f"lr {v:g}" for v in grid) + (" | chosen rate |" if has_grid else " |"),
             "|---|" + "---|" * (len(grid) + has_grid)]
    for name, g in sel.groupby("name", sort=False):
        means = g.groupby("lr")["val_acc"].mean()
        chosen = set(g.loc[g["chosen"], "lr"]) if "chosen" in g else set()
        added = set(g.loc[g["extended"].astype(bool), "lr"]) if "extended" in g else set()

        def cell(v):
            if v not in means:
                return ""
            text = "stopped" if pd.isna(means[v]) else f"{means[v] * 100:.2f}"
            text = f"*{text}*" if v in added else text
            return f"**{text}**" if v in chosen else text
        where = {"interior": "inside the grid", "cap": "at an edge, cap reached", "edge": "at an edge",
                 "pending": "runs to come"}.get(str(g["grid"].iloc[0]), "") if has_grid else None
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in grid) + (f" | {where} |" if has_grid else " |"))
    return "\n".join(lines)


def write_results(spec, df, sel: pd.DataFrame, seconds: float, path) -> None:
    prefix = Path(spec["results"])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(prefix.with_suffix(".csv"), index=False)
    text = (f"Sweep `{path}` (`kd sweep {path}`); std over seeds with ddof=1; final-epoch test metrics.\n"
            f"This invocation took {seconds:.0f}s (finished runs are skipped on a rerun; "
            f"the per-run train_seconds are in the CSV).\n\n" + (summary_table(df) if not df.empty else "(no finished runs)") + "\n")
    if not sel.empty:
        s = _selection(spec)
        sel.to_csv(prefix.with_name(prefix.name + "_selection.csv"), index=False)
        text += (f"\nValidation accuracy (%) by learning rate, each run trained on the training set minus a stratified "
                 f"{s['val_fraction']:g} share (split seed {s['val_seed']}; run seeds {', '.join(map(str, s['seeds']))}) "
                 f"and evaluated on that share; the chosen rate in bold (ties: the smaller); rates added by the edge rule "
                 f"(up to {s['extend']} a side) in italics:\n\n"
                 + selection_table(sel) + "\n")
    prefix.with_suffix(".md").write_text(text)
