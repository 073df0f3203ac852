"""students.timm_task.SourceTask: proxykd target sources inside timm's task-based training (timm.task)."""
import copy
import time
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.task import resume_task_checkpoint
from timm.utils import unwrap_model

from kd.config import TrainConfig
from kd.engine import make_accelerator, prepare_training
from kd.errors import KDError
from kd.metrics import c_movement
from kd.models import MLP
from students.timm_task import SourceTask
from teachers import make_source

K = 6
SHAPE = (3, 4, 4)  # image-shaped inputs, as timm's Mixup expects; MLP flattens them
FEATURES = 3 * 4 * 4


def student(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(FEATURES, K, hidden=16)


def source(name: str):
    """A proxy with a random C, label smoothing, or LS++ with random (not uniform) C logits."""
    g = torch.Generator().manual_seed(3)
    if name == "proxy":
        c = torch.rand(K, K, generator=g).fill_diagonal_(0)
        return make_source("proxy", K, c_matrix=c / c.sum(1, keepdim=True))
    if name == "ls":
        return make_source("ls", K, alpha=0.1)
    src = make_source("lspp", K)
    with torch.no_grad():
        src.c_logits.copy_(torch.randn(src.c_logits.shape, generator=g))
    return src


def batch(labels: str, n: int = 8, seed: int = 1):
    """Inputs and integer labels, or soft labels from timm's Mixup (smoothing 0, the task's requirement)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *SHAPE, generator=g), torch.randint(0, K, (n,), generator=g)
    if labels == "mixup":
        np.random.seed(seed)  # Mixup draws lambda with NumPy
        x, y = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=K)(x, y)
        assert y.is_floating_point() and int((y > 0).sum(1).max()) == 2  # truly mixed rows
    return x, y


@pytest.mark.parametrize("labels", ["int", "mixup"])
@pytest.mark.parametrize("name", ["proxy", "ls", "lspp"])
def test_loss_and_gradients_equal_the_engine_step(name, labels):
    x, y = batch(labels)
    model, src = student(), source(name)
    model_e, src_e = copy.deepcopy(model), copy.deepcopy(src)

    cfg = TrainConfig(device="cpu", weight_decay=0.0, epochs=1)
    training = prepare_training(make_accelerator(cfg), model_e, src_e, cfg, steps_per_epoch=1)
    _, terms_e, loss_e = training.forward(x, y, None)
    loss_e.backward()

    task = SourceTask(model, src, verbose=False)
    out = task(x, y)
    out["loss"].backward()

    assert set(out) == {"loss", "output"} | set(terms_e)
    torch.testing.assert_close(out["loss"], loss_e, rtol=1e-6, atol=1e-7)
    for k, v in terms_e.items():
        torch.testing.assert_close(out[k], v, rtol=1e-6, atol=1e-7)
    for (n, p), p_e in zip(model.named_parameters(), model_e.parameters()):
        torch.testing.assert_close(p.grad, p_e.grad, rtol=1e-5, atol=1e-7, msg=n)
    learned = [p for p in src.parameters() if p.requires_grad]
    assert len(learned) == (1 if name == "lspp" else 0)
    for p, p_e in zip(learned, [p for p in src_e.parameters() if p.requires_grad]):
        assert p.grad is not None and p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, p_e.grad, rtol=1e-5, atol=1e-7)


def neighbour_data(step: int, n: int = 64):
    """Separable classes in pairs of near neighbours (0-1, 2-3, 4-5): C has structure to find."""
    g = torch.Generator().manual_seed(100 + step)
    centres = torch.randn(K // 2, FEATURES, generator=torch.Generator().manual_seed(7)).repeat_interleave(2, 0)
    centres = centres + 0.6 * torch.randn(K, FEATURES, generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, K, (n,), generator=g)
    x = centres[y] + 0.5 * torch.randn(n, FEATURES, generator=g)
    return x.view(n, *SHAPE), y


def test_short_lspp_run_moves_c_and_c_has_no_weight_decay():
    src = make_source("lspp", K)
    task = SourceTask(student(), src, verbose=False)
    opt = create_optimizer_v2(task.trainable_module, "sgd", lr=0.5, momentum=0.9, weight_decay=0.05)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(src.c_logits)] == 0.0
    assert decay[id(task.trainable_module.student.net[1].weight)] == 0.05

    before = c_movement(src.c_matrix())["c_entropy_share"]
    task.train()
    for step in range(40):
        x, y = neighbour_data(step)
        out = task(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = c_movement(src.c_matrix())
    assert before == pytest.approx(1.0)
    assert after["c_entropy_share"] < 0.9, after
    c = src.c_matrix()
    assert all(int(c[i].argmax()) == i ^ 1 for i in range(K)), c  # each class's neighbour is found


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, steps: int) -> None:
    """One rank: LS++ and proxy tasks under DDP, each rank on its half of every batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        lspp = SourceTask(student(), make_source("lspp", K), verbose=False)
        proxy = SourceTask(student(), source("proxy"), verbose=False)
        tasks = (lspp, proxy)
        opts = [create_optimizer_v2(t.trainable_module, "sgd", lr=0.5, momentum=0.9, weight_decay=0.05) for t in tasks]
        for t in tasks:
            t.prepare_distributed()
        report = {}
        for key, t in zip(("lspp", "proxy"), tasks):
            ddp = t.trainable_module
            assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            broadcast = {id(b) for b in ddp.modules_buffers}
            report[f"{key}_broadcast_names"] = sorted(ddp.named_module_buffers)
            report[f"{key}_source_broadcast"] = any(id(b) in broadcast for b in t.source.buffers())
            wrapped = {id(b) for b in ddp.module.buffers()}
            report[f"{key}_source_wrapped"] = any(id(b) in wrapped for b in t.source.buffers())
        for step in range(steps):
            x, y = neighbour_data(step, 32)
            part = slice(rank * 32 // world, (rank + 1) * 32 // world)
            for t, opt in zip(tasks, opts):
                out = t(x[part], y[part])
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
        if rank == 0:
            report["c_logits"] = lspp.source.c_logits.detach().clone()
            report["lspp_student"] = copy.deepcopy(unwrap_model(lspp.get_eval_model()).state_dict())
            report["proxy_student"] = copy.deepcopy(unwrap_model(proxy.get_eval_model()).state_dict())
            torch.save(report, out_file)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_c_and_keep_frozen_tables_out_of_ddp(tmp_path):
    steps = 6
    out_file = tmp_path / "rank0.pt"
    ctx = mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(out_file), steps), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish within 120 s")
    report = torch.load(out_file, weights_only=False)

    # LS++'s constant index tables and the proxy's table are not among the buffers DDP broadcasts.
    assert report["lspp_source_broadcast"] is False and report["proxy_source_broadcast"] is False
    assert not any("source" in n for n in report["lspp_broadcast_names"] + report["proxy_broadcast_names"])
    assert report["proxy_source_wrapped"] is False  # a frozen source is not in the DDP module at all
    assert report["lspp_source_wrapped"] is True  # LS++ is: its C's gradient is averaged with the student's

    # The one-process run on the whole batch.
    lspp = SourceTask(student(), make_source("lspp", K), verbose=False)
    proxy = SourceTask(student(), source("proxy"), verbose=False)
    opts = [create_optimizer_v2(t.trainable_module, "sgd", lr=0.5, momentum=0.9, weight_decay=0.05)
            for t in (lspp, proxy)]
    for step in range(steps):
        x, y = neighbour_data(step, 32)
        for t, opt in zip((lspp, proxy), opts):
            out = t(x, y)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    assert not torch.equal(lspp.source.c_logits, torch.zeros_like(lspp.source.c_logits))  # C did move
    torch.testing.assert_close(report["c_logits"], lspp.source.c_logits.detach(), rtol=1e-4, atol=1e-5)
    for key, t in (("lspp_student", lspp), ("proxy_student", proxy)):
        for n, v in t.get_eval_model().state_dict().items():
            torch.testing.assert_close(report[key][n], v, rtol=1e-4, atol=1e-5, msg=f"{key} {n}")


def test_sources_timm_cannot_feed_are_refused_in_one_line():
    cached = make_source("cached", K, logits=torch.randn(20, K))
    network = make_source("network", K, model=student(1))
    ols = make_source("ols", K)
    for src, why in ((cached, "index"), (network, "LogitDistillationTask"), (ols, "epoch")):
        with pytest.raises(KDError) as e:
            SourceTask(student(), src, verbose=False)
        assert why in str(e.value) and "\n" not in str(e.value)


def test_task_state_round_trips_c_through_a_timm_checkpoint(tmp_path):
    src = source("lspp")
    task = SourceTask(student(), src, verbose=False)
    task.setup_ema(decay=0.0)
    state = task.get_checkpoint_state()
    assert set(state) == {"state_dict", "task_state"}
    assert not any(k.startswith("source") for k in state["state_dict"])  # the student alone
    torch.testing.assert_close(state["task_state"]["source_state"]["c_logits"], src.c_logits.detach())
    ema_state = task.get_task_state(ema=True)["source_state"]["c_logits"]
    assert ema_state.data_ptr() != src.c_logits.data_ptr()
    torch.save({**state, "epoch": 3}, tmp_path / "ckpt.pth.tar")

    fresh = SourceTask(student(seed=5), make_source("lspp", K), verbose=False)
    assert not torch.equal(fresh.source.c_logits, src.c_logits)
    assert resume_task_checkpoint(fresh, str(tmp_path / "ckpt.pth.tar"), log_info=False) == 3
    torch.testing.assert_close(fresh.source.c_matrix(), src.c_matrix())
    for n, v in task.get_eval_model().state_dict().items():
        torch.testing.assert_close(fresh.get_eval_model().state_dict()[n], v)

    with pytest.raises(KDError, match="K=4"):
        SourceTask(MLP(FEATURES, 4, 8), make_source("lspp", 4), verbose=False).load_task_state(state["task_state"])
    frozen = SourceTask(student(), source("proxy"), verbose=False)
    assert frozen.get_task_state() == {}  # nothing learned, nothing saved
    with pytest.raises(KDError, match="'lspp'"):
        frozen.load_task_state(state["task_state"])


def test_timm_smoothed_mixup_targets_get_one_warning_and_plain_ones_none():
    task = SourceTask(student(), source("ls"), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task(*batch("mixup"))  # smoothing 0: no warning
    x, y = torch.randn(8, *SHAPE), torch.randint(0, K, (8,))
    np.random.seed(0)
    x, y = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=K)(x, y)
    task = SourceTask(student(), source("ls"), verbose=False)
    with pytest.warns(UserWarning, match="label_smoothing=0") as record:
        task(x, y)
        task(x, y)
    assert sum("label_smoothing" in str(w.message) for w in record) == 1


def test_compiled_task_gives_the_same_loss_and_evaluates_the_student():
    x, y = batch("mixup")
    ref = SourceTask(student(), source("lspp"), verbose=False)
    task = SourceTask(student(), source("lspp"), verbose=False)
    eval_model = task.compile(backend="eager")
    assert task.get_eval_model() is eval_model and isinstance(unwrap_model(eval_model), MLP)
    out, out_ref = task(x, y), ref(x, y)
    torch.testing.assert_close(out["loss"], out_ref["loss"])
    out["loss"].backward()
    out_ref["loss"].backward()
    torch.testing.assert_close(task.source.c_logits.grad, ref.source.c_logits.grad)
