"""One run per run directory: a second run on the same --out refuses instead of interleaving."""
import json
import os
import socket
import subprocess
import sys

import pandas as pd

from conftest import ROOT
from kd.lock import LOCK, run_lock


def test_a_run_on_a_directory_in_use_is_refused_in_one_line(tmp_path, kd_main):
    out = tmp_path / "run"
    with run_lock(out):
        code, _, err = kd_main("train-teacher", "--method", "onehot", "--epochs", 1, "--out", out, "--quiet")
        assert code == 2 and "in use by another run" in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written beside the lock
    assert not (out / LOCK).exists()


def test_a_lock_left_by_a_killed_run_of_this_host_is_taken_over(tmp_path, kd_main):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    code, _, err = kd_main("train-teacher", "--method", "onehot", "--epochs", 1, "--out", out, "--quiet")
    assert code == 0, err
    assert (out / "summary.json").is_file() and not (out / LOCK).exists()


def test_two_runs_started_together_on_one_out_leave_one_intact_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kd", "train-teacher", "--method", "lspp", "--epochs", "3", "--device", "cpu",
           "--quiet", "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[2] == 2)[1]
    assert ("in use by another run" in refused or "already exists" in refused) and len(refused.strip().splitlines()) == 1
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
