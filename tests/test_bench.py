"""The cost benchmark's logic on the digits preset (no timing is asserted)."""
import os
import shlex
import subprocess
import sys

import pandas as pd
import pytest
import torch

from kd.errors import KDError

from benchmarks.cost import bench_rows, markdown, run_bench
from conftest import ROOT

COLUMNS = ["source", "step_ms_median", "step_ms_min", "step_ms_max", "images_per_s", "ratio_vs_onehot",
           "device", "torch", "batch_size", "amp", "input_shape"]


def test_every_source_has_a_row_and_a_table():
    df = run_bench("digits", steps=1, repeats=3, warmup=1, batch_size=16, log=None)
    assert df["source"].tolist() == bench_rows()
    heavy = set(df.loc[df["phase"] == "heavy", "source"])
    assert heavy == {"network", "tfkd-self"}  # the rows that run a teacher network on the inputs
    assert set(COLUMNS) <= set(df.columns)
    assert (df["input_shape"] == "1x8x8").all() and (df["batch_size"] == 16).all()
    text = markdown(df)
    assert "| network |" in text and "network / proxy step time" in text


def test_timings_are_each_steps_own_duration_and_ratios_come_from_them(monkeypatch):
    """A fake clock that each step moves by a known amount: the columns must give back exactly those amounts
    per step (in ms), their medians, and the ratios and throughput they imply, computed here by hand."""
    from types import SimpleNamespace

    from benchmarks import harness as cost

    clock = [0.0]
    monkeypatch.setattr(cost, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    durations = {"onehot": [0.002, 0.001, 0.004], "proxy": [0.006, 0.003, 0.012]}  # seconds per step, per round
    calls = {name: 0 for name in durations}

    class Batches:
        def next(self):
            return (None, None, None)

    def make(name):
        def step(x, y, idx):
            calls[name] += 1
            clock[0] += durations[name][(calls[name] - 1) // 3 % 3]  # 3 calls per round: 1 untimed + 2 timed
        return cost.Runner(name, step, Batches())

    rows = [make("onehot"), make("proxy")]
    cost.timed_repeats(rows, repeats=3, steps=2, mode="step", dev=torch.device("cpu"), log=None)
    onehot, proxy = (cost.timing_columns(r, rows[0], batch=16) for r in rows)
    assert sorted(rows[0].times) == pytest.approx([1.0, 2.0, 4.0])  # ms per step, the untimed step left out
    assert (proxy["step_ms_median"], proxy["step_ms_min"], proxy["step_ms_max"]) == pytest.approx((6.0, 3.0, 12.0))
    assert proxy["ratio_vs_onehot"] == pytest.approx(6.0 / 2.0) and onehot["ratio_vs_onehot"] == pytest.approx(1.0)
    assert proxy["paired_ratio_vs_onehot"] == pytest.approx(3.0)  # 3x in every round
    assert proxy["images_per_s"] == pytest.approx(16 / 0.006)


def test_heavy_rows_are_timed_apart_and_every_timed_step_follows_one_of_its_own():
    from benchmarks.harness import Runner, paired_ratio, timed_repeats

    calls = []

    class Batches:
        def next(self):
            return (None, None, None)

    def runner(name, phase="main"):
        r = Runner(name, lambda x, y, idx: calls.append(name), Batches())
        r.phase = phase
        return r

    rows = [runner("a"), runner("big", "heavy"), runner("b"), runner("c")]
    timed_repeats(rows, repeats=8, steps=1, mode="step", dev=torch.device("cpu"), log=None)
    assert all(len(r.times) == 8 for r in rows)
    # every row's calls come in pairs: an untimed step, then the timed one
    assert all(calls[i] == calls[i + 1] for i in range(0, len(calls), 2))
    pairs = calls[::2]
    assert pairs[-8:] == ["big"] * 8 and "big" not in pairs[:-8]  # the heavy row after every main round
    rounds = [tuple(pairs[i:i + 3]) for i in range(0, 24, 3)]
    assert len(set(rounds)) > 1 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    rows[0].times, rows[1].times = [2.0] * 8, [30.0] * 7 + [60.0]  # across phases: a ratio of medians
    assert paired_ratio(rows[1], rows[0]) == pytest.approx(15.0)


def test_real_data_mode_draws_batches_from_the_loader():
    df = run_bench("digits", steps=2, repeats=1, warmup=0, sources=("onehot", "cached"), data="digits", log=None)
    assert df["data"].tolist() == ["digits", "digits"] and (df["steps"] == 2).all()


def test_cli_writes_the_same_rows_as_csv_and_refuses_to_overwrite(tmp_path, kd_main):
    out = tmp_path / "cost.csv"
    code, stdout, err = kd_main("bench", "--preset", "digits", "--steps", 1, "--repeats", 1, "--warmup", 0,
                                "--sources", "onehot,proxy,network", "--out", out, "--quiet")
    assert code == 0, err
    df = pd.read_csv(out)
    assert df["source"].tolist() == ["onehot", "proxy", "network"]
    assert "| proxy |" in stdout
    code, _, err = kd_main("bench", "--preset", "digits", "--out", out)
    assert code == 2 and "already exists" in err
    code, _, err = kd_main("bench", "--preset", "digits", "--sources", "onehot,teleport")
    assert code == 2 and "unknown source 'teleport'" in err


def _gpu_sh(tmp_path, **env):
    env = {**os.environ, "OUTDIR": str(tmp_path), "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_gpu_script_dry_run_lists_every_part_with_the_gpu_settings(tmp_path):
    """Every part with its default (GPU) settings, printed and not run: the presets, files and flags a lent
    machine would get."""
    out = _gpu_sh(tmp_path, DRY_RUN=1, DEVICE="cuda")
    lines = [shlex.split(line) for line in out.splitlines() if " -m " in line]
    outs = [a[a.index("--out") + 1] for a in lines]
    presets = ("tinyimagenet-r101-shufflenet", "cifar100-r34-r18", "fmnist-lenet", "digits")
    expected = [f"cost_{p}_cuda.csv" for p in presets]
    expected += [f"cost_{p}_cuda_{tag}.csv" for tag in ("epoch", "compile")
                 for p in ("tinyimagenet-r101-shufflenet", "fmnist-lenet")]
    expected += ["cost_large-k_cuda.csv", "cost_fmnist-lenet_cuda_graphs.csv", "cost_cifar100-r34-r18_cuda_graphs.csv",
                 "cost_large-k_cuda_graphs.csv", "e2e_lenet_cuda.csv"]
    assert sorted(os.path.basename(o) for o in outs) == sorted(expected)
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    for a in lines:
        joined = " ".join(a)
        assert "--device cuda" in joined
        if "e2e" in joined:
            assert "--modes none,reduce-overhead" in joined and "--epochs 15" in joined
            continue
        assert "--amp bf16" in joined
        if "_graphs" in joined:
            assert "--compile-mode reduce-overhead" in joined
        if "large-k-bench" not in joined:
            assert "--channels-last" in joined


def test_gpu_script_runs_every_part_on_one_small_preset_on_cpu(tmp_path):
    _gpu_sh(tmp_path, DEVICE="cpu", AMP="none", STEPS=1, REPEATS=1, WARMUP=0, BATCH=2, SHORT_STEPS=1, SHORT_REPEATS=1,
            EPOCH_SIZE=4, COMPILE_BACKEND="aot_eager", CLASSES="50,300", STEP_PRESETS="digits",
            WHOLE_RUN_PRESETS="digits", GRAPH_PRESETS="digits", COMPILE_MODE="default", E2E_DATASET="digits",
            E2E_EPOCHS=1)
    files = sorted(p.name for p in tmp_path.iterdir())
    expected = ["cost_digits_cpu.csv", "cost_digits_cpu_epoch.csv", "cost_digits_cpu_compile.csv",
                "cost_large-k_cpu.csv", "cost_large-k_cpu_lspp.csv", "cost_digits_cpu_graphs.csv",
                "cost_large-k_cpu_graphs.csv", "cost_large-k_cpu_graphs_lspp.csv", "e2e_lenet_cpu.csv"]
    assert files == sorted(expected)
    graphs = pd.read_csv(tmp_path / "cost_digits_cpu_graphs.csv")
    assert graphs["source"].tolist() == [s + t for s in ("bare", "onehot", "proxy", "cached", "lspp") for t in ("", "+compile")]
    e2e = pd.read_csv(tmp_path / "e2e_lenet_cpu.csv")
    assert e2e["compile_mode"].tolist() == ["none", "default"] and (e2e["wall_s"] > e2e["train_seconds"]).all()
    df = pd.read_csv(tmp_path / "cost_digits_cpu.csv")
    assert df["source"].tolist() == bench_rows() and (df["channels_last"]).all()
    epoch = pd.read_csv(tmp_path / "cost_digits_cpu_epoch.csv")
    assert epoch["source"].tolist() == ["onehot", "proxy", "network", "lspp"] and (epoch["steps"] == 2).all()
    compiled = pd.read_csv(tmp_path / "cost_digits_cpu_compile.csv")
    assert compiled["compiled"].tolist() == [False, True] * 4
    large = pd.read_csv(tmp_path / "cost_large-k_cpu.csv")
    assert sorted(set(large["num_classes"])) == [50, 300]
    assert large.groupby("num_classes")["source"].apply(list).tolist() == [["onehot", "proxy", "proxy-topk", "cached-topk"]] * 2


def test_loader_ratio_times_real_and_in_memory_epochs_of_the_same_steps():
    from benchmarks.loader import loader_ratio

    r = loader_ratio("digits", batch_size=64, repeats=2, log=None)
    assert r["steps_per_epoch"] == 1347 // 64
    assert r["ratio"] == pytest.approx(r["real_epoch_s_median"] / r["memory_epoch_s_median"])


def test_epoch_mode_times_whole_epochs_through_the_loader():
    df = run_bench("digits", mode="epoch", epoch_size=200, batch_size=32, repeats=2, warmup=0,
                   sources=("onehot", "proxy", "network"), log=None)
    # 200 synthetic samples, batch 32, last partial batch dropped: 6 steps per epoch
    assert (df["steps"] == 6).all() and (df["epoch_samples"] == 192).all() and (df["mode"] == "epoch").all()
    for r in df.itertuples():
        assert r.epoch_s_median == pytest.approx(r.step_ms_median * 6 / 1000)
    text = markdown(df)
    assert "s / epoch" in text and "network / proxy epoch time" in text and "192 samples (6 steps)" in text
    with pytest.raises(KDError, match="--epoch-size"):
        run_bench("digits", mode="epoch", steps=3, log=None)
    with pytest.raises(KDError, match="smaller than one batch"):
        run_bench("digits", mode="epoch", epoch_size=10, batch_size=32, log=None)


def test_epoch_mode_on_real_data_runs_the_loaders_epoch():
    df = run_bench("digits", mode="epoch", batch_size=256, repeats=1, warmup=1, sources=("onehot",),
                   data="digits", log=None)
    assert df["steps"].tolist() == [1347 // 256] and df["data"].tolist() == ["digits"]


def test_compiled_rows_sit_beside_eager_ones_and_compile_outside_the_timing():
    import torch._dynamo

    torch._dynamo.reset()
    df = run_bench("digits", steps=1, repeats=2, warmup=0, batch_size=16, sources=("onehot", "network"),
                   compile=True, compile_backend="aot_eager", log=None)
    assert df["source"].tolist() == ["onehot", "onehot+compile", "network", "network+compile"]
    assert df["compiled"].tolist() == [False, True, False, True]
    first = df.set_index("source")
    # the compiled row's first step made graphs (a row that did not compile has none and is marked fell back),
    # and that step is timed apart: compile_s on compiled rows only
    assert first.loc["onehot+compile", "compiled_graphs"] > 0 and not first.loc["onehot+compile", "fell_back"]
    assert not pd.isna(first.loc["onehot+compile", "compile_s"]) and pd.isna(first.loc["onehot", "compile_s"])
    # compiled rows take their ratio against compiled 1-hot
    assert first.loc["onehot+compile", "ratio_vs_onehot"] == pytest.approx(1.0)
    text = markdown(df)
    assert "| network+compile |" in text and "network+compile / proxy" not in text
    assert "compile s" in text


def test_every_compiled_row_compiles_its_own_step():
    """More compiled rows than dynamo's recompile limit (8): each must still compile, none run eagerly under
    a compiled label (they shared one cache for Training.forward and fell back once it was full)."""
    import torch._dynamo

    torch._dynamo.reset()
    sources = ("onehot", "ls", "lspp", "proxy", "cached", "tfkd-reg", "ols", "zipf-ls", "mbls", "fl-3")
    # dynamo's default limit; importing timm.optim raises it for the whole process (its kron optimizer: 1,000,000)
    with torch._dynamo.config.patch(recompile_limit=8):
        df = run_bench("digits", steps=1, repeats=1, warmup=0, batch_size=16, sources=sources, compile=True,
                       compile_backend="aot_eager", log=None)
    compiled = df[df["compiled"]]
    assert len(compiled) == len(sources) > 8
    # two graphs in the first step: the forward with the source's terms, and the optimiser step (whose shared
    # cache once filled up after four rows, so that later rows stepped their optimiser eagerly)
    assert (compiled["compiled_graphs"] >= 2).all() and not compiled["fell_back"].any(), \
        compiled[["source", "compiled_graphs"]].to_string()
    shown = df.assign(fell_back=[False] * (len(df) - 1) + [True], compiled=[False] * (len(df) - 1) + [True])
    assert "fell back (ran eagerly)" in markdown(shown)


def test_compiled_training_compiles_student_and_teacher_network():
    from benchmarks.harness import compile_training, stand_in_source
    from kd.config import TrainConfig
    from kd.engine import make_accelerator, prepare_training
    from kd.models import create_model

    cfg = TrainConfig(device="cpu", batch_size=8)
    teacher = create_model("lenet", 10, 1, 8)
    src = stand_in_source("network", 10, teacher, 100)
    tr = prepare_training(make_accelerator(cfg), create_model("lenet", 10, 1, 8), src, cfg, steps_per_epoch=10)
    compile_training(tr, backend="aot_eager")
    # the engine's compiled step (forward with the source's terms, and the optimiser step), and the teacher net
    assert hasattr(tr.forward_loss, "_torchdynamo_orig_callable") and tr.optimizer_step is not tr.optimizer.step
    assert type(tr.source.teacher).__name__ == "OptimizedModule"
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.step(x, y, torch.arange(8))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    assert all(not p.requires_grad or p.grad is None for p in tr.source.teacher.parameters())


def test_step_profile_counts_operators_and_times_phases(tmp_path):
    import json

    from benchmarks.step_profile import PHASES, main

    out = tmp_path / "p.json"
    assert main(["--preset", "digits", "--sources", "onehot,lspp", "--rounds", "3", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    ops = d["operators_per_step"]
    assert ops["lspp"] > ops["onehot"] > 0
    diff = d["operator_count_diff_lspp_minus_onehot"]
    assert diff["aten::cross_entropy_loss"] == -1 and diff["_LSPPTerms"] == 1
    phases = d["phases_us"]
    assert set(PHASES) <= set(phases["onehot"]) and "paired_diff_us" in phases["lspp"]
    assert phases["onehot"]["step"] > 0
    assert main(["--preset", "digits", "--sources", "onehot,network"]) == 2  # a teacher network: refused


def test_step_profile_over_bare_shows_the_framework_adds_one_operator_to_the_bare_loop(tmp_path):
    """``--over-bare``: the bare loop, its rungs and the real 1-hot step, each with its operators' difference to the
    bare loop; Training.step's only extra operator is the detach of the logits it keeps for the epoch's accuracy."""
    import json

    from benchmarks.step_profile import main

    out = tmp_path / "p.json"
    assert main(["--preset", "digits", "--sources", "onehot", "--over-bare", "--rounds", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["over_bare"]
    assert list(rows) == ["bare", "bare, peak rate", "+LambdaLR", "+bookkeeping", "onehot"]
    assert rows["bare"]["paired_ratio_to_bare"] == 1.0  # the ratios are to the bare loop
    assert rows["+LambdaLR"]["operator_count_diff_to_bare"] == {}
    assert rows["onehot"]["operator_count_diff_to_bare"] == {"aten::detach": 1.0, "detach": 1.0}


def test_large_k_bench_has_only_flags_it_uses(kd_main):
    code, _, err = kd_main("large-k-bench", "--compile")
    assert code == 2 and "unrecognized arguments: --compile" in err
    code, _, err = kd_main("bench", "--preset", "digits", "--classes", "5,10")
    assert code == 2 and "unrecognized arguments: --classes" in err
    code, _, err = kd_main("large-k-bench", "--classes", "1000")
    assert code == 2 and "two numbers of classes" in err


def test_bare_loop_and_the_rungs_above_it_train_exactly_as_the_framework_step():
    """The bare loop is the floor only if it does the same arithmetic as ``Training.step`` with 1-hot labels: the
    same rate at every step (the framework rows' schedule, here made to move within the steps) and the same
    update; so do the step profile's rungs between them. A loop at a fixed rate, or at another one, fails."""
    import copy

    from benchmarks.harness import STEPS_PER_EPOCH, bare_runner, stand_in_source
    from benchmarks.step_profile import HandLoop
    from kd.config import TrainConfig
    from kd.engine import make_accelerator, prepare_training
    from kd.models import create_model

    cfg = TrainConfig(device="cpu", batch_size=16, lr=0.5, warmup_epochs=8 / STEPS_PER_EPOCH)  # 8 warm-up steps
    torch.manual_seed(0)
    start = create_model("lenet", 10, 1, 8)
    x, y, idx = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.arange(16)
    models = {name: copy.deepcopy(start) for name in ("bare", *HandLoop.RUNGS, "onehot")}
    steppers = {"bare": bare_runner(models["bare"], cfg, torch.device("cpu"), None, None),
                **{r: HandLoop(models[r], cfg, r, 10) for r in HandLoop.RUNGS},
                "onehot": prepare_training(make_accelerator(cfg), models["onehot"], stand_in_source("onehot", 10, None, 16),
                                           cfg, steps_per_epoch=STEPS_PER_EPOCH)}
    for _ in range(12):
        for s in steppers.values():
            s.step(x, y, idx)
    moved = max((a - b).abs().max().item() for a, b in zip(models["onehot"].parameters(), start.parameters()))
    assert moved > 1e-2  # the rates are large enough for a wrong schedule to show
    for name in ("bare", *HandLoop.RUNGS):
        for a, b in zip(models[name].parameters(), models["onehot"].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
