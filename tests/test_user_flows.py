"""What a newcomer meets on the command line: files others can read, no noise on a CPU, a distill that runs on
its teacher's data, and a sweep file to start from."""
import json
import logging
import os
import shutil
import stat

import pandas as pd
import torch
import yaml

from conftest import ROOT
from test_data_sources import make_folder


def test_written_files_follow_the_umask(kd_main, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        code, _, err = kd_main("train-teacher", "--epochs", 1, "--out", out, "--quiet", "--device", "cpu")
        assert code == 0, err
        code, _, err = kd_main("proxy", "export", out, "--out", tmp_path / "p.safetensors")
        assert code == 0, err
    finally:
        os.umask(old)
    for f in [*out.iterdir(), tmp_path / "p.safetensors"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # the safetensors writer alone makes 0600


def test_no_cuda_runtime_warning_on_a_cpu_machine(kd_main):
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    try:
        kd_main("demo", "--help")
        if not torch.cuda.is_available():
            assert not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(level)


def test_distill_takes_the_data_set_from_the_teachers_run(kd_main, tmp_path):
    root = make_folder(tmp_path / "pics", n_train=8, n_val=3)
    teacher = tmp_path / "teacher"
    code, _, err = kd_main("train-teacher", "--dataset", f"imagefolder:{root}", "--epochs", 1, "--batch-size", 8,
                           "--out", teacher, "--quiet", "--device", "cpu")
    assert code == 0, err
    for spec in (f"proxy:{teacher}", f"network:{teacher}"):
        out = tmp_path / spec.split(":")[0]
        code, _, err = kd_main("distill", "--teacher", spec, "--epochs", 1, "--batch-size", 8, "--out", out, "--quiet",
                               "--device", "cpu")
        assert code == 0, err
        assert json.loads((out / "summary.json").read_text())["dataset"] == f"imagefolder:{root.resolve()}"
        assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == f"imagefolder:{root.resolve()}"


def test_the_example_sweep_file_runs_as_shipped(tmp_path):
    """The README names benchmarks/sweeps/example.yaml; it runs from a copy with its runs and results moved aside."""
    from kd.app.sweep import run_sweep

    spec = yaml.safe_load((ROOT / "benchmarks" / "sweeps" / "example.yaml").read_text())
    assert {"runs_dir", "results", "seeds", "base", "runs", "select"} <= set(spec)
    spec.update(runs_dir=str(tmp_path / "runs"), results=str(tmp_path / "results" / "example"))
    file = tmp_path / "example.yaml"
    file.write_text(yaml.safe_dump(spec))
    df = run_sweep(file, log=None)
    names = [r["name"] for r in spec["runs"] if r.get("table", True) is not False and r["verb"] != "proxy-export"]
    assert sorted(set(df["name"])) == sorted(names) and len(df) == len(names) * len(spec["seeds"])
    assert (tmp_path / "results" / "example.md").is_file()
    sel = pd.read_csv(tmp_path / "results" / "example_selection.csv")
    grid = spec["select"]["lr"]
    assert set(grid) <= set(sel["lr"]) <= set(grid) | {grid[0] / 2, grid[-1] * 2}  # extend: 1, by the grid's ratio
    assert set(sel["grid"]) <= {"interior", "cap"}
    shutil.rmtree(tmp_path / "runs")
