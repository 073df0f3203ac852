"""MNIST from IDX files in torchvision's layout, and a user's own image folders (imagefolder:PATH)."""
import gzip
import io
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data import folders
from kd.config import TrainConfig
from kd.data import BatchTransform, ImageFiles, ImageTensors, load_dataset
from kd.data import make_loader
from kd.errors import KDError

# ---------------------------------------------------------------------------------------
# MNIST

STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def write_idx(path, arr):
    """An IDX file written from the format's definition: 0, 0, type 0x08, ndim, big-endian dims, bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def mnist_root(tmp_path):
    """64 train and 32 test images, two of the four files gzipped, in ROOT/MNIST/raw."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 28, 28)), np.arange(64) % 10,
              rng.integers(0, 256, (32, 28, 28)), (np.arange(32) * 7) % 10]
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, arr, gz in zip(STEMS, arrays, [True, False, False, True]):
        write_idx(raw / (stem + (".gz" if gz else "")), arr)
    return tmp_path / "root", arrays


def test_mnist_loads_idx_files_gzipped_or_not_from_the_torchvision_layout(mnist_root):
    root, (xtr, ytr, xte, yte) = mnist_root
    split = load_dataset("mnist", root)
    assert isinstance(split.train, ImageTensors) and split.train.images.dtype == torch.uint8
    assert split.train.images.shape == (64, 1, 28, 28) and split.test.images.shape == (32, 1, 28, 28)
    assert np.array_equal(split.train.images[:, 0].numpy(), xtr) and np.array_equal(split.test.images[:, 0].numpy(), xte)
    assert split.train.labels.dtype == torch.int64
    assert split.train.labels.tolist() == ytr.tolist() and split.test.labels.tolist() == yte.tolist()
    info = split.info
    assert info.class_names == [str(i) for i in range(10)] and info.num_classes == 10
    assert (info.channels, info.image_size, info.default_model) == (1, 28, "lenet")
    assert info.flip is False and info.crop_padding == 2  # digits are not mirror-symmetric
    assert info.mean == (0.1307,) and info.std == (0.3081,)


def test_fashion_mnist_reads_the_same_idx_code_from_data_root(mnist_root, tmp_path):
    root, (xtr, ytr, xte, yte) = mnist_root
    for f in (root / "MNIST" / "raw").iterdir():
        shutil.copy(f, tmp_path / f.name)  # Fashion-MNIST also looks directly in ROOT
    split = load_dataset("fashion-mnist", tmp_path)
    assert np.array_equal(split.train.images[:, 0].numpy(), xtr) and split.test.labels.tolist() == yte.tolist()
    assert split.info.flip is True  # Fashion-MNIST keeps its flips


def test_mnist_missing_file_names_the_expected_path_and_layout(mnist_root, tmp_path):
    root, _ = mnist_root
    raw = root / "MNIST" / "raw"
    for f in raw.iterdir():
        shutil.copy(f, root / f.name)  # files directly in ROOT are not MNIST's place (Fashion-MNIST's names)
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(KDError) as e:
        load_dataset("mnist", root)
    msg = str(e.value)
    assert str(raw / "t10k-images-idx3-ubyte") in msg and "ROOT/MNIST/raw" in msg and "\n" not in msg


def test_mnist_label_count_must_match_the_images(mnist_root):
    root, (xtr, ytr, xte, yte) = mnist_root
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", ytr[:-1])
    with pytest.raises(KDError, match="63 labels for the 64 images"):
        load_dataset("mnist", root)


def test_mnist_trains_end_to_end_through_the_cli(mnist_root, tmp_path, kd_main):
    root, _ = mnist_root
    out = tmp_path / "run"
    code, stdout, err = kd_main("train-teacher", "--method", "onehot", "--dataset", "mnist", "--data-root", root,
                                "--epochs", 1, "--batch-size", 16, "--device", "cpu", "--quiet", "--out", out)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == "mnist" and s["model"] == "lenet" and s["class_names"] == [str(i) for i in range(10)]
    assert 0.0 <= s["test_acc"] <= 1.0


def test_missing_mnist_is_a_one_line_cli_error_that_writes_nothing(tmp_path, kd_main):
    (tmp_path / "root").mkdir()
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "onehot", "--dataset", "mnist", "--data-root", tmp_path / "root",
                           "--epochs", 1, "--device", "cpu", "--quiet", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "root" / "MNIST" / "raw" / "train-images-idx3-ubyte") in err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------
# imagefolder:PATH

CLASSES = {"cat": (200, 40, 40), "ant": (30, 180, 60), "bee": (40, 60, 220)}  # sorted: ant, bee, cat


def square_image(rng, colour, size=16, mode="RGB"):
    """A noisy background with a coloured square at a random place."""
    a = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
    r, c = rng.integers(0, size // 2, 2)
    a[r:r + size // 2, c:c + size // 2] = colour
    im = Image.fromarray(a, "RGB")
    return im.convert(mode) if mode != "RGB" else im


def make_folder(root, n_train=6, n_val=3, mode="RGB", test_name="val", seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), (test_name, n_val)):
        for name, colour in CLASSES.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                square_image(rng, colour, mode=mode).save(d / f"img{i:02d}.png")
    return root


def files_of(root, split):
    return [f for c in sorted(CLASSES) for f in sorted((root / split / c).iterdir())]


def numpy_mean_std(files, mode="RGB"):
    """Per-channel mean and population std of the images / 255, in float64 straight from numpy."""
    x = np.stack([np.asarray(Image.open(f).convert(mode), dtype=np.float64) / 255.0 for f in files])
    x = x.reshape(len(files), -1, 1 if mode == "L" else 3)
    return x.mean(axis=(0, 1)), x.std(axis=(0, 1))


def test_image_folder_loads_in_memory_with_sorted_classes_and_measured_mean_std(tmp_path):
    root = make_folder(tmp_path / "pics")
    split = load_dataset(f"imagefolder:{root}")
    info = split.info
    assert info.class_names == ["ant", "bee", "cat"] and info.num_classes == 3
    assert info.name == f"imagefolder:{root.resolve()}"
    assert (info.channels, info.image_size, info.crop_padding, info.flip) == (3, 16, 2, True)
    assert info.default_model == "resnet18"
    assert isinstance(split.train, ImageTensors) and split.train.images.dtype == torch.uint8
    assert split.train.images.shape == (18, 3, 16, 16) and split.test.images.shape == (9, 3, 16, 16)
    assert split.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert split.test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    for i, f in enumerate(files_of(root, "train")):
        assert np.array_equal(split.train.images[i].permute(1, 2, 0).numpy(), np.asarray(Image.open(f)))
    mean, std = numpy_mean_std(files_of(root, "train"))
    np.testing.assert_allclose(info.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(info.std, std, rtol=1e-9)


def test_grayscale_only_when_every_training_image_is_L(tmp_path):
    root = make_folder(tmp_path / "gray", mode="L")
    split = load_dataset(f"imagefolder:{root}")
    assert split.info.channels == 1 and split.train.images.shape == (18, 1, 16, 16)
    mean, std = numpy_mean_std(files_of(root, "train"), "L")
    np.testing.assert_allclose(split.info.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(split.info.std, std, rtol=1e-9)
    square_image(np.random.default_rng(1), (9, 9, 9)).save(root / "train" / "bee" / "zz_colour.png")
    split = load_dataset(f"imagefolder:{root}")
    assert split.info.channels == 3 and split.train.images.shape == (19, 3, 16, 16)
    gray = np.asarray(Image.open(files_of(root, "train")[0]))
    assert all(np.array_equal(split.train.images[0, c].numpy(), gray) for c in range(3))  # L -> RGB repeats


def test_mixed_sizes_are_resized_to_the_first_image_or_the_size_asked_for(tmp_path):
    root = make_folder(tmp_path / "pics", test_name="test")  # test/ stands in for val/
    Image.new("RGB", (20, 12), (250, 250, 0)).save(root / "train" / "cat" / "wide.png")
    split = load_dataset(f"imagefolder:{root}")
    assert split.train.images.shape == (19, 3, 16, 16) and len(split.test) == 9
    wide = [i for i, f in enumerate(files_of(root, "train")) if f.name == "wide.png"][0]
    assert split.train.images[wide].flatten(1).float().mean(1).tolist() == pytest.approx([250, 250, 0], abs=1)
    small = load_dataset(f"imagefolder:{root}", image_size=8)
    assert small.train.images.shape == (19, 3, 8, 8) and small.info.image_size == 8 and small.info.crop_padding == 1


def test_streaming_path_gives_the_same_items_as_the_in_memory_one(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pics")
    held = load_dataset(f"imagefolder:{root}")
    monkeypatch.setattr(folders, "IN_MEMORY_LIMIT_BYTES", 0)
    split = load_dataset(f"imagefolder:{root}")
    assert isinstance(split.train, ImageFiles) and isinstance(split.test, ImageFiles)
    assert split.info.mean == pytest.approx(held.info.mean, rel=1e-12)  # 18 images: the sample is all of them
    assert split.info.std == pytest.approx(held.info.std, rel=1e-12)
    tf = BatchTransform(255.0, held.info.mean, held.info.std)
    want = tf(held.test.images, train=False)
    for i in range(len(split.test)):
        x, y = split.test[i]
        torch.testing.assert_close(x, want[i])
        assert y == int(held.test.labels[i])
    for workers in (0, 2):
        cfg = TrainConfig(batch_size=4, num_workers=workers)
        x, y, idx = next(iter(make_loader(split.train, split.info, cfg, train=True, device="cpu")))
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y, held.train.labels[idx])


def test_streamed_corrupt_image_is_named_when_read(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pics")
    png = io.BytesIO()
    square_image(np.random.default_rng(3), (1, 2, 3), size=64).save(png, "PNG")
    bad = root / "val" / "cat" / "zz_cut.png"
    bad.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])  # the header reads, the pixels do not
    monkeypatch.setattr(folders, "IN_MEMORY_LIMIT_BYTES", 0)
    monkeypatch.setattr(folders, "STREAM_STATS_IMAGES", 2)
    split = load_dataset(f"imagefolder:{root}")
    with pytest.raises(KDError, match="cannot read image .*zz_cut.png"):
        split.test[len(split.test) - 1]


def test_image_folder_trains_end_to_end_through_the_cli(tmp_path, kd_main):
    root = make_folder(tmp_path / "pics")
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "onehot", "--dataset", f"imagefolder:{root}",
                           "--model", "lenet",  # the default (resnet18) takes seconds per step on a busy CPU
                           "--epochs", 1, "--batch-size", 6, "--device", "cpu", "--quiet", "--out", out)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == f"imagefolder:{root.resolve()}" and s["class_names"] == ["ant", "bee", "cat"]
    assert s["image_size"] == 16 and s["in_channels"] == 3 and s["num_classes"] == 3
    mean, std = numpy_mean_std(files_of(root, "train"))
    np.testing.assert_allclose(s["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(s["std"], std, rtol=1e-9)


def _truncate(root):
    png = io.BytesIO()
    square_image(np.random.default_rng(4), (5, 5, 5), size=64).save(png, "PNG")
    (root / "train" / "bee" / "img03.png").write_bytes(png.getvalue()[:200])


BAD_LAYOUTS = {  # case -> (change to a good folder, what the one-line error must name)
    "missing": (lambda r: shutil.rmtree(r), "{r} does not exist"),
    "not-a-folder": (lambda r: (shutil.rmtree(r), r.write_text("x")), "{r} is not a folder"),
    "no-train": (lambda r: shutil.rmtree(r / "train"), "{r} has no train/ folder"),
    "no-val": (lambda r: shutil.rmtree(r / "val"), "{r} has no val/ or test/ folder"),
    "class-only-in-train": (lambda r: shutil.rmtree(r / "val" / "cat"), "'cat' is in {r}/train but not in {r}/val"),
    "class-only-in-val": (lambda r: shutil.copytree(r / "val" / "cat", r / "val" / "dog"), "'dog' is in {r}/val but not in {r}/train"),
    "empty-split": (lambda r: [f.unlink() for f in (r / "val").rglob("*.png")], "{r}/val holds no images"),
    "empty-train-class": (lambda r: [f.unlink() for f in (r / "train" / "bee").iterdir()], "{r}/train/bee holds no images"),
    "not-an-image": (lambda r: (r / "train" / "ant" / "img02.png").write_bytes(b"not an image"),
                     "cannot read image {r}/train/ant/img02.png"),
    "truncated": (_truncate, "cannot read image {r}/train/bee/img03.png"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_image_folders_are_one_line_cli_errors_that_write_nothing(case, tmp_path, kd_main):
    root = make_folder(tmp_path / "pics").resolve()
    change, expected = BAD_LAYOUTS[case]
    change(root)
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "onehot", "--dataset", f"imagefolder:{root}",
                           "--epochs", 1, "--device", "cpu", "--quiet", "--out", out)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("kd: error: ")
    assert expected.format(r=root) in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_names_and_sizes_are_errors(tmp_path):
    root = make_folder(tmp_path / "pics")
    with pytest.raises(KDError, match="imagefolder:PATH"):
        load_dataset("imagefolder:")
    for bad in (0, -3, 2.5, "big"):
        with pytest.raises(KDError, match="--image-size must be a positive whole number"):
            load_dataset(f"imagefolder:{root}", image_size=bad)
    with pytest.raises(KDError, match="--image-size applies to imagefolder:PATH"):
        load_dataset("digits", image_size=32)
    with pytest.raises(KDError, match="--download does not apply"):
        load_dataset(f"imagefolder:{root}", download=True)
    assert load_dataset("digits", image_size=8).info.image_size == 8  # the set's own size is accepted
