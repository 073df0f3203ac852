"""--compile-mode: the whole step compiled (forward, source terms, backward, optimiser step) trains exactly as
the eager step; learning rates held as tensors survive a checkpoint; CUDA graphs are refused on the CPU."""
import pytest
import torch

from conftest import Killed, kill_after
from kd.app.jobs import train_teacher_job
from kd.config import TrainConfig

# aot_eager: torch.compile's tracing and autograd without code generation, so no C++ compiler is needed
BASE = dict(dataset="digits", model="mlp", epochs=2, device="cpu", compile_backend="aot_eager")


@pytest.mark.parametrize("method", ["lspp", "ls"])
def test_a_compiled_step_trains_as_the_eager_one(tmp_path, method):
    out = {}
    for mode in ("none", "default"):
        r = train_teacher_job(TrainConfig(method=method, compile_mode=mode, **BASE), tmp_path / mode,
                              progress=False, log=None)
        out[mode] = r
    a, b = out["none"], out["default"]
    assert a.summary["test_nll"] == pytest.approx(b.summary["test_nll"], rel=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if method == "lspp":
        torch.testing.assert_close(a.source.c_matrix(), b.source.c_matrix(), rtol=1e-5, atol=1e-6)


def test_a_killed_compiled_run_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = TrainConfig(method="lspp", compile_mode="default", **{**BASE, "epochs": 3})
    whole = train_teacher_job(cfg, tmp_path / "whole", progress=False, log=None)
    with pytest.raises(Killed):
        train_teacher_job(cfg, tmp_path / "killed", progress=False, log=kill_after(1))
    resumed = train_teacher_job(cfg, tmp_path / "killed", progress=False, log=None, resume=True)
    assert resumed.summary["test_nll"] == pytest.approx(whole.summary["test_nll"], rel=1e-5)
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_on_the_cpu_are_refused_in_one_line(kd_main, tmp_path):
    code, _, err = kd_main("train-teacher", "--device", "cpu", "--compile-mode", "reduce-overhead",
                           "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and "needs a CUDA device" in err
    assert not (tmp_path / "r").exists()


def test_compile_step_wraps_the_forward_and_the_optimiser_step_with_tensor_learning_rates():
    import teachers
    from kd.engine import make_accelerator, prepare_training
    from kd.models import MLP

    cfg = TrainConfig(method="onehot", compile_mode="default", **BASE)
    training = prepare_training(make_accelerator(cfg), MLP(64, 10), teachers.make_source("onehot", 10), cfg, 10)
    assert training.forward_loss is not training.forward and hasattr(training.forward_loss, "_torchdynamo_orig_callable")
    assert training.optimizer_step is not training.optimizer.step
    lr = training.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for _ in range(3):
        training.step(x, y, None)
    assert training.optimizer.param_groups[0]["lr"] is lr  # the schedule updates the same tensor in place
    assert float(lr) == pytest.approx(cfg.lr * training.scheduler.lr_lambdas[0](3))


def test_bench_verbs_time_compiled_steps_and_refuse_cuda_graphs_on_the_cpu(kd_main, tmp_path):
    import pandas as pd

    out = tmp_path / "k.csv"
    code, _, err = kd_main("large-k-bench", "--classes", "20,40", "--steps", 1, "--repeats", 1, "--warmup", 0,
                           "--top-k", 3, "--n-cached", 100, "--compile-mode", "default", "--compile-backend", "aot_eager",
                           "--out", out, "--quiet")
    assert code == 0, err
    df = pd.read_csv(out)
    assert df["source"].tolist() == ["onehot+compile", "proxy+compile", "proxy-topk+compile", "cached-topk+compile"] * 2
    assert (df["compile_mode"] == "default").all() and df["compile_s"].notna().all()
    for argv in (["bench", "--preset", "digits", "--compile", "--compile-mode", "reduce-overhead"],
                 ["large-k-bench", "--compile-mode", "reduce-overhead"]):
        code, _, err = kd_main(*argv)
        assert code == 2 and "needs --device cuda" in err and err.count("\n") == 1
