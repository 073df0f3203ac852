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


@pytest.mark.parametrize("world, ends", [(2, True), (1, False)])
def test_a_worker_leaves_its_group_then_ends_at_once_with_the_commands_code(monkeypatch, capsys, world, ends):
    """Under torchrun with several processes a command leaves the process group and ends the worker through
    os._exit with its own exit code (the interpreter's teardown can abort with DDP's gloo threads still running);
    in one process it returns the code as usual."""
    import torch

    from kd.app import cli

    events = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: events.append("left"))

    def os_exit(code):  # stands in for os._exit, which would end pytest
        events.append(("exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", os_exit)
    argv = ["proxy", "export", "/nonexistent/run", "--out", "/nonexistent/c.safetensors"]  # a one-line error: code 2
    if ends:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert events == ["left", ("exit", 2)]
    else:
        assert cli.main(argv) == 2 and events == ["left"]
    assert "is not a finished run" in capsys.readouterr().err
