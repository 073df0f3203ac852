"""Two processes through torch.distributed (gloo on CPU): the engine shards data under accelerate."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_two_process_lspp_training_fills_one_run_directory(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kd",
           "train-teacher", "--method", "lspp", "--epochs", "2", "--batch-size", "64", "--out", str(out), "--device",
           "cpu", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("lspp teacher") == 1  # only rank 0 reports
    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2 and s["epochs"] == 2
    # one metrics row per epoch, written by rank 0 alone
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    assert sorted(p.name for p in out.iterdir()) == [
        "c_matrix.safetensors", "config.yaml", "metrics.csv", "model.safetensors", "summary.json"]


def test_main_leaves_the_group_and_returns_the_code_for_a_script_that_goes_on(monkeypatch, capsys):
    """`main` returns under torchrun too (a user's script may save more after it), having left the process group."""
    import torch

    from kd.app import cli

    left = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: left.append(True))
    assert cli.main(["proxy", "export", "/nonexistent/run", "--out", "/nonexistent/c.safetensors"]) == 2
    assert left == [True] and "is not a finished run" in capsys.readouterr().err


@pytest.mark.parametrize("world, at_once", [("2", True), ("1", False), (None, False)])
def test_finish_ends_a_worker_of_several_at_once_with_the_code(monkeypatch, world, at_once):
    """`kd` and `python -m kd` end through `finish`: under torchrun with several processes through os._exit (the
    interpreter's teardown can abort with DDP's gloo threads still running), else through sys.exit; the code kept."""
    from kd.app import cli

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    exits = []

    def os_exit(code):  # stands in for os._exit, which would end pytest
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", os_exit)
    with pytest.raises(SystemExit) as e:
        cli.finish(3)
    assert e.value.code == 3 and exits == ([3] if at_once else [])
