"""The catalogue of bad input: each is refused with one line (exit code 2 on the CLI, a KDError
through the API) naming what was wrong, and nothing that existed before is changed."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd.config import TrainConfig
from kd.engine import fit
from kd.errors import KDError
from kd.lock import run_lock
from kd.models import MLP
from teachers.lspp import LSPPLoss


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished LS++ run, its cache, an unfinished run, and broken artifacts beside them."""
    from kd.app.cli import main

    base = tmp_path_factory.mktemp("bad")
    q = ["--device", "cpu", "--quiet"]
    assert main(["train-teacher", "--method", "lspp", "--epochs", "1", "--out", str(base / "teacher"), *q]) == 0
    assert main(["teacher", "cache", str(base / "teacher"), "--out", str(base / "cache.safetensors")]) == 0
    assert main(["train-teacher", "--method", "onehot", "--epochs", "1", "--out", str(base / "unfinished"), *q]) == 0
    (base / "unfinished" / "summary.json").unlink()  # a run killed before its end, without a checkpoint
    c = load_file(str(base / "teacher" / "c_matrix.safetensors"))["c_matrix"]
    save_file({"c_matrix": c * 1.5}, str(base / "c_rows_not_one.safetensors"), metadata={"alpha": "0.1"})
    data = (base / "teacher" / "c_matrix.safetensors").read_bytes()
    (base / "c_truncated.safetensors").write_bytes(data[: len(data) // 2])
    logits = load_file(str(base / "cache.safetensors"))["logits"]
    save_file({"logits": logits[:-5].contiguous()}, str(base / "cache_short.safetensors"), metadata={"dataset": "digits"})
    (base / "bad.yaml").write_text("epochz: 3\n")
    (base / "notyaml.yaml").write_text("epochs: [1, 2\n")
    (base / "taken").mkdir()
    (base / "taken" / "keep.txt").write_text("keep")
    return base


def _snapshot(base):
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


B = "{base}"
CASES = [  # (argv, expected text in the one line)
    (["train-teacher", "--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["train-teacher", "--dataset", "mnist-ish"], "unknown data set 'mnist-ish'"),
    (["train-teacher", "--alpha", "1.5"], "alpha must lie in (0, 1)"),
    (["train-teacher", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "does not exist"),
    (["train-teacher", "--epochs", "0"], "--epochs must be at least 1"),
    (["train-teacher", "--method", "hotdog"], "invalid choice"),
    (["train-teacher", "--config", f"{B}/bad.yaml"], "unknown key 'epochz'"),
    (["train-teacher", "--config", f"{B}/notyaml.yaml"], "not valid YAML"),
    (["train-teacher", "--aa", "augmix-m3"], "--aa 'augmix-m3'"),
    (["train-teacher", "--mixup", "-1"], "must be >= 0"),
    (["train-teacher", "--lr", "1e6", "--epochs", "2"], "learning rate too high"),
    (["distill", "--teacher", "wizard"], "unknown teacher 'wizard'"),
    (["distill", "--teacher", f"proxy:{B}/nothing.safetensors"], "does not exist"),
    (["distill", "--teacher", f"proxy:{B}/c_truncated.safetensors"], "truncated"),
    (["distill", "--teacher", f"proxy:{B}/c_rows_not_one.safetensors"], "rows must be probability vectors"),
    (["distill", "--teacher", f"cached:{B}/cache_short.safetensors"], "rows but the training set has"),
    (["distill", "--teacher", f"network:{B}/no-run"], "does not exist"),
    (["distill", "--teacher", "onehot", "--out", f"{B}/taken"], "already exists and is not empty"),
    (["train-teacher", "--resume", "--out", f"{B}/teacher"], "is a finished run"),
    (["train-teacher", "--resume", "--epochs", "9", "--out", f"{B}/unfinished"], "give only --out"),
    (["train-teacher", "--resume", "--out", f"{B}/nowhere"], "holds no config.yaml"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_the_cli_refuses_in_one_line_and_changes_nothing(world, kd_main, argv, needle):
    argv = [a.replace(B, str(world)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(world / "new-run")]
    if argv[0] == "distill" or "--resume" not in argv:
        argv += ["--epochs", "1"] if "--epochs" not in argv else []
    before = _snapshot(world)
    code, _, err = kd_main(*argv, "--quiet")
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    after = {k: v for k, v in _snapshot(world).items() if not k.startswith("new-run")}
    assert after == before  # nothing that existed changed
    new = world / "new-run"
    assert not (new / "summary.json").exists() and not (new / "model.safetensors").exists()
    if new.exists():  # a run that stopped on its way (the diverging one) leaves no weights; clear it
        for p in sorted(new.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        new.rmdir()


def test_a_directory_another_run_holds_is_refused(world, kd_main):
    out = world / "held"
    with run_lock(out):
        code, _, err = kd_main("train-teacher", "--epochs", "1", "--out", out, "--quiet")
    assert code == 2 and "in use by another run" in err and len(err.strip().splitlines()) == 1


def _blobs(n, k=3):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, k, (n,), generator=g))


@pytest.mark.parametrize("bad_label,needle", [(3, "label 3 at sample"), (-1, "label -1 at sample")])
def test_the_api_refuses_labels_outside_the_classes(bad_label, needle):
    train = _blobs(64)
    train.tensors[1][7] = bad_label
    with pytest.raises(KDError, match=needle):
        fit(MLP(4, 3), LSPPLoss(3), train, _blobs(16), TrainConfig(epochs=1, batch_size=32, device="cpu"), progress=False, log=None)


def test_the_api_refuses_a_model_whose_output_is_not_k():
    with pytest.raises(KDError, match="outputs 4 logits per sample but the source 'lspp' has K=3"):
        fit(MLP(4, 4), LSPPLoss(3), _blobs(64), _blobs(16), TrainConfig(epochs=1, batch_size=32, device="cpu"), progress=False, log=None)


def test_a_nan_input_through_the_api_stops_with_the_epoch(tmp_path):
    train = _blobs(512)
    train.tensors[0][100, 2] = float("nan")
    with pytest.raises(KDError, match="epoch 1.*NaN/Inf"):
        fit(MLP(4, 3), LSPPLoss(3), train, _blobs(16), TrainConfig(epochs=2, device="cpu"), run_dir=tmp_path,
            progress=False, log=None)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "c_matrix.safetensors").exists()
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"
