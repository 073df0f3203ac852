"""Fashion-MNIST from Debian's IDX files (`apt-get install dataset-fashion-mnist`, done by .ci/run)."""
import gzip

import pytest
import torch

from kd import data
from kd.data import named
from kd.config import TrainConfig
from kd.data import FASHION_MNIST_DEBIAN, load_dataset
from kd.engine import fit
from kd.errors import KDError
from kd.models import create_model
from teachers.onehot import OneHot

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz").exists(),
                                reason="dataset-fashion-mnist is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist")


def test_real_files_load_as_uint8_tensors_with_class_names(fmnist):
    assert fmnist.train.images.shape == (60000, 1, 28, 28) and fmnist.test.images.shape == (10000, 1, 28, 28)
    assert fmnist.train.images.dtype == torch.uint8
    assert torch.bincount(fmnist.train.labels).tolist() == [6000] * 10
    assert torch.bincount(fmnist.test.labels).tolist() == [1000] * 10
    assert fmnist.info.class_names[6] == "Shirt" and fmnist.info.class_names[9] == "Ankle boot"
    mean = fmnist.train.images.float().mean() / 255
    assert abs(float(mean) - fmnist.info.mean[0]) < 1e-3  # the normalisation constants fit the data


def test_a_few_hundred_steps_learn_far_above_chance(fmnist):
    sub = data.ImageTensors(fmnist.train.images[:19200], fmnist.train.labels[:19200])
    test = data.ImageTensors(fmnist.test.images[:2000], fmnist.test.labels[:2000])
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.05, device="cpu")  # 300 steps
    res = fit(create_model("lenet", 10, 1, 28), OneHot(10), sub, test, cfg, info=fmnist.info, progress=False, log=None)
    assert res.summary["test_acc"] > 0.6  # chance is 0.1


def test_idx_files_are_found_under_data_root_and_a_truncated_file_is_refused(tmp_path):
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for s in stems:
        (tmp_path / f"{s}.gz").write_bytes((FASHION_MNIST_DEBIAN / f"{s}.gz").read_bytes())
    split = load_dataset("fashion-mnist", tmp_path)
    assert len(split.train) == 60000
    raw = gzip.decompress((FASHION_MNIST_DEBIAN / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(KDError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_missing_files_name_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(named, "FASHION_MNIST_DEBIAN", tmp_path / "debian")
    monkeypatch.setenv("KD_DATA_ROOT", str(tmp_path / "default"))
    with pytest.raises(KDError) as e:
        load_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and str(tmp_path / "debian") in msg and "FashionMNIST/raw" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
