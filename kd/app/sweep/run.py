"""`kd sweep FILE`: the scheduler that fills a plan's run directories (``--jobs N`` at a time), and its dry run."""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

import teachers
from kd import runs
from kd.config import TrainConfig
from kd.errors import KDError, NonFiniteError
from kd.app.sweep.plan import Plan, Task, finished, selection_frame
from kd.app.sweep.tables import collect, write_results
from kd.app.sweep.spec import ARTIFACTS, STOPPED, load_sweep, selects


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
        if finished(t, verb):
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
    if finished(task, run["verb"]):
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
