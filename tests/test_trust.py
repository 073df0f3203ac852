"""Trust: labels are checked at the door, and a non-finite loss stops the run (API and CLI)."""
import pytest
import torch

from kd import runs
from kd.config import TrainConfig
from kd.data import ImageTensors
from kd.engine import fit
from kd.errors import KDError
from kd.models import MLP
from students import distill, train_teacher
from teachers.lspp import LSPPLoss
from teachers.onehot import OneHot


def blobs(n, k=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


CFG = dict(batch_size=64, lr=0.05, device="cpu")
FINAL = (runs.WEIGHTS, runs.C_MATRIX, runs.SUMMARY)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_one_nan_input_stops_the_run_and_writes_nothing_final(tmp_path):
    train, test = blobs(512), blobs(100, seed=1)
    train.tensors[0][37, 2] = float("nan")  # one NaN among 512 inputs
    with pytest.raises(KDError) as e:
        fit(MLP(5, 3), LSPPLoss(3), train, test, TrainConfig(epochs=2, **CFG), run_dir=tmp_path,
            progress=False, log=None)
    msg = one_line(e)
    assert "epoch 1" in msg and "NaN/Inf" in msg and "inputs" in msg
    assert not any((tmp_path / name).exists() for name in (*FINAL, runs.CHECKPOINT, runs.METRICS))


def test_nan_from_epoch_2_keeps_the_last_good_checkpoint_and_resume_continues(tmp_path):
    train, test = blobs(512), blobs(100, seed=1)
    x = train.tensors[0]  # on the CPU the loader batches from this very tensor

    def poison_after_epoch_1(line):  # fit logs an epoch after its metrics and checkpoint are on disk
        if line.startswith("epoch   1"):
            x[37, 2] = float("nan")

    cfg = TrainConfig(epochs=3, **CFG)
    with pytest.raises(KDError) as e:
        fit(MLP(5, 3), LSPPLoss(3), train, test, cfg, run_dir=tmp_path, progress=False, log=poison_after_epoch_1)
    msg = one_line(e)
    assert "epoch 2" in msg and "NaN/Inf" in msg and "checkpoint of epoch 1" in msg
    assert not any((tmp_path / name).exists() for name in FINAL)
    assert (tmp_path / runs.CHECKPOINT).exists()
    metrics = (tmp_path / runs.METRICS).read_text()
    assert metrics.count("\n") == 2  # header and epoch 1 only

    # The data mended, the run continues from the kept checkpoint: had the NaN epoch 2 been
    # checkpointed, the resumed run would start at epoch 3 from NaN weights and stop again.
    x[37, 2] = 0.0
    lines = []
    res = fit(MLP(5, 3), LSPPLoss(3), train, test, cfg, run_dir=tmp_path, progress=False, log=lines.append,
              resume=True)
    assert lines[0].startswith("resuming after epoch 1")
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert (tmp_path / runs.METRICS).read_text().splitlines()[:2] == metrics.splitlines()
    assert all((tmp_path / name).is_file() for name in FINAL)
    assert torch.isfinite(res.source.c_matrix()).all()


def test_too_high_learning_rate_via_the_cli_exits_2_with_one_line(kd_main, tmp_path):
    out = tmp_path / "run"
    code, _, err = kd_main("train-teacher", "--method", "lspp", "--dataset", "digits", "--epochs", 2, "--lr", 1e6,
                           "--device", "cpu", "--out", out, "--quiet")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "learning rate" in err and "epoch 1" in err and "NaN/Inf" in err
    assert not any((out / name).exists() for name in (*FINAL, runs.CHECKPOINT))


@pytest.mark.parametrize("bad", [3, -1])
def test_out_of_range_training_label_is_named_at_the_door(bad):
    train, test = blobs(200), blobs(50, seed=1)
    train.tensors[1][37] = bad
    with pytest.raises(KDError) as e:
        fit(MLP(5, 3), OneHot(3), train, test, TrainConfig(epochs=1, **CFG), progress=False, log=None)
    assert one_line(e) == (f"training label {bad} at sample 37 is outside [0, 3); the source has K=3 classes")


def test_out_of_range_test_label_through_distill_and_image_tensors():
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    train = ImageTensors(images(64), torch.arange(64) % 3)
    test = ImageTensors(images(16), torch.tensor([0, 1, 2] * 5 + [7]))
    with pytest.raises(KDError, match=r"^test label 7 at sample 15 is outside \[0, 3\); the source has K=3"):
        distill(MLP(16, 3), OneHot(3), train, test, TrainConfig(epochs=1, batch_size=16, device="cpu", num_workers=0),
                progress=False, log=None)


def test_labels_beyond_the_given_num_classes_through_train_teacher():
    train, test = blobs(200, k=4), blobs(50, k=4, seed=1)
    with pytest.raises(KDError, match=r"^training label 3 at sample \d+ is outside \[0, 3\)"):
        train_teacher(MLP(5, 3), train, test, TrainConfig(epochs=1, **CFG), num_classes=3, progress=False, log=None)


def test_labels_of_a_folder_like_set_are_read_from_targets():
    class Items(torch.utils.data.Dataset):  # a map-style set with .targets, like an image folder
        def __init__(self, n, bad_at=None):
            self.targets = [i % 3 for i in range(n)]
            if bad_at is not None:
                self.targets[bad_at] = 5

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.full((5,), float(self.targets[i])), self.targets[i]

    with pytest.raises(KDError, match=r"^training label 5 at sample 4 is outside \[0, 3\)"):
        fit(MLP(5, 3), OneHot(3), Items(64, bad_at=4), Items(16), TrainConfig(epochs=1, batch_size=16, device="cpu", num_workers=0),
            progress=False, log=None)
    res = fit(MLP(5, 3), OneHot(3), Items(64), Items(16), TrainConfig(epochs=1, batch_size=16, device="cpu", num_workers=0),
              progress=False, log=None)
    assert len(res.history) == 1


def test_model_output_size_must_match_the_source():
    train, test = blobs(200), blobs(50, seed=1)
    model = MLP(5, 4)
    with pytest.raises(KDError) as e:
        fit(model, LSPPLoss(3), train, test, TrainConfig(epochs=1, **CFG), progress=False, log=None)
    assert "outputs 4 logits" in one_line(e) and "K=3" in str(e.value)


def test_the_door_check_leaves_the_run_unchanged():
    """The one-sample forward runs in eval mode under no_grad and restores train mode."""
    train, test = blobs(200), blobs(50, seed=1)
    torch.manual_seed(0)
    model = MLP(5, 3)
    res = fit(model, OneHot(3), train, test, TrainConfig(epochs=1, **CFG), progress=False, log=None)
    assert res.model.training
