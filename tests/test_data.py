import numpy as np
import pytest
import torch

from kd.data import TensorLoader, augment_batch, dataset_info, load_dataset
from kd.errors import KDError


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.train) == 1347 and len(a.test) == 450
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.images, b.test.images)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    tr = np.bincount(a.train.labels.numpy()) / len(a.train)
    te = np.bincount(a.test.labels.numpy()) / len(a.test)
    assert np.abs(tr - te).max() < 0.01
    assert a.info.num_classes == 10 and a.info.default_model == "lenet"


def test_pad_and_crop_is_a_shifted_window_and_flip_mirrors():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, 2, False, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flips = [augment_batch(x, 0, True, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.equal(f[0], x[0]) or torch.equal(f[0], x[0].flip(2)) for f in flips)
    assert any(torch.equal(f[0], x[0].flip(2)) for f in flips)


def test_crop_and_flip_together_give_a_window_or_its_mirror():
    x = torch.arange(3 * 2 * 6 * 6, dtype=torch.uint8).view(3, 2, 6, 6)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for seed in range(10):
        out = augment_batch(x, 1, True, torch.Generator().manual_seed(seed))
        for i in range(3):
            windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(3) for c in range(3)]
            assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_normalisation_matches_the_formula():
    from kd.data import BatchTransform

    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    tf = BatchTransform(255.0, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(tf(x, train=False), (x.float() / 255 - mean) / std)


def test_tensor_loader_covers_each_sample_once_per_epoch_and_shards():
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    seen = torch.cat([yy for _, yy, _ in TensorLoader(x, y, 3, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(10))
    shards = [torch.cat([i for _, _, i in TensorLoader(x, y, 2, shuffle=True, seed=1, rank=r, world_size=2)]) for r in range(2)]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert len(shards[0]) == len(shards[1]) == 5


def test_unknown_dataset_and_missing_root_are_one_line_errors(tmp_path):
    with pytest.raises(KDError, match="unknown data set 'nope'"):
        dataset_info("nope")
    with pytest.raises(KDError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "missing")
    with pytest.raises(KDError, match="CIFAR10 not found under"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(KDError, match=r"tiny-imagenet-200/train"):
        load_dataset("tinyimagenet", tmp_path)
