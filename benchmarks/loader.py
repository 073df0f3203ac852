"""Does the data loader stall training? One epoch through the real loader against the same steps
on batches already materialised in memory, interleaved over repeats, same model and optimiser.

ratio = median(real-loader epoch) / median(in-memory epoch); 1.00 means loading is free.
paired_ratio = median over repeats of the two epochs' ratio within the repeat (steadier under drift).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.harness import sync
from kd.config import TrainConfig
from kd.data import load_dataset
from kd.data import make_loader
from kd.engine import machine_name, make_accelerator, prepare_training
from kd.models import create_model
from teachers.onehot import OneHot


def loader_ratio(dataset: str = "fashion-mnist", model: str | None = None, batch_size: int = 128,
                 repeats: int = 5, data_root: str | None = None, device: str = "cpu", log=print,
                 aa: str | None = None, num_workers: int = 2) -> dict:
    """Real-loader epoch time over in-memory epoch time; ``aa`` adds per-image RandAugment in workers."""
    split = load_dataset(dataset, data_root)
    info = split.info
    name = model or info.default_model
    cfg = TrainConfig(dataset=dataset, model=name, batch_size=batch_size, device=device, aa=aa, num_workers=num_workers)
    dev = torch.device(device)
    torch.manual_seed(0)
    net0 = create_model(name, info.num_classes, info.channels, info.image_size)

    def make_step():
        return prepare_training(make_accelerator(cfg), copy.deepcopy(net0), OneHot(info.num_classes), cfg,
                                steps_per_epoch=10**6).step

    real_loader = make_loader(split.train, info, cfg, train=True, device=dev)
    real_step, mem_step = make_step(), make_step()
    batches = list(make_loader(split.train, info, cfg, train=True, device=dev))  # augmented once, kept
    real_times, mem_times = [], []
    for rep in range(repeats + 1):  # the first round is a warm-up
        real_loader.set_epoch(rep)
        pairs = [("real", real_times), ("memory", mem_times)]
        for kind, times in (pairs if rep % 2 == 0 else pairs[::-1]):
            sync(dev)
            t0 = time.perf_counter()
            if kind == "real":
                for x, y, i in real_loader:
                    real_step(x, y, i)
            else:
                for x, y, i in batches:
                    mem_step(x, y, i)
            sync(dev)
            if rep > 0:
                times.append(time.perf_counter() - t0)
        if log and rep > 0:
            log(f"repeat {rep}/{repeats}: real loader {real_times[-1]:.2f}s, in memory {mem_times[-1]:.2f}s")
    return {"dataset": info.name, "model": name, "batch_size": batch_size, "steps_per_epoch": len(batches),
            "aa": aa, "num_workers": num_workers if aa else 0,
            "real_epoch_s_median": statistics.median(real_times), "memory_epoch_s_median": statistics.median(mem_times),
            "ratio": statistics.median(real_times) / statistics.median(mem_times),
            "paired_ratio": statistics.median(a / b for a, b in zip(real_times, mem_times)), "repeats": repeats,
            "device": machine_name(dev), "torch": torch.__version__}
