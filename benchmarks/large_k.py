"""What a target source costs per step, and in bytes, when K is large (ImageNet-21k: K = 21,841).

A synthetic setting where the K-sized parts dominate: the student is a linear head on 512
features (``nn.Linear(512, K)``), the inputs random 512-vectors, batches fixed and already on
the device. For each K the rows are

* ``onehot``: the labels (the base of the ratios; fused cross-entropy, no table);
* ``proxy``: the dense C-matrix (K x K float32: 1.9 GB at K = 21,841), skipped where K*K*4 bytes
  exceed ``max_dense_bytes``;
* ``proxy-topk``: :class:`teachers.proxy.TopKProxy`, the k largest entries of each row of C;
* ``cached-topk``: :class:`teachers.cached.TopKCached`, each of N samples' top-k teacher
  probabilities (float16) and classes (int16 / int32), targets rebuilt FKD-style;
* ``cached`` (only when asked for in ``sources``): dense N x K cached probabilities.

Every row trains its own copy of the same student through the engine's real step
(``kd.engine.prepare_training(...).step``), timed as ``benchmarks.cost.run_bench`` does:
untimed warm-up, repeats interleaved in a fresh random order each round with one untimed step
before each timed block, a device synchronise around each timed block, medians and the paired
(within-repeat) ratio to 1-hot of the same K.
``artifact_bytes`` is the size on disk of the file each source would be read from, measured by
writing the stand-in through the real save function into a temporary directory
(``artifact_bytes_kind`` "disk"; "none" for 1-hot); ``source_buffer_bytes`` is what the source
holds in memory (for the dense proxy twice the file: the K x K target table and C itself).

:func:`lspp_large_k` prices LS++ itself at large K: its K x (K - 1) C logits, their gradient and
optimiser state, and the K x K temporaries its loss makes every step.

    kd large-k-bench --out large_k.csv [--device cuda] [--classes 1000,21841]   (also writes large_k_lspp.csv)
"""
from __future__ import annotations

import copy
import gc
import tempfile
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import teachers
from benchmarks.harness import Cycle, framework_runner, sync, timed_repeats, timing_columns, warm_up
from kd import cmatrix
from kd.config import TrainConfig
from kd.engine import machine_name, resolve_device
from kd.errors import KDError
from kd.sources import SourceContext, TargetSource
from teachers.cached import CachedTeacher, save_cache
from teachers.lspp import LSPPLoss
from kd.cmatrix import save_topk_c_matrix
from teachers.proxy import ProxyTeacher
from teachers.topk import TopKCached, TopKProxy, write_topk_cache

PRESET = "large-k"
FEATURES = 512
DEFAULT_KS = (1000, 21841)
DEFAULT_SOURCES = ("onehot", "proxy", "proxy-topk", "cached-topk")
ALL_SOURCES = DEFAULT_SOURCES + ("cached",)
DENSE = {"proxy": lambda k, n: 4 * k * k, "cached": lambda k, n: 4 * n * k}  # bytes of the dense artifact tensor
#: K x K float32 temporaries LS++'s fused loss (teachers.lspp._LSPPTerms) makes per step, read from its code:
#: forward log_softmax(C logits), + log(alpha), the cat and the take into the K x K log table;
#: backward zeros_like(log_s) for q_by_class, log_s.exp() and its product with the class masses.
LSPP_KK_TEMPORARIES = 7


def build_source(row: str, k: int, top_k: int = 10, n_cached: int = 100_000, alpha: float = 0.1) -> TargetSource:
    """The source behind a row, on a stand-in artifact of the right shape (seeded)."""
    ctx = SourceContext(k, num_train=n_cached, options={"top_k": top_k, "alpha": alpha})
    if row == "onehot":
        return teachers.SOURCES["onehot"].stand_in(ctx)
    if row == "proxy":
        return ProxyTeacher.stand_in(ctx)
    if row == "proxy-topk":
        return TopKProxy.stand_in(ctx)
    if row == "cached-topk":
        return TopKCached.stand_in(ctx)
    if row == "cached":
        return CachedTeacher.stand_in(ctx)
    raise KDError(f"unknown large-k source '{row}'; choose from {', '.join(ALL_SOURCES)}")


def buffer_bytes(source: nn.Module) -> int:
    """Bytes of every buffer and parameter the source holds."""
    return sum(t.numel() * t.element_size() for t in list(source.buffers()) + list(source.parameters()))


def artifact_sizes(row: str, source: TargetSource) -> tuple[int, int, str]:
    """(file bytes, tensor bytes, kind): the stand-in written through the real save function and stat-ed.

    Class names ("n00000000", ImageNet-like) are written into the C-matrix metadata as `kd proxy
    export` would. 1-hot has no artifact: (0, 0, "none").
    """
    if row == "onehot":
        return 0, 0, "none"
    k = source.num_classes
    names = [f"n{i:08d}" for i in range(k)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "artifact.safetensors"
        if row == "proxy":
            cmatrix.save_c_matrix(path, source.c_matrix, source.alpha, names, {"source": "stand-in"})
            tensors = [source.c_matrix]
        elif row == "proxy-topk":
            save_topk_c_matrix(path, source.c_values, source.c_indices, source.alpha, names, {"source": "stand-in"})
            tensors = [source.c_values.float(), source.c_indices.to(torch.int16 if k <= 2 ** 15 else torch.int32)]
        elif row == "cached-topk":
            write_topk_cache(path, source.probs, source.indices, k, "synthetic", "stand-in")
            tensors = [source.probs, source.indices]
        elif row == "cached":
            save_cache(path, source.probs, "synthetic", "stand-in")  # same size as the logits it would hold
            tensors = [source.probs]
        else:
            raise KDError(f"no artifact for source '{row}'")
        size = path.stat().st_size
    return size, sum(t.numel() * t.element_size() for t in tensors), "disk"


def _batches(batch: int, k: int, n_cached: int, device, count: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, FEATURES, generator=g).to(device), torch.randint(0, k, (batch,), generator=g).to(device),
             torch.randint(0, n_cached, (batch,), generator=g).to(device)) for _ in range(count)]


def _time(runners, steps: int, repeats: int, warmup: int, dev, log) -> None:
    """cost.run_bench's schedule: warm-up untimed, then :func:`benchmarks.harness.timed_repeats`."""
    for r in runners:
        warm_up(r, warmup, dev)
    sync(dev)
    timed_repeats(runners, repeats, steps, "step", dev, log)


def _settings(device: str, batch_size, steps, repeats: int, warmup: int):
    resolve_device(device)
    if repeats < 1 or (steps is not None and steps < 1) or warmup < 0:
        raise KDError("--repeats and --steps must be at least 1, --warmup at least 0")
    dev = torch.device(device)
    return dev, batch_size or 256, steps or (20 if dev.type == "cuda" else 10)


def _common(k: int, batch: int, steps: int, repeats: int, dev, amp: str = "none") -> dict:
    return {"preset": PRESET, "teacher": "synthetic", "student": f"linear-{FEATURES}", "input_shape": str(FEATURES),
            "num_classes": k, "batch_size": batch, "amp": amp, "channels_last": False, "steps": steps,
            "repeats": repeats, "data": "synthetic", "device": machine_name(dev), "torch": torch.__version__}


def run_large_k(device: str = "cpu", ks=DEFAULT_KS, batch_size: int | None = None, steps: int | None = None,
                repeats: int = 5, warmup: int = 3, top_k: int = 10, n_cached: int = 100_000,
                sources=None, log=print, max_dense_bytes: int = 4 * 2 ** 30, amp: str = "none",
                compile_mode: str = "none", compile_backend: str = "inductor") -> pd.DataFrame:
    """Time a training step of a linear student for each source and each K; one row per (K, source).

    Columns: those of ``benchmarks.cost.run_bench`` (preset "large-k", ratios against 1-hot of the
    same K) plus ``artifact_bytes`` / ``artifact_tensor_bytes`` / ``artifact_bytes_kind`` (the file
    on disk and the tensors in it) and ``source_buffer_bytes`` (what the source holds in memory).
    Dense rows (``proxy``, ``cached``) whose artifact tensor would exceed ``max_dense_bytes`` are
    left out (logged). With ``compile_mode`` every row's step is compiled (``benchmarks.harness.compile_training``;
    reduce-overhead: replayed as CUDA graphs) and named with its suffix (``onehot+graphs``, ...).
    """
    sources = tuple(sources or DEFAULT_SOURCES)
    unknown = [s for s in sources if s not in ALL_SOURCES]
    if unknown:
        raise KDError(f"unknown large-k source '{unknown[0]}'; choose from {', '.join(ALL_SOURCES)}")
    if "onehot" not in sources:
        sources = ("onehot",) + sources  # the base of the ratios
    dev, batch, steps = _settings(device, batch_size, steps, repeats, warmup)
    if compile_mode == "reduce-overhead" and dev.type != "cuda":
        raise KDError("--compile-mode reduce-overhead replays CUDA graphs and needs --device cuda; on the CPU use "
                      "--compile-mode default")
    cfg = TrainConfig(device=device, batch_size=batch, amp=amp).validate()
    rows = []
    for k in ks:
        if top_k >= k:
            raise KDError(f"top_k must be below K, got top_k={top_k} with K={k}")
        torch.manual_seed(0)
        student0 = nn.Linear(FEATURES, k)
        batches = _batches(batch, k, n_cached, dev)
        runners, extra = [], {}
        for name in sources:
            if name in DENSE and DENSE[name](k, n_cached) > max_dense_bytes:
                if log:
                    log(f"K={k}: {name} skipped (its dense artifact is {DENSE[name](k, n_cached) / 2 ** 30:.2f} GiB "
                        f"> max_dense_bytes {max_dense_bytes / 2 ** 30:.2f} GiB)")
                continue
            src = build_source(name, k, top_k, n_cached)
            size, tensor_bytes, kind = artifact_sizes(name, src)
            extra[name] = {"artifact_bytes": size, "artifact_tensor_bytes": tensor_bytes, "artifact_bytes_kind": kind,
                           "source_buffer_bytes": buffer_bytes(src), "top_k": top_k if "topk" in name else None,
                           "n_cached": n_cached if name.startswith("cached") else None}
            runners.append(framework_runner(name, copy.deepcopy(student0), src, cfg, Cycle(batches),
                                            compile_mode != "none", compile_backend,
                                            compile_mode if compile_mode != "none" else "default"))
        if log:
            log(f"K={k}: timing {', '.join(r.name for r in runners)}")
        _time(runners, steps, repeats, warmup, dev, log)
        names = [n for n in sources if n in extra]
        base = runners[names.index("onehot")]  # compiled or not like the others
        for r, name in zip(runners, names):
            rows.append({**timing_columns(r, base, batch), **_common(k, batch, steps, repeats, dev, amp), **extra[name],
                         "compile_mode": compile_mode, "compile_s": r.compile_s})
        del runners, batches, student0
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def lspp_state_bytes(k: int, optimizer: str = "sgd") -> dict[str, int]:
    """Analytic bytes of LS++'s C at K classes: logits K x (K - 1) float32, their gradient, the
    optimiser's state (SGD momentum: one buffer; AdamW: two) and the per-step K x K temporaries."""
    c = 4 * k * (k - 1)
    opt = c * (2 if optimizer == "adamw" else 1)
    return {"c_param_bytes": c, "c_grad_bytes": c, "c_optimizer_bytes": opt, "c_state_bytes": 2 * c + opt,
            "step_kk_temporary_bytes": LSPP_KK_TEMPORARIES * 4 * k * k}


def _measured_state_bytes(training) -> dict[str, int]:
    """Bytes of the source's parameters, their gradients and their optimiser state, read off the objects."""
    params = [p for p in training.source.parameters() if p.requires_grad]
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    p_bytes = sum(size(p) for p in params)
    g_bytes = sum(size(p.grad) for p in params if p.grad is not None)
    o_bytes = sum(size(v) for p in params for v in training.optimizer.state.get(p, {}).values()
                  if isinstance(v, torch.Tensor) and v.numel() > 1)
    return {"c_param_bytes": p_bytes, "c_grad_bytes": g_bytes, "c_optimizer_bytes": o_bytes,
            "c_state_bytes": p_bytes + g_bytes + o_bytes}


def lspp_large_k(device: str = "cpu", k: int = 1000, big_k: int = 21841, batch_size: int | None = None,
                 steps: int | None = None, repeats: int = 5, warmup: int = 3, optimizer: str = "sgd",
                 max_measure_bytes: int = 8 * 2 ** 30, log=print, amp: str = "none") -> pd.DataFrame:
    """LS++ on the linear student: step time paired against 1-hot, and what its learned C costs.

    At K = ``k`` both rows are timed; ``c_*_bytes`` are read off the trained objects (parameters,
    gradients, optimiser state) and on CUDA ``peak_step_bytes`` is the peak memory one step adds
    above what is allocated before it (torch.cuda.max_memory_allocated; NaN on CPU, where
    ``step_kk_temporary_bytes``, analytic, stands for it). At K = ``big_k`` the same costs are
    computed analytically; one step (after one warm-up) is timed only when the analytic C state
    plus temporaries fit in ``max_measure_bytes`` (default 8 GiB: not at K = 21,841, which needs
    ~19 GB). ``measured`` says which.
    """
    dev, batch, steps = _settings(device, batch_size, steps, repeats, warmup)
    cfg = TrainConfig(device=device, batch_size=batch, optimizer=optimizer, amp=amp).validate()
    rows = []
    for kk, full in ((k, True), (big_k, False)):
        analytic = lspp_state_bytes(kk, optimizer)
        need = analytic["c_state_bytes"] + analytic["step_kk_temporary_bytes"]
        measure = full or need <= max_measure_bytes
        common = _common(kk, batch, steps if full else 1, repeats if full else 1, dev, amp)
        common["preset"] = "large-k-lspp"
        if not measure:
            if log:
                log(f"K={kk}: LS++ not run (needs ~{need / 2 ** 30:.1f} GiB > max_measure_bytes); analytic costs only")
            rows.append({"source": "lspp", **{c: float("nan") for c in ("step_ms_median", "step_ms_min", "step_ms_max",
                         "images_per_s", "ratio_vs_onehot", "paired_ratio_vs_onehot", "peak_step_bytes")},
                         **common, **analytic, "measured": False, "optimizer": optimizer})
            continue
        torch.manual_seed(0)
        student0 = nn.Linear(FEATURES, kk)
        batches = _batches(batch, kk, 1, dev)
        runners = [framework_runner(name, copy.deepcopy(student0), build_source(name, kk) if name == "onehot"
                                     else LSPPLoss(kk, 0.1), cfg, Cycle(batches)) for name in ("onehot", "lspp")]
        trainings = {r.name: r.step.__self__ for r in runners}
        peaks = {}
        for r in runners:  # one untimed step each, for the CUDA peak of a step
            if dev.type == "cuda":
                sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
            r.step(*r.batches.next())
            if dev.type == "cuda":
                sync(dev)
                peaks[r.name] = torch.cuda.max_memory_allocated(dev) - before
        _time(runners, steps if full else 1, repeats if full else 1, warmup if full else 0, dev, log)
        base = runners[0]
        for r in runners:
            state = _measured_state_bytes(trainings[r.name])
            kk_tmp = analytic["step_kk_temporary_bytes"] if r.name == "lspp" else 0
            rows.append({**timing_columns(r, base, batch), **common, **state, "step_kk_temporary_bytes": kk_tmp,
                         "peak_step_bytes": peaks.get(r.name, float("nan")), "measured": True,
                         "optimizer": optimizer})
        del runners, trainings, batches, student0
        gc.collect()
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, lspp: pd.DataFrame | None = None) -> str:
    """The large-K tables a person reads: step time and ratio to 1-hot per K, artifact bytes; LS++'s C costs."""
    mib = lambda b: "-" if pd.isna(b) else f"{b / 2 ** 20:,.1f}"  # noqa: E731
    lines = ["| K | source | step ms (median) | vs onehot (paired) | artifact MiB (on disk) | source memory MiB |",
             "|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.num_classes:,} | {r.source} | {r.step_ms_median:.2f} | {r.paired_ratio_vs_onehot:.3f} | "
                     f"{mib(r.artifact_bytes) if r.artifact_bytes_kind == 'disk' else '-'} | {mib(r.source_buffer_bytes)} |")
    first = df.iloc[0]
    lines += ["", f"large-k: nn.Linear({FEATURES}, K) on random features, batch {first.batch_size}, amp {first.amp}, "
              f"{first.steps} steps x {first.repeats} repeats; top-k rows keep k = {int(df.top_k.dropna().iloc[0]) if df.top_k.notna().any() else '-'}; "
              f"{first.device}; torch {first.torch}"]
    if lspp is not None and len(lspp):
        lines += ["", "| K | source | step ms (median) | vs onehot (paired) | C + grad + optimiser MiB | "
                  "K x K temporaries per step MiB | peak step MiB (CUDA) | measured |", "|---|---|---|---|---|---|---|---|"]
        for r in lspp.itertuples():
            step = "-" if pd.isna(r.step_ms_median) else f"{r.step_ms_median:.2f}"
            ratio = "-" if pd.isna(r.paired_ratio_vs_onehot) else f"{r.paired_ratio_vs_onehot:.3f}"
            lines.append(f"| {r.num_classes:,} | {r.source} | {step} | {ratio} | {mib(r.c_state_bytes)} | "
                         f"{mib(r.step_kk_temporary_bytes)} | {mib(r.peak_step_bytes)} | {r.measured} |")
    return "\n".join(lines)
