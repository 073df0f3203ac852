"""The task graph of a sweep (:class:`Plan`): every run directory to fill, what it waits for, the rates chosen so far
and the edge rule that grows a grid."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import teachers
from kd import runs
from kd.calibration import CALIBRATION
from kd.config import TrainConfig
from kd.app.sweep.ledger import ledger, same_value
from kd.app.sweep.spec import (ARTIFACTS, STOPPED, best_rate, config_keys, lr_grid, references, run_dir, selection,
                               selection_dir, selects)


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
                self._add(Task(name, kind, s, run_dir(spec, name, s)))
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
        for s in selection(self.spec)["seeds"]:
            t = Task(name, "select", s, selection_dir(self.spec, name, lr, s), lr)
            if t.key not in self.tasks:
                self._add(t)
                new.append(t)
        return new

    def val_row(self, name: str, lr: float, seed: int) -> dict[str, Any] | None:
        """The validation result of ``name`` at ``lr`` and selection seed ``seed``: from its run directory
        (a summary, or ``stopped.json`` for a run that stopped non-finite), else the committed results."""
        sel = selection(self.spec)
        d = selection_dir(self.spec, name, lr, seed)
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
        sel = selection(self.spec)
        cap = int(sel["extend"]) if len(base) > 1 else 0
        grid, up, down = list(base), 0, 0
        while True:
            rows = [self.val_row(name, lr, s) for lr in grid for s in sel["seeds"]]
            if any(r is None for r in rows):
                return grid, "pending"
            best = best_rate(pd.DataFrame(rows).groupby("lr")["val_acc"].mean())
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
        return best_rate(table.groupby("lr")["val_acc"].mean())

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
            sel = selection(self.spec)
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
        return row if all(same_value(row.get(k), v) for k, v in want.items()) else None

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
            elif not finished(t, verb) and self.runs[name].get("table", True) is not False:
                return False  # neither here nor committed (a run out of the table cannot be checked: it holds)
        return True

    def must_run(self, task: Task) -> bool:
        """Whether ``task`` has to train or write now: it is not finished, and it is neither in the
        committed results nor, for an export or a run other runs read, needed by no unfinished reader."""
        if finished(task, self.runs[task.name]["verb"]):
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
        keys = {**self.spec["base"], **config_keys(run, self.spec["runs_dir"], task.seed), "seed": task.seed}
        if task.kind == "select":
            sel = selection(self.spec)
            keys.update(lr=task.lr, val_fraction=sel["val_fraction"], val_seed=sel["val_seed"])
        else:
            lr = self.chosen_lr(task.name)
            if lr is not None:
                keys["lr"] = lr
        return TrainConfig.from_dict(keys, where=f"{task.name}", option_names=teachers.option_names()).with_cli_defaults()

    def asked(self, task: Task) -> dict[str, Any]:
        """The config values the sweep sets for ``task`` (the rest are defaults or resolved at run time)."""
        run = self.runs[task.name]
        keys = set(self.spec["base"]) | set(config_keys(run, self.spec["runs_dir"], task.seed)) | {"seed", "lr"}
        if task.kind == "select":
            keys |= {"val_fraction", "val_seed"}
        full = self.config(task).to_dict()
        return {k.replace("-", "_"): full[k.replace("-", "_")] for k in keys}


def finished(task: Task, verb: str) -> bool:
    if task.kind == "select" and (task.out / STOPPED).is_file():
        return True  # its result is that it stopped
    return (task.out / ARTIFACTS.get(verb, runs.SUMMARY)).is_file()


def selection_frame(spec, run_list: list[dict[str, Any]], plan: Plan | None = None,
                    ledger_of: Plan | None = None) -> pd.DataFrame:
    """One row per finished validation run of the runs in ``run_list``: name, lr, seed, val metrics, chosen.
    A run whose directory is gone comes from the committed results of ``ledger_of`` (or ``plan``)."""
    rows = []
    sel = selection(spec)
    book = ledger_of or plan or Plan(spec)
    for run in run_list:
        if not selects(spec, run):
            continue
        grid, where = book.grid(run["name"])
        base = lr_grid(spec, run)
        for lr in grid:
            for s in sel["seeds"]:
                if (row := book.val_row(run["name"], lr, s)) is not None:
                    rows.append({**row, "extended": not any(same_value(lr, b) for b in base), "grid": where})
    df = pd.DataFrame(rows)
    if plan is not None and not df.empty:
        chosen = {n: plan.chosen_lr(n) for n in df["name"].unique()}
        df["chosen"] = [chosen[n] == lr for n, lr in zip(df["name"], df["lr"])]
    return df
