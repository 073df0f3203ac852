"""Seeding that covers model construction and leaves the caller's random state as it was."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device) with
    ``seed`` inside the block, and put back the states they had before on leaving it.

    ``with seeded(0): model = MLP(20, 5)`` builds the same initial weights every time without
    changing what the caller's own random draws give afterwards. ``train_teacher`` and ``distill``
    run under ``seeded(config.seed)``, and build a model handed to them as a function
    (``lambda: MLP(20, 5)``) inside it.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)  # also seeds every CUDA device, lazily where CUDA is not started yet
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
