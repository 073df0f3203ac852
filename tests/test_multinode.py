"""Data-parallel runs through torchrun (gloo on CPU, digits, LeNet): a kill -9 mid-run and two nodes.

1. A two-process run killed with SIGKILL (the launcher's process group and each worker's:
   torchrun starts every worker in a session of its own) once its second epoch is on disk and continued with ``--resume`` ends bit for bit where the uninterrupted
   two-process run ends: final weights, C-matrix and every metrics column but ``seconds``.
   Digits has no batch augmentation (no pad-and-crop, no flip), so the comparison is also run
   with ``--mixup 0.2`` (draws from a stream seeded per (seed, epoch, rank)) and ``--cutout 3``
   (drawn from each rank's training-loader generator, seeded ``seed * 1000 + rank``: the
   checkpoint keeps every rank's generator and CPU RNG state, ``rng.loader.<rank>`` /
   ``rng.cpu.<rank>``; with rank 0's alone, rank 1 resumed on rank 0's stream and the final
   weights differed by up to ~1.6e-2).
2. Two nodes simulated on one machine (two torchrun launchers, ``--nnodes 2 --node_rank 0|1``,
   one process each, static rendezvous on 127.0.0.1) give exactly the single-node two-process
   run: torchrun sets RANK globally, so only global rank 0 writes the shared --out.

Every comparison is exact (``torch.equal``, ``check_exact``): no tolerance is needed.

Nothing here can hang: single-node launches use ``--standalone`` (torchrun's store binds a free port
itself); the two-node launch takes a port below the kernel's ephemeral range, checked free, and is
watched as a pair: when one launcher fails, the other is killed at once (torchrun's agent whose workers
succeeded would otherwise wait up to 300 s at its exit barrier for the failed one), and both write to
files, so no full pipe can block a launcher. Every launch exits 0: kd leaves the process group
(``destroy_process_group``) at the end of every command and ends a worker of several with ``os._exit``
(DDP keeps the gloo group's threads alive into the interpreter's teardown, which can abort), and no
teardown abort is tolerated.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
RECIPE = ["--epochs", "{epochs}", "--batch-size", "32", "--device", "cpu", "--quiet"]
TIMEOUT = 300


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def _recipe(epochs, extra):
    return [a.format(epochs=epochs) for a in RECIPE] + list(extra)


def _unused_port():
    """A port below the ephemeral range (where the kernel never hands out ports on its own), free right now."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randrange(20000, low)
        if port == 29500:  # torchrun's default: another launch may hold it
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    pytest.fail(f"no free port found in [20000, {low})")


def _single_node(out, epochs, extra=(), resume=False):
    args = ["--resume", "--out", str(out), "--quiet"] if resume else _recipe(epochs, extra) + ["--out", str(out)]
    return TORCHRUN + ["--standalone", "--nproc_per_node", "2", "-m", "kd", "train-teacher"] + args


def _run(cmd, out):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd[3:])} failed ({r.returncode}):\n{r.stderr[-6000:]}")
    return r


def _epochs_recorded(out):
    try:
        return len(pd.read_csv(out / "metrics.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def _children(pid):
    """Pids whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _kill_9_all(proc):
    """SIGKILL the launcher's group and every worker's: torchrun starts each worker in a session of its own,
    so killing the launcher's group alone leaves the workers training on."""
    workers = _children(proc.pid)
    for pgid in [proc.pid] + workers:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_after_two_epochs(out, epochs, extra):
    """Start a two-process run in its own session, SIGKILL its whole group once epoch 2 is on disk.

    Returns True when the run was killed unfinished, False when it finished before the kill landed.
    """
    proc = subprocess.Popen(_single_node(out, epochs, extra), cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoint.pt").is_file() and _epochs_recorded(out) >= 2:
                break
            time.sleep(0.005)
        else:
            if proc.poll() is not None and not (out / "summary.json").is_file():
                pytest.fail(f"the run to be killed exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    finally:
        _kill_9_all(proc)
        proc.wait(timeout=60)
        proc.stderr.close()
    time.sleep(0.2)  # nothing may write after the kill
    return not (out / "summary.json").is_file()


def _assert_same_run(a, b):
    for name in ("model.safetensors", "c_matrix.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, (name, k)
            assert ta[k].equal(tb[k]), f"{name}:{k} differs, max abs diff {(ta[k] - tb[k]).abs().max()}"
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert list(ma.columns) == list(mb.columns)
    pd.testing.assert_frame_equal(ma.drop(columns="seconds"), mb.drop(columns="seconds"), check_exact=True)
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["num_processes"] == sb["num_processes"] == 2
    for key in ("test_acc", "test_nll", "test_ece", "epochs"):
        assert sa[key] == sb[key], key
    assert not (a / "checkpoint.pt").exists() and not (b / "checkpoint.pt").exists()


@pytest.mark.parametrize("extra", [(), ("--mixup", "0.2", "--cutout", "3")], ids=["plain", "mixup-cutout"])
def test_kill_9_under_two_processes_then_resume_is_bit_identical(tmp_path, extra):
    epochs = 12
    for attempt in range(3):  # each epoch takes ~0.1 s: a kill that lands after the end is retried, longer
        killed = tmp_path / f"killed{attempt}"
        if _kill_after_two_epochs(killed, epochs, extra):
            break
        epochs *= 3
    else:
        pytest.fail(f"three runs (up to {epochs // 3} epochs) finished before SIGKILL landed; cannot test resume")
    before = pd.read_csv(killed / "metrics.csv")
    assert 2 <= len(before) < epochs
    _run(_single_node(killed, epochs, resume=True), killed)
    # it continued (the checkpoint is the last or the one before the last epoch on disk): the first epochs'
    # rows, timings included, are the killed run's own
    kept = len(before) - 1
    after = pd.read_csv(killed / "metrics.csv")
    pd.testing.assert_frame_equal(after.iloc[:kept], before.iloc[:kept], check_exact=True)
    whole = tmp_path / "whole"
    _run(_single_node(whole, epochs, extra), whole)
    _assert_same_run(killed, whole)


def _launch_two_nodes(out, epochs, logs, timeout=120):
    """Two torchrun launchers, one per simulated node, watched as a pair (see the module's docstring).
    Returns [(exit code or None when killed, stdout, stderr)] for nodes 0 and 1."""
    port = str(_unused_port())
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for node in (0, 1):
        streams = (open(logs / f"node{node}.out", "w"), open(logs / f"node{node}.err", "w"))
        files.append(streams)
        procs.append(subprocess.Popen(
            TORCHRUN + ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
                        "127.0.0.1", "--master_port", port, "-m", "kd", "train-teacher"] + _recipe(epochs, ())
            + ["--out", str(out)],
            cwd=ROOT, env=_env(), start_new_session=True, stdout=streams[0], stderr=streams[1]))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it at torchrun's exit barrier
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_9_all(p)
                p.wait(timeout=60)
                p.returncode = None  # killed here: not an exit of its own
        for streams in files:
            for f in streams:
                f.close()
    return [(p.returncode, (logs / f"node{n}.out").read_text(), (logs / f"node{n}.err").read_text())
            for n, p in enumerate(procs)]


def test_two_nodes_on_one_machine_match_one_node_with_two_processes(tmp_path):
    epochs = 6
    out = tmp_path / "two_nodes"
    results = _launch_two_nodes(out, epochs, tmp_path / "logs")
    for node, (code, _, stderr) in enumerate(results):
        if code != 0:
            pytest.fail(f"node {node}'s launcher {'was killed after 120 s' if code is None else f'exited {code}'}:"
                        f"\n{stderr[-4000:]}")
    assert results[0][1].count("lspp teacher") + results[1][1].count("lspp teacher") == 1  # one report: global rank 0
    ref = tmp_path / "one_node"
    _run(_single_node(ref, epochs), ref)
    _assert_same_run(out, ref)
    assert sorted(p.name for p in out.iterdir()) == [
        "c_matrix.safetensors", "config.yaml", "metrics.csv", "model.safetensors", "summary.json"]


def test_checkpoint_keeps_every_ranks_rng_and_each_rank_takes_its_own(tmp_path):
    """``rng.cpu.<rank>`` / ``rng.loader.<rank>`` come back to their own rank; a rank without one (or a
    checkpoint without them) falls back to the single ``rng.cpu`` / ``rng.loader`` of rank 0."""
    import torch

    from kd import runs

    class Source(torch.nn.Module):
        def checkpoint_state(self):
            return {}

        def load_checkpoint_state(self, state):
            pass

    model, source = torch.nn.Linear(2, 2), Source()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gens = [torch.Generator().manual_seed(1000 + r) for r in range(2)]
    cpus = []
    for r in range(2):
        torch.manual_seed(50 + r)
        cpus.append(torch.get_rng_state())
    rank0_gen = gens[0].get_state()
    rank_rng = {"cpu": cpus, "loader": [g.get_state() for g in gens]}
    with_ranks, without = tmp_path / "ranks.pt", tmp_path / "single.pt"
    torch.set_rng_state(cpus[0])
    runs.save_checkpoint(with_ranks, 1, [], 0.0, model, source, opt, sched, gens[0], rank_rng)
    runs.save_checkpoint(without, 1, [], 0.0, model, source, opt, sched, gens[0])
    for path, rank, want in ((with_ranks, 0, 0), (with_ranks, 1, 1), (with_ranks, 2, 0), (without, 1, 0)):
        torch.manual_seed(999)
        g = torch.Generator().manual_seed(999)
        runs.restore_checkpoint(path, model, source, opt, sched, g, rank=rank)
        assert torch.equal(torch.get_rng_state(), cpus[want]), (path.name, rank)
        assert torch.equal(g.get_state(), rank_rng["loader"][want] if path == with_ranks else rank0_gen)
    assert runs.gather_rng_states(gens[0]) is None  # not a multi-process launch
