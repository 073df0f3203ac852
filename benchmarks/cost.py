"""What each target source costs per training step, measured side by side in one run.

Every source trains its own copy of the same student (same initial weights, same batches,
same optimiser) through the engine's real training step; ``bare`` is a hand-written PyTorch
loop with no framework code, at the framework rows' learning rate, the floor. Warm-up steps are
not timed; sources are interleaved over the repeats in a fresh random order each repeat, so machine drift hits all alike and no row
always follows the same neighbour; in step mode each row first takes one untimed step, so its
timed steps run with its own weights and batch in the caches, as every step of a training run
does. Rows that run a network on the inputs (a ResNet teacher online) are timed in a phase of
their own after the others: a 60x step between two small ones evicts their caches, and the
slow-down would be billed to its neighbours. Garbage collection is frozen while
timing; each repeat times ``steps`` steps between two host clock reads, with a device
synchronise before each read on CUDA and no host sync inside the steps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pandas as pd
import torch

from benchmarks.harness import (SUFFIXES, Cycle, bare_runner, compiled_suffix, framework_runner, load_average,
                                paired_ratio, stand_in_source, sync, timed_repeats, timing_columns, warm_up)
from kd.config import TrainConfig
from kd.data import ImageTensors, dataset_info, load_dataset, make_loader
from kd.engine import AMP_DTYPES, machine_name, resolve_device
from kd.errors import KDError
from kd.models import create_model
from teachers import bench_rows, row_table


@dataclass(frozen=True)
class Preset:
    name: str
    channels: int
    size: int
    num_classes: int
    teacher: str
    student: str
    dataset: str | None  # the real data set `--data` defaults to
    batch_cpu: int
    batch_cuda: int


PRESETS = {p.name: p for p in (
    Preset("tinyimagenet-r101-shufflenet", 3, 64, 200, "resnet101", "shufflenetv2", "tinyimagenet", 16, 256),
    Preset("cifar100-r34-r18", 3, 32, 100, "resnet34", "resnet18", "cifar100", 32, 256),
    Preset("fmnist-lenet", 1, 28, 10, "resnet18", "lenet", "fashion-mnist", 128, 256),
    Preset("digits", 1, 8, 10, "resnet18", "lenet", "digits", 128, 128),
)}


def synthetic_batches(preset: Preset, batch: int, device, channels_last: bool, n_cached: int, count: int = 4):
    """A few fixed batches already on the device: the timing covers compute, not loading."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(batch, preset.channels, preset.size, preset.size, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, preset.num_classes, (batch,), generator=g).to(device)
        idx = torch.randint(0, n_cached, (batch,), generator=g).to(device)
        out.append((x, y, idx))
    return out


def synthetic_split(preset: Preset, num_samples: int):
    """Random uint8 images of the preset's shape, described as the preset's data set (its mean, std,
    crop padding and flips), so an epoch over them goes through the same loader and batch
    augmentation as the real in-memory data set would."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (num_samples, preset.channels, preset.size, preset.size), generator=g,
                           dtype=torch.uint8)
    labels = torch.randint(0, preset.num_classes, (num_samples,), generator=g)
    info = dataset_info(preset.dataset)
    return ImageTensors(images, labels), info


def run_bench(preset: str, device: str = "cpu", batch_size: int | None = None, steps: int | None = None,
              repeats: int = 5, warmup: int = 3, amp: str = "none", channels_last: bool = False,
              sources: tuple[str, ...] | None = None, data: str | None = None, data_root: str | None = None,
              log=print, mode: str = "step", compile: bool = False, epoch_size: int | None = None,
              compile_backend: str = "inductor", compile_mode: str = "default") -> pd.DataFrame:
    """Time the preset's student for each source; one row per source (and per compiled variant).

    ``mode="step"``: ``steps`` steps per repeat on batches already on the device (or drawn from
    ``data``'s loader). ``mode="epoch"``: each repeat is one whole epoch through the real loader
    (batch slicing and augmentation included) of ``data``, or, without ``data``, of
    ``epoch_size`` synthetic uint8 images of the preset's shape. ``compile=True`` adds a
    ``SOURCE+compile`` row per source (see :func:`benchmarks.harness.compile_training`; ``compile_mode``
    reduce-overhead makes them ``SOURCE+graphs`` rows, replayed as CUDA graphs); its first warm-up
    step, which compiles, is timed apart as ``compile_s`` and never inside the timed repeats
    (``compile_backend``: torch.compile's backend; the tests use ``aot_eager``, which needs no C++ compiler).
    """
    rows = bench_rows()
    sources = tuple(sources or rows)
    if preset not in PRESETS:
        raise KDError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if mode not in ("step", "epoch"):
        raise KDError(f"unknown --mode '{mode}'; choose step or epoch")
    p = PRESETS[preset]
    unknown = [s for s in sources if s not in rows]
    if unknown:
        raise KDError(f"unknown source '{unknown[0]}'; choose from {', '.join(rows)}")
    resolve_device(device)
    if compile and compile_mode == "reduce-overhead" and device != "cuda":
        raise KDError("--compile-mode reduce-overhead replays CUDA graphs and needs --device cuda; on the CPU use "
                      "--compile-mode default")
    if repeats < 1 or (steps is not None and steps < 1 and data is None) or warmup < 0:
        raise KDError("--repeats and --steps must be at least 1, --warmup at least 0")
    if mode == "epoch" and steps is not None:
        raise KDError("--mode epoch times whole epochs; set their length with --epoch-size (synthetic) instead of --steps")
    dev = torch.device(device)
    batch = batch_size or (p.batch_cuda if dev.type == "cuda" else p.batch_cpu)
    if mode == "epoch" and data is None and epoch_size is not None and epoch_size < batch:
        raise KDError(f"--epoch-size {epoch_size} is smaller than one batch ({batch}); give at least {batch} samples")
    amp_dtype = AMP_DTYPES[amp]
    cfg = TrainConfig(device=device, amp=amp, channels_last=channels_last, batch_size=batch, augment=True)

    n_cached = 10_000
    real = None
    if data is not None:
        split = load_dataset(data, data_root)
        info = split.info
        if (info.channels, info.image_size, info.num_classes) != (p.channels, p.size, p.num_classes):
            raise KDError(f"data set '{data}' does not match preset '{preset}' "
                          f"({info.channels}x{info.image_size}x{info.image_size}, K={info.num_classes})")
        real = (split.train, info)
    elif mode == "epoch":
        real = synthetic_split(p, epoch_size or batch * (50 if dev.type == "cuda" else 8))
    if real is not None:
        n_cached = len(real[0])
        loader = make_loader(real[0], real[1], cfg, train=True, device=dev)
        steps = len(loader) if mode == "epoch" else (steps or len(loader))
    steps = steps or (20 if dev.type == "cuda" else 10)

    torch.manual_seed(0)
    student0 = create_model(p.student, p.num_classes, p.channels, p.size)
    teacher = None
    table = row_table()
    if any(table[s][0].needs_inputs for s in sources if s != "bare"):  # network, tfkd-self, ...
        teacher = create_model(p.teacher, p.num_classes, p.channels, p.size).to(dev).eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
    if channels_last:
        student0.to(memory_format=torch.channels_last)

    synthetic = None if real else synthetic_batches(p, batch, dev, channels_last, n_cached)
    runners = []
    for name in sources:
        for compiled in ((False, True) if compile else (False,)):
            batches = Cycle(synthetic) if real is None else Cycle(
                loader=make_loader(real[0], real[1], cfg, train=True, device=dev), channels_last=channels_last)
            student = copy.deepcopy(student0)
            if name == "bare":
                runners.append(bare_runner(student, cfg, dev, amp_dtype, batches, compiled, compile_backend,
                                            compile_mode))
            else:
                # a compiled teacher is its own copy, so the eager network row keeps an eager teacher
                t = copy.deepcopy(teacher) if (compiled and teacher is not None) else teacher
                runners.append(framework_runner(name, student, stand_in_source(name, p.num_classes, t, n_cached), cfg,
                                                batches, compiled, compile_backend, compile_mode))

    for r in runners:  # warm-up: allocator, autotuning, lazy init, compilation
        warm_up(r, warmup, dev)
        if log and r.compiled:
            log(f"{r.name}: first step (compilation) {r.compile_s:.1f}s, {r.graphs} graph(s)"
                + ("" if r.graphs else ": nothing was compiled, the row runs eagerly (marked 'fell back')"))
    sync(dev)
    load_start = load_average()
    timed_repeats(runners, repeats, steps, mode, dev, log)
    load_end = load_average()

    by_name = {r.name: r for r in runners}
    rows = []
    for r in runners:
        row = {
            # ratios to 1-hot with the same compilation
            **timing_columns(r, by_name.get("onehot" + compiled_suffix(compile_mode) * r.compiled), batch),
            "preset": p.name, "teacher": p.teacher, "student": p.student,
            "input_shape": f"{p.channels}x{p.size}x{p.size}", "num_classes": p.num_classes,
            "batch_size": batch, "amp": amp, "channels_last": channels_last, "steps": steps, "repeats": repeats,
            "data": data or "synthetic", "device": machine_name(dev), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg_start": load_start, "load_avg_end": load_end,
        }
        if mode == "epoch":
            row.update(mode="epoch", epoch_s_median=row["step_ms_median"] * steps / 1000.0, epoch_samples=steps * batch)
        if compile:
            eager = by_name[r.name.removesuffix(compiled_suffix(compile_mode))]
            row.update(compiled=r.compiled, compile_mode=compile_mode if r.compiled else "none", compile_s=r.compile_s,
                       compiled_graphs=r.graphs, fell_back=bool(r.compiled and r.graphs == 0),
                       paired_speedup_vs_eager=paired_ratio(eager, r))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df) -> str:
    """The table a person reads: medians, spread, throughput and the ratio to 1-hot.

    Epoch-mode rows add seconds per epoch; compiled rows add the compilation time (the first
    step's wall time, outside the timed repeats) and the speed-up over the same row eager.
    """
    epoch = "epoch_s_median" in df.columns
    compiled = "compile_s" in df.columns
    head = "| source | step ms (median) | min | max | images/s | vs onehot (medians) | vs onehot (paired) |"
    if epoch:
        head += " s / epoch (median) |"
    if compiled:
        head += " compile s | speed-up vs eager (paired) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in df.itertuples():
        line = (f"| {r.source} | {r.step_ms_median:.2f} | {r.step_ms_min:.2f} | {r.step_ms_max:.2f} | "
                f"{r.images_per_s:.0f} | {r.ratio_vs_onehot:.3f} | {r.paired_ratio_vs_onehot:.3f} |")
        if epoch:
            line += f" {r.epoch_s_median:.2f} |"
        if compiled:
            fell_back = bool(getattr(r, "fell_back", False))
            line += ((" fell back (ran eagerly) |" if fell_back else f" {r.compile_s:.1f} |")
                     + f" {r.paired_speedup_vs_eager:.2f} |" if r.compiled else " - | - |")
        lines.append(line)
    first = df.iloc[0]
    lines.append("")
    what = (f"one epoch of {first.epoch_samples} samples ({first.steps} steps) through the real loader x "
            f"{first.repeats} repeats" if epoch else f"{first.steps} steps x {first.repeats} repeats")
    lines.append(f"{first.preset}: {first.teacher} -> {first.student}, input {first.input_shape}, K={first.num_classes}, "
                 f"batch {first.batch_size}, amp {first.amp}, channels_last {first.channels_last}, data {first.data}, "
                 f"{what}; {first.device}; torch {first.torch}")
    med = dict(zip(df.source, df.step_ms_median))
    unit = "epoch" if epoch else "step"
    for suffix in ("", *SUFFIXES.values()):
        if "network" + suffix in med and "proxy" + suffix in med:
            lines.append(f"network{suffix} / proxy{suffix} {unit} time: "
                         f"{med['network' + suffix] / med['proxy' + suffix]:.2f}x")
    return "\n".join(lines)
