"""Two processes through torch.distributed (gloo on CPU): the engine shards data under accelerate."""
import json
import subprocess
import sys

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
