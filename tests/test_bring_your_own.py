"""Networks proxykd did not train: a timm model trained in plain PyTorch, saved as timm's train.py and as
safetensors, used as an online teacher, a cache, a measured proxy and a starting point; class maps for a
teacher of other classes; planted pickles refused in every path that reads a user's file."""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT
from kd.checkpoints import load_into, read_checkpoint
from kd.classmap import imagenet_class_names, resolve_class_map
from kd.data import load_dataset
from kd.errors import KDError

MODEL = "test_resnet"  # a tiny timm network (0.37M parameters) that takes 8 x 8 one-channel digits


def _norm(images):
    """proxykd's digits normalisation (scale 16, mean 0.3052, std 0.3760), written out independently."""
    return (images.float() / 16 - 0.3052) / 0.3760


def _train_plain(num_classes=10, epochs=5, seed=0):
    """A timm model trained with a hand-written PyTorch loop (no proxykd code), and its optimizer."""
    import timm

    torch.manual_seed(seed)
    split = load_dataset("digits")
    x, y = _norm(split.train.images), split.train.labels % num_classes
    model = timm.create_model(MODEL, num_classes=num_classes, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), opt


def _timm_train_py_checkpoint(model, opt, path, epoch=5):
    """What timm's train.py (CheckpointSaver) writes: run arguments as an argparse.Namespace, optimizer state,
    the weights under 'state_dict', bookkeeping."""
    args = argparse.Namespace(model=MODEL, num_classes=model.num_classes, lr=0.05, momentum=0.9, sched="cosine",
                              epochs=epoch, aa=None, mixup=0.0, decay_milestones=[90, 180])
    torch.save({"epoch": epoch, "arch": MODEL, "optimizer": opt.state_dict(), "version": 2, "args": args,
                "state_dict": model.state_dict(), "metric": 71.5,
                "saver": {"checkpoint_files": [("checkpoint-4.pth.tar", 71.5)], "best_epoch": 4, "best_metric": 71.5,
                          "pending": (epoch, 71.5)}}, path)


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """The user's files: a 10-class teacher as timm's train.py and as safetensors, and a torchvision-reference
    style checkpoint of a 20-class network (to fine-tune on the 10 digits)."""
    d = tmp_path_factory.mktemp("byo")
    model, opt = _train_plain()
    _timm_train_py_checkpoint(model, opt, d / "model_best.pth.tar")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "teacher.safetensors"))
    other, opt20 = _train_plain(num_classes=20, epochs=1, seed=1)
    torch.save({"model": other.state_dict(), "optimizer": opt20.state_dict(),
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt20, 30).state_dict(), "epoch": 0,
                "args": argparse.Namespace(model=MODEL, lr=0.05, weights=None)}, d / "ckpt20.pth")
    return {"dir": d, "model": model, "other": other}


def _one_line_error(code, err, needle):
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_the_timm_checkpoint_holds_what_train_py_writes(byo):
    raw = torch.load(byo["dir"] / "model_best.pth.tar", weights_only=False)  # the test's own file: trusted here
    assert isinstance(raw["args"], argparse.Namespace) and "optimizer" in raw and "state_dict" in raw
    with pytest.raises(Exception):  # plain weights_only refuses it: the Namespace must be allowed explicitly
        torch.load(byo["dir"] / "model_best.pth.tar", weights_only=True)
    ckpt = read_checkpoint(byo["dir"] / "model_best.pth.tar")
    assert ckpt.key == "state_dict"
    for k, v in byo["model"].state_dict().items():
        assert torch.equal(ckpt.state[k], v)


def test_online_distillation_from_a_checkpoint_matches_the_network(byo, kd_main, tmp_path):
    from teachers import teacher_from_spec

    split = load_dataset("digits")
    for file in ("model_best.pth.tar", "teacher.safetensors"):
        spec = f"network:timm:{MODEL}@{byo['dir'] / file}"
        src = teacher_from_spec(spec, split.info, len(split.train))
        x = split.train.images[:32]
        want = byo["model"](_norm(x)).softmax(-1)
        torch.testing.assert_close(src.targets(split.train.labels[:32], inputs=_norm(x)), want, atol=1e-5, rtol=1e-4)
    out = tmp_path / "online"
    code, _, err = kd_main("distill", "--teacher", spec, "--epochs", 3, "--optimizer", "adamw", "--lr", 0.01,
                           "--warmup-epochs", 0, "--out", out, "--quiet", "--device", "cpu")
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["teacher"] == spec and s["source"] == "network" and s["dataset"] == "digits"
    assert s["test_acc"] > 0.3  # 10 classes: chance is 0.1


def test_cache_and_measured_proxy_from_files_equal_independent_computations(byo, kd_main, tmp_path):
    split = load_dataset("digits")
    with torch.no_grad():
        logits = byo["model"](_norm(split.train.images))
    cache = tmp_path / "cache.safetensors"
    code, _, err = kd_main("teacher", "cache", "--model", f"timm:{MODEL}", "--weights",
                           byo["dir"] / "model_best.pth.tar", "--dataset", "digits", "--out", cache, "--device", "cpu")
    assert code == 0, err
    torch.testing.assert_close(load_file(str(cache))["logits"], logits, atol=1e-4, rtol=1e-4)

    proxy = tmp_path / "proxy.safetensors"
    code, _, err = kd_main("proxy", "export", "--model", f"timm:{MODEL}", "--weights", byo["dir"] / "teacher.safetensors",
                           "--dataset", "digits", "--out", proxy, "--device", "cpu")
    assert code == 0, err
    p, y = logits.softmax(-1).double(), split.train.labels
    means = torch.stack([p[y == c].mean(0) for c in range(10)])
    means.fill_diagonal_(0)
    torch.testing.assert_close(load_file(str(proxy))["c_matrix"], (means / means.sum(1, keepdim=True)).float(),
                               atol=1e-5, rtol=1e-4)
    for spec, extra in ((f"cached:{cache}", ["--no-augment"]), (f"proxy:{proxy}", [])):
        out = tmp_path / spec.split(":")[0]
        code, _, err = kd_main("distill", "--teacher", spec, "--epochs", 1, "--out", out, "--quiet", "--device", "cpu",
                               *extra)
        assert code == 0, err
        assert json.loads((out / "summary.json").read_text())["dataset"] == "digits"  # taken from the file


def test_a_weights_file_in_place_of_a_run_gets_the_flags_it_needs(byo, kd_main, tmp_path):
    file = byo["dir"] / "teacher.safetensors"
    for argv in (("proxy", "export", file), ("teacher", "cache", file)):
        code, _, err = kd_main(*argv, "--out", tmp_path / "x.safetensors")
        _one_line_error(code, err, f"--model MODEL --weights {file} --dataset NAME")
    code, _, err = kd_main("distill", "--teacher", f"network:{file}", "--out", tmp_path / "s")
    _one_line_error(code, err, f"network:resnet18@{file}")


def test_fine_tuning_from_a_checkpoint_of_another_number_of_classes(byo, kd_main, tmp_path):
    import timm

    ckpt = byo["dir"] / "ckpt20.pth"
    out = tmp_path / "ft"
    argv = ["train-teacher", "--model", f"timm:{MODEL}", "--method", "onehot", "--init", ckpt, "--epochs", 1,
            "--out", out, "--quiet", "--device", "cpu"]
    code, _, err = kd_main(*argv)
    _one_line_error(code, err, "--reset-head")
    assert "trained on 20 classes, the data has 10" in err and not out.exists()

    code, _, err = kd_main(*argv, "--reset-head")
    assert code == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["init"] == str(ckpt) and cfg["reset_head"] is True
    assert cfg["init_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()

    fresh = timm.create_model(MODEL, num_classes=10, in_chans=1)
    head_before = fresh.fc.weight.detach().clone()
    kept = load_into(fresh, ckpt, reset_head=True)
    assert kept == ["fc.weight", "fc.bias"]
    for k, v in byo["other"].state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh.fc.weight, head_before) and fresh.fc.weight.shape == (10, byo["other"].fc.in_features)
    with pytest.raises(KDError, match="reset_head=True"):
        load_into(timm.create_model(MODEL, num_classes=10, in_chans=1), ckpt)


def test_checkpoint_layouts_are_unwrapped_and_strictness_names_the_first_key(byo, tmp_path):
    import timm

    state = byo["model"].state_dict()
    ddp = {"module." + k: v for k, v in state.items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    files = {"bare.pt": state, "ddp.pt": {"state_dict": ddp}, "tv.pt": {"model": state, "epoch": 3},
             "ema.pt": {"state_dict": state, "state_dict_ema": ema},
             "tv_ema.pt": {"model": state, "model_ema": {"n_averaged": torch.tensor(5), **ddp}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        ckpt = read_checkpoint(tmp_path / name)
        want = ema if name == "ema.pt" else state  # timm's rule: EMA weights first
        assert set(ckpt.state) == set(want) and all(torch.equal(ckpt.state[k], want[k]) for k in want), name
    assert read_checkpoint(tmp_path / "ema.pt", use_ema=False).key == "state_dict"

    first = next(iter(state))  # the stem convolution's weight
    bad = dict(state)
    bad.pop(first)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(KDError, match=f"missing key '{first}' \\(1 missing, 1 unexpected"):
        load_into(timm.create_model(MODEL, num_classes=10, in_chans=1), bad)
    with pytest.raises(KDError, match=f"'{first}' has shape"):  # 3 input channels against 1
        load_into(timm.create_model(MODEL, num_classes=10, in_chans=3), state)
    left = load_into(timm.create_model(MODEL, num_classes=10, in_chans=1), bad, strict=False)
    assert left == [first]
    torch.save({"optimizer": {}, "epoch": 1}, tmp_path / "no_weights.pt")
    with pytest.raises(KDError, match="holds no state dict"):
        read_checkpoint(tmp_path / "no_weights.pt")


class _Payload:
    """Unpickling this runs a shell command that creates a marker file: what a planted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_refused_and_never_run(byo, kd_main, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": byo["model"].state_dict(), "args": _Payload(marker)}, evil)
    calls = [
        ("train-teacher", "--model", f"timm:{MODEL}", "--init", evil, "--epochs", 1, "--out", tmp_path / "a"),
        ("distill", "--teacher", f"network:timm:{MODEL}@{evil}", "--epochs", 1, "--out", tmp_path / "b"),
        ("distill", "--teacher", "onehot", "--init", evil, "--student", f"timm:{MODEL}", "--epochs", 1,
         "--out", tmp_path / "c"),
        ("proxy", "export", "--model", f"timm:{MODEL}", "--weights", evil, "--dataset", "digits", "--out",
         tmp_path / "p.safetensors"),
        ("teacher", "cache", "--model", f"timm:{MODEL}", "--weights", evil, "--dataset", "digits", "--out",
         tmp_path / "c.safetensors"),
    ]
    for argv in calls:
        code, _, err = kd_main(*argv, "--device", "cpu")
        _one_line_error(code, err, "needs code to unpickle")
        assert "posix.system" in err or "os.system" in err
    import timm

    for fn in (lambda: read_checkpoint(evil), lambda: load_into(timm.create_model(MODEL, num_classes=10, in_chans=1), evil)):
        with pytest.raises(KDError, match="needs code to unpickle"):
            fn()
    assert not marker.exists()
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "p.safetensors", "c.safetensors"))


@pytest.fixture(scope="module")
def wide_teacher(byo):
    """A teacher with 12 outputs whose classes are the digits in another order plus two others: output
    perm[c] is digit c. Its safetensors file names its classes."""
    import timm

    perm = [5, 0, 11, 2, 7, 1, 3, 9, 4, 6]  # teacher output of digit 0, 1, ..., 9
    wide = timm.create_model(MODEL, num_classes=12, in_chans=1)
    state = {k: v.clone() for k, v in byo["model"].state_dict().items()}
    w, b = torch.randn(12, state["fc.weight"].shape[1]) * 0.01, torch.full((12,), -3.0)
    w[perm], b[perm] = state["fc.weight"], state["fc.bias"]
    state["fc.weight"], state["fc.bias"] = w, b
    wide.load_state_dict(state)
    names = ["x"] * 12
    for digit, out in enumerate(perm):
        names[out] = f"digit-{digit}"
    names[8], names[10] = "cat", "dog"
    path = byo["dir"] / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"class_names": json.dumps(names)})
    return {"path": path, "model": wide.eval(), "perm": perm, "names": names}


def test_a_class_map_restricts_a_larger_teachers_outputs(wide_teacher, kd_main, tmp_path):
    split = load_dataset("digits")
    perm = wide_teacher["perm"]
    by_index = tmp_path / "map.json"
    by_index.write_text(json.dumps(perm))
    by_name = tmp_path / "map.csv"
    by_name.write_text("class,teacher\n" + "".join(f"{d},digit-{d}\n" for d in range(10)))
    with torch.no_grad():
        want = wide_teacher["model"](_norm(split.train.images))[:, perm]
    weights = ["--model", f"timm:{MODEL}", "--weights", wide_teacher["path"], "--dataset", "digits", "--device", "cpu"]
    for i, cmap in enumerate((by_index, by_name)):
        cache = tmp_path / f"cache{i}.safetensors"
        code, _, err = kd_main("teacher", "cache", *weights, "--class-map", cmap, "--out", cache)
        assert code == 0, err
        torch.testing.assert_close(load_file(str(cache))["logits"], want, atol=1e-4, rtol=1e-4)
    proxy = tmp_path / "proxy.safetensors"
    code, _, err = kd_main("proxy", "export", *weights, "--class-map", by_name, "--out", proxy)
    assert code == 0, err
    p, y = want.softmax(-1).double(), split.train.labels  # the restricted logits, renormalised
    means = torch.stack([p[y == c].mean(0) for c in range(10)]).fill_diagonal_(0)
    torch.testing.assert_close(load_file(str(proxy))["c_matrix"], (means / means.sum(1, keepdim=True)).float(),
                               atol=1e-5, rtol=1e-4)
    spec = f"network:timm:{MODEL}@{wide_teacher['path']}"
    out = tmp_path / "online"
    code, _, err = kd_main("distill", "--teacher", spec, "--class-map", by_index, "--epochs", 1, "--out", out,
                           "--quiet", "--device", "cpu")
    assert code == 0, err

    code, _, err = kd_main("distill", "--teacher", spec, "--epochs", 1, "--out", tmp_path / "x", "--device", "cpu")
    _one_line_error(code, err, "--class-map")
    assert "12 outputs" in err
    bad = {"range.json": [*perm[:9], 12], "dup.json": [*perm[:9], perm[0]], "short.json": perm[:9],
           "unmapped.json": {str(d): perm[d] for d in range(9)}, "name.json": {**{str(d): perm[d] for d in range(9)},
                                                                             "9": "digit-42"}}
    needles = {"range.json": "out of range", "dup.json": "given to both", "short.json": "lists 9 entries",
               "unmapped.json": "leaves data set class '9' unmapped", "name.json": "no class named 'digit-42'"}
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        code, _, err = kd_main("teacher", "cache", *weights, "--class-map", tmp_path / name, "--out", tmp_path / "c.st")
        _one_line_error(code, err, needles[name])
    assert not (tmp_path / "c.st").exists()


def test_imagenet_class_map_needs_no_file():
    synsets = imagenet_class_names()
    assert len(synsets) == 1000 and synsets[0] == "n01440764"
    picked = [synsets[i] for i in (3, 1, 999)]
    assert resolve_class_map("imagenet", picked, 1000).tolist() == [3, 1, 999]
    with pytest.raises(KDError, match="not an ImageNet-1k id"):
        resolve_class_map("imagenet", ["cat", "dog"], 1000)
    with pytest.raises(KDError, match="1,000 outputs"):
        resolve_class_map("imagenet", picked, 10)


def test_pretrained_weights_offline_fail_in_one_line_naming_init(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "kd", "train-teacher", "--model", "timm:resnet18", "--pretrained",
                        "--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "timm/resnet18" in err[0] and "--init FILE" in err[0] and "local cache" in err[0]
    assert not (tmp_path / "run").exists()


def test_torchvision_pretrained_weights_come_from_the_cache_and_fail_in_one_line(tmp_path, monkeypatch, kd_main):
    import torchvision

    from kd.models import build_model, pretrained_checkpoint

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(url, dst, *a, **k):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(KDError, match=r"resnet18-f37072fd\.pth.*not in the local cache.*--init FILE"):
        pretrained_checkpoint("torchvision:resnet18")
    # a file already in TORCH_HOME's cache is read (weights_only) without any download
    ref = torchvision.models.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model, record = build_model("torchvision:resnet18", 10, 3, 32, pretrained=True, reset_head=True)
    assert record == {"pretrained": True} and model.fc.out_features == 10
    assert torch.equal(model.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    code, _, err = kd_main("train-teacher", "--model", "lenet", "--pretrained", "--out", tmp_path / "r")
    _one_line_error(code, err, "proxykd's own network")
