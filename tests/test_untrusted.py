"""Files proxykd reads back are never unpickled: a planted pickle in any of them is refused with
exit 2 and one line on stderr, and its payload never runs.

Planted in: a checkpoint of an unfinished run (`--resume`), a C-matrix (`proxy:PATH`,
`proxy:RUN_DIR`), a logit cache (`cached:FILE`), a teacher's weights (`network:RUN_DIR`) and a
`--config` YAML file (a python/object tag).
"""
import io
import json
import pathlib
import pickle
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, Killed, kill_after
from kd import runs
from kd.app.jobs import train_teacher_job
from kd.config import TrainConfig


class Planted:
    """Unpickling this touches ``marker``: the stand-in for an attacker's os.system."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def pickle_bytes(marker) -> bytes:
    return pickle.dumps({"model": Planted(marker)})


def torch_save_bytes(marker) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": Planted(marker)}, buf)
    return buf.getvalue()


PAYLOADS = {"pickle": pickle_bytes, "torch.save": torch_save_bytes}


def test_the_payload_is_real(tmp_path):
    """Guard against a vacuous suite: unpickling each planted file does touch the marker."""
    for i, make in enumerate(PAYLOADS.values()):
        marker = tmp_path / f"fired{i}"
        data = make(marker)
        if data[:2] == b"PK":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch LS++ teacher run on digits (config.yaml, model, C-matrix, summary.json)."""
    out = tmp_path_factory.mktemp("teacher") / "lspp"
    cfg = TrainConfig(method="lspp", epochs=1, batch_size=64, device="cpu")
    train_teacher_job(cfg, out, progress=False, log=None)
    assert (out / runs.SUMMARY).is_file() and (out / runs.C_MATRIX).is_file()
    return out


def refused(result, marker, *files):
    """Exit 2, exactly one line on stderr, the payload never ran, and the planted files are still there."""
    code, _, err = result
    assert code == 2, err
    assert err.strip() and "\n" not in err.strip(), err
    assert "Traceback" not in err
    assert not marker.exists()
    for f in files:
        assert f.is_file()  # nothing planted was deleted either
    return err


def unfinished_copy(finished_run, dest):
    """A run directory with a valid config.yaml and no summary: `--resume` will read its checkpoint."""
    dest.mkdir(parents=True)
    shutil.copy(finished_run / runs.CONFIG, dest / runs.CONFIG)
    return dest


# --- (a) the checkpoint of an unfinished run ---------------------------------------------------

@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("name", sorted({"checkpoint.pt", runs.CHECKPOINT}))
def test_planted_checkpoint_is_refused_on_resume(kd_main, finished_run, tmp_path, name, payload):
    marker = tmp_path / "PWNED"
    run = unfinished_copy(finished_run, tmp_path / "run")
    (run / name).write_bytes(PAYLOADS[payload](marker))
    err = refused(kd_main("train-teacher", "--resume", "--out", run, "--quiet"), marker, run / name)
    assert "not a readable checkpoint" in err and "start the run anew" in err


def test_checkpoint_is_safetensors_and_json_not_pickle(tmp_path):
    """A checkpoint written by a run is a safetensors file whose metadata is a JSON document."""
    out = tmp_path / "run"
    cfg = TrainConfig(method="ols", epochs=2, batch_size=64, device="cpu")

    with pytest.raises(Killed):
        train_teacher_job(cfg, out, progress=False, log=kill_after(1))
    path = out / runs.CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    doc = json.loads(meta["checkpoint"])
    assert doc["epoch"] == 1 and doc["format"] == runs.CHECKPOINT_FORMAT
    tensors = load_file(str(path))
    assert tensors["rng.cpu"].dtype == torch.uint8
    state = runs.load_checkpoint(path)
    assert set(state["source"]) == {"table"} and torch.allclose(state["source"]["table"].sum(1), torch.ones(10))
    assert all(re.fullmatch(r"(model|source|rng)\..+|optimizer\.state\.\d+\.\w+", k) for k in tensors)
    assert any(k.startswith("optimizer.state.") for k in tensors)


def _killed_run(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(method="lspp", epochs=2, batch_size=64, device="cpu")

    with pytest.raises(Killed):
        train_teacher_job(cfg, out, progress=False, log=kill_after(1))
    return out


def _rewrite(path, tensors, doc):
    save_file(tensors, str(path), metadata={"format": runs.CHECKPOINT_FORMAT, "checkpoint": json.dumps(doc)})


@pytest.mark.parametrize("damage", ["missing epoch", "missing tensor", "dangling key", "not json", "no format",
                                    "truncated", "wrong shape"])
def test_a_wrong_checkpoint_is_one_line_and_nothing_is_deleted(kd_main, tmp_path, damage):
    out = _killed_run(tmp_path)
    path = out / runs.CHECKPOINT
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["checkpoint"])
    if damage == "missing epoch":
        del doc["epoch"]
        _rewrite(path, tensors, doc)
    elif damage == "missing tensor":
        del tensors["rng.cpu"]
        _rewrite(path, tensors, doc)
    elif damage == "dangling key":
        doc["model"]["fc.weight"] = "model.nowhere"
        _rewrite(path, tensors, doc)
    elif damage == "not json":
        save_file(tensors, str(path), metadata={"format": runs.CHECKPOINT_FORMAT, "checkpoint": "{not json"})
    elif damage == "no format":
        save_file(tensors, str(path))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "wrong shape":
        key = next(iter(doc["model"].values()))
        tensors[key] = torch.zeros(3, 3, 3)
        _rewrite(path, tensors, doc)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = kd_main("train-teacher", "--resume", "--out", out, "--quiet")
    assert code == 2 and err.strip() and "\n" not in err.strip(), err
    assert "start the run anew" in err
    if damage != "wrong shape":
        assert "not a readable checkpoint" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- (b) proxy:PATH and proxy:RUN_DIR, (c) cached:FILE, (d) network:RUN_DIR -------------------

def _distill(kd_main, spec, out):
    return kd_main("distill", "--teacher", spec, "--student", "mlp", "--epochs", 1, "--out", out,
                   "--device", "cpu", "--quiet")


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_planted_c_matrix_file(kd_main, tmp_path, payload):
    marker = tmp_path / "PWNED"
    planted = tmp_path / "c_matrix.safetensors"
    planted.write_bytes(PAYLOADS[payload](marker))
    refused(_distill(kd_main, f"proxy:{planted}", tmp_path / "out"), marker, planted)


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_planted_c_matrix_in_a_run_dir(kd_main, finished_run, tmp_path, payload):
    marker = tmp_path / "PWNED"
    run = tmp_path / "teacher"
    shutil.copytree(finished_run, run)
    (run / runs.C_MATRIX).write_bytes(PAYLOADS[payload](marker))
    refused(_distill(kd_main, f"proxy:{run}", tmp_path / "out"), marker, run / runs.C_MATRIX)


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_planted_logit_cache(kd_main, tmp_path, payload):
    marker = tmp_path / "PWNED"
    planted = tmp_path / "cache.safetensors"
    planted.write_bytes(PAYLOADS[payload](marker))
    refused(_distill(kd_main, f"cached:{planted}", tmp_path / "out"), marker, planted)


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_planted_teacher_weights(kd_main, finished_run, tmp_path, payload):
    marker = tmp_path / "PWNED"
    run = tmp_path / "teacher"
    shutil.copytree(finished_run, run)
    assert (run / runs.SUMMARY).is_file()
    (run / runs.WEIGHTS).write_bytes(PAYLOADS[payload](marker))
    refused(_distill(kd_main, f"network:{run}", tmp_path / "out"), marker, run / runs.WEIGHTS)


# --- (e) --config FILE.yaml --------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["train-teacher", "distill"])
@pytest.mark.parametrize("tag", ["!!python/object/apply:pathlib.Path.touch", "!!python/object/apply:os.system"])
def test_planted_yaml_config(kd_main, tmp_path, verb, tag):
    marker = tmp_path / "PWNED"
    arg = f"[{json.dumps(str(marker))}]" if "touch" in tag else f"[{json.dumps('touch ' + str(marker))}]"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"epochs: 1\nseed: {tag} {arg}\n")
    refused(kd_main(verb, "--config", cfg, "--out", tmp_path / "out", "--device", "cpu", "--quiet"), marker, cfg)
    assert not (tmp_path / "out").exists()


def test_planted_yaml_config_whole_document(kd_main, tmp_path):
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"!!python/object/apply:os.system [{json.dumps('touch ' + str(marker))}]\n")
    refused(kd_main("train-teacher", "--config", cfg, "--out", tmp_path / "out", "--quiet"), marker, cfg)


# --- nothing in the package unpickles -----------------------------------------------------------

def test_no_unsafe_load_in_the_package():
    hits = []
    for top in ("kd", "teachers", "students", "benchmarks"):
        for f in (ROOT / top).rglob("*.py"):
            text = f.read_text()
            if re.search(r"weights_only\s*=\s*False|\bimport (c?pickle|dill|cloudpickle|joblib|shelve)\b|"
                         r"\b(c?pickle|dill|cloudpickle|joblib)\.loads?\(|\bshelve\.open|yaml\.(unsafe_)?load\(|"
                         r"yaml\.full_load|numpy\.load\(.*allow_pickle\s*=\s*True", text):
                hits.append(str(f.relative_to(ROOT)))
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    hits.append(f"{f.relative_to(ROOT)}: {m.group(0)}")
    assert hits == []


def test_optimizer_state_round_trips_bit_exact(tmp_path):
    """SGD momentum buffers and AdamW moments and (tensor) steps come back as they were saved."""

    class Source(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.randn(3, 3))

        def checkpoint_state(self):
            return {"c": self.c.detach()}

        def load_checkpoint_state(self, state):
            with torch.no_grad():
                self.c.copy_(state["c"])

    for make in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                 lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99), amsgrad=True)):
        torch.manual_seed(0)
        model, source = torch.nn.Linear(4, 3), Source()
        opt = make(list(model.parameters()) + list(source.parameters()))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for _ in range(3):
            (model(torch.randn(5, 4)) @ source.c).pow(2).mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        gen = torch.Generator().manual_seed(7)
        path = tmp_path / runs.CHECKPOINT
        runs.save_checkpoint(path, 3, [{"epoch": 3, "test_acc": 0.1 + 0.2}], 1.5, model, source, opt, sched, gen)
        saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
        saved_rng, saved_gen = torch.get_rng_state(), gen.get_state()

        torch.manual_seed(123)
        model2, source2 = torch.nn.Linear(4, 3), Source()
        opt2 = make(list(model2.parameters()) + list(source2.parameters()))
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
        gen2 = torch.Generator()
        epoch, history, seconds = runs.restore_checkpoint(path, model2, source2, opt2, sched2, gen2)
        assert (epoch, history, seconds) == (3, [{"epoch": 3, "test_acc": 0.1 + 0.2}], 1.5)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
        assert torch.equal(source.c, source2.c)
        got = opt2.state_dict()
        assert got["param_groups"] == saved_opt["param_groups"]
        assert got["state"].keys() == saved_opt["state"].keys()
        for i, entry in saved_opt["state"].items():
            assert entry.keys() == got["state"][i].keys()
            for name, v in entry.items():
                w = got["state"][i][name]
                assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w
        assert sched2.state_dict() == saved_sched
        assert torch.equal(torch.get_rng_state(), saved_rng) and torch.equal(gen2.get_state(), saved_gen)
        runs.remove_checkpoint(path)
        assert not path.exists()
