"""The Python API as a user with their own arrays drives it: float64 from NumPy, a model built before any
seed, a C handed straight to a proxy, settings that act or are refused, never ignored."""
import random

import numpy as np
import pytest
import torch

from kd.config import TrainConfig
from kd.data import make_loader
from kd.errors import KDError
from kd.models import MLP
from kd.seeding import seeded
from students import distill, train_teacher
from teachers import make_source
from teachers.lspp import LSPPLoss
from teachers.network import NetworkTeacher
from teachers.proxy import ProxyTeacher

QUIET = dict(progress=False, log=None)


def _arrays(n=600, k=5, d=12, seed=0):
    """float64 inputs and int64 labels as scikit-learn hands them over, classes separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d))
    x[np.arange(n), y] += 3.0
    return x, y


def cfg(**kw):
    return TrainConfig(**{"device": "cpu", "epochs": 2, "lr": 0.05, "batch_size": 64, **kw})


def test_float64_arrays_train_as_they_come():
    x, y = _arrays()
    assert x.dtype == np.float64
    r = train_teacher(MLP(12, 5), (x[:500], y[:500]), (x[500:], y[500:]), cfg(method="onehot"), **QUIET)
    assert r.summary["test_acc"] > 0.5
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x[:500]), torch.from_numpy(y[:500]))
    r = train_teacher(MLP(12, 5), ds, (x[500:], y[500:]), cfg(method="onehot"), **QUIET)
    assert r.summary["test_acc"] > 0.5


def test_a_c_matrix_handed_straight_to_a_proxy_trains_for_many_steps():
    x, y = _arrays()
    teacher = train_teacher(MLP(12, 5), (x, y), (x, y), cfg(), **QUIET)
    c = teacher.source.c_matrix()
    assert not c.requires_grad
    live = LSPPLoss(5)  # a C still attached to its graph: the proxy keeps a detached copy
    proxy = ProxyTeacher(live.log_c_matrix().exp())
    assert not proxy.table.requires_grad
    for teacher_source in (ProxyTeacher(c), proxy, make_source("proxy", 5, c_matrix=c, alpha=0.2)):
        r = distill(MLP(12, 5), teacher_source, (x, y), (x, y), cfg(), **QUIET)  # 16 steps: a second backward
        assert r.summary["source"] == "proxy"
    with pytest.raises(KDError, match="probability vectors"):
        ProxyTeacher(torch.ones(5, 5))


def test_in_memory_teachers_by_name():
    x, y = _arrays()
    net = MLP(12, 5)
    src = make_source("network", 5, model=net, temperature=4.0)
    assert isinstance(src, NetworkTeacher) and src.temperature == 4.0
    assert not net.training and not any(p.requires_grad for p in net.parameters())  # frozen in place, as documented
    logits = torch.randn(len(y), 5)
    cached = make_source("cached", 5, logits=logits, num_train=len(y))
    torch.testing.assert_close(cached.targets(None, index=torch.tensor([3, 1])), logits[[3, 1]].softmax(-1))
    r = distill(MLP(12, 5), cached, (x, y), (x, y), cfg(), **QUIET)
    assert r.summary["source"] == "cached"
    with pytest.raises(KDError, match="c_matrix= is an in-memory artifact of 'proxy'"):
        make_source("ls", 5, c_matrix=torch.eye(5))
    with pytest.raises(KDError, match="logits= holds 3 rows"):
        make_source("cached", 5, logits=torch.zeros(3, 5), num_train=4)
    c4 = torch.full((4, 4), 1 / 3).fill_diagonal_(0)  # a valid C, of another number of classes
    with pytest.raises(KDError, match="c_matrix= is 4 x 4 but the source was asked for K=5"):
        make_source("proxy", 5, c_matrix=c4)  # else accepted, and label 4 fails in the first batch


@pytest.mark.parametrize("bad, needle", [(None, "got NoneType"), ("ls", "make_source('ls', K)"),
                                         (MLP(12, 5), "make_source('network', K, model=net)"),
                                         (torch.eye(5), "make_source('proxy', K, c_matrix=C)")])
def test_distill_refuses_what_is_not_a_source(bad, needle):
    x, y = _arrays(n=100)
    with pytest.raises(KDError, match=needle.replace("(", "\\(").replace(")", "\\)")):
        distill(MLP(12, 5), bad, (x, y), (x, y), cfg())


@pytest.mark.parametrize("field, value, needle", [
    ("teacher", "proxy:run", "second argument"), ("dataset", "fashion-mnist", "load_dataset"),
    ("model", "lenet", "pass the model itself"), ("augment", True, "augment in your Dataset"),
    ("preprocess", "paper", "prepare the data"), ("pretrained", True, "build_model"),
    ("num_workers", 2, "drop num_workers"), ("val_seed", 3, "give val_fraction too"),
    ("reset_head", True, "give init=FILE")])
def test_every_config_field_acts_or_is_refused(field, value, needle):
    x, y = _arrays(n=100)
    with pytest.raises(KDError, match=needle):
        train_teacher(MLP(12, 5), (x, y), (x, y), cfg(**{field: value}))


def test_val_fraction_acts_and_names_the_keys():
    x, y = _arrays()
    r = train_teacher(MLP(12, 5), (x, y), None, cfg(val_fraction=0.2, method="onehot"), **QUIET)
    assert r.summary["evaluated_on"] == "val" and "val_acc" in r.summary and "test_acc" not in r.summary
    with pytest.raises(KDError, match="test_data=None"):
        train_teacher(MLP(12, 5), (x, y), (x, y), cfg(val_fraction=0.2))
    with pytest.raises(KDError, match="val_fraction"):
        train_teacher(MLP(12, 5), (x, y), None, cfg())


def test_source_options_are_config_keywords_and_refused_where_they_do_not_apply():
    c = TrainConfig(method="lspp", alpha=0.2)
    assert c.options == {"alpha": 0.2} and c.alpha == 0.2
    x, y = _arrays(n=200)
    r = train_teacher(MLP(12, 5), (x, y), (x, y), cfg(alpha=0.3), **QUIET)
    assert r.source.alpha == 0.3
    with pytest.raises(KDError, match="has no option --temperature"):
        train_teacher(MLP(12, 5), (x, y), (x, y), cfg(method="ls", temperature=2.0))
    with pytest.raises(KDError, match="no field 'epoch'"):
        train_teacher(MLP(12, 5), (x, y), (x, y), cfg(epoch=3))
    with pytest.raises(KDError, match="method='ls'"):
        distill(MLP(12, 5), make_source("onehot", 5), (x, y), (x, y), cfg(method="ls"))


def test_seeding_covers_the_model_and_leaves_the_callers_rng_alone():
    x, y = _arrays(n=200)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    runs = [train_teacher(lambda: MLP(12, 5), (x, y), (x, y), cfg(seed=3, method="onehot"), **QUIET) for _ in range(2)]
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)  # the same seed gives the same run, initial weights included
    with seeded(3):
        m1 = MLP(12, 5)
    with seeded(3):
        m2 = MLP(12, 5)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert torch.equal(torch.get_rng_state(), after[0])


def test_k_comes_from_the_model_when_a_split_lacks_the_last_class():
    x, y = _arrays(n=400, k=6)
    keep = y < 5  # the training split has no class 5; the test split does
    r = train_teacher(MLP(12, 6), (x[keep], y[keep]), (x, y), cfg(method="onehot"), **QUIET)
    assert r.source.num_classes == 6
    with pytest.raises(KDError, match="build it with 6 outputs \\(or pass num_classes=K\\)"):
        train_teacher(MLP(12, 4), (x, y), (x, y), cfg())


def test_in_memory_map_style_data_gets_no_worker_processes():
    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = torch.from_numpy(x).float(), torch.from_numpy(y)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    x, y = _arrays(n=200)
    loader = make_loader(Pairs(x, y), None, TrainConfig(), train=True, device="cpu")
    assert loader.num_workers == 0
    assert make_loader(Pairs(x, y), None, TrainConfig(num_workers=2), train=True, device="cpu").num_workers == 2
    r = train_teacher(MLP(12, 5), Pairs(x, y), Pairs(x, y), cfg(method="onehot"), **QUIET)
    assert r.summary["test_acc"] > 0.3


def test_float_labels_are_refused_unless_soft_by_design():
    x, y = _arrays(n=200)
    with pytest.raises(KDError, match="labels are float64"):
        train_teacher(MLP(12, 5), (x, y.astype(float)), (x, y), cfg())
    soft = np.eye(5)[y] * 0.8 + 0.04
    r = train_teacher(MLP(12, 5), (x, soft), (x, y), cfg(method="ls"), **QUIET)
    assert r.summary["train_acc"] > 0.2
    with pytest.raises(KDError, match="evaluation needs class indices"):
        train_teacher(MLP(12, 5), (x, y), (x, soft), cfg())
    with pytest.raises(KDError, match="sum to 1"):
        train_teacher(MLP(12, 5), (x, soft * 2), (x, y), cfg())


def test_summaries_say_what_trained_and_how_it_did_on_its_own_data():
    x, y = _arrays()
    r = train_teacher(MLP(12, 5), (x, y), (x, y), cfg(), **QUIET)
    s = r.summary
    assert s["method"] == s["source"] == "lspp" and s["model"] == "MLP" and s["kind"] == "teacher"
    assert 0.5 < s["train_acc"] <= 1 and {"c_entropy_share", "c_row_max"} <= set(s)
    r = distill(MLP(12, 5), make_source("ls", 5), (x, y), (x, y), cfg(), **QUIET)
    assert r.summary["source"] == r.summary["teacher"] == "ls" and r.summary["model"] == "MLP"
    assert len(r.history) == 2 and all("train_acc" in row for row in r.history)


def test_init_weights_act_in_the_api(tmp_path):
    from safetensors.torch import save_file

    x, y = _arrays(n=200)
    src = MLP(12, 7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    net = MLP(12, 5)
    r = train_teacher(net, (x, y), (x, y), cfg(init=str(tmp_path / "w.safetensors"), reset_head=True, lr=1e-9,
                                               optimizer="adamw", method="onehot"), **QUIET)
    first = r.model.net[1].weight  # the first layer starts from the file's (and barely moves at lr 1e-9)
    torch.testing.assert_close(first, src.net[1].weight, atol=1e-6, rtol=0)
    with pytest.raises(KDError, match="reset_head=True"):
        train_teacher(MLP(12, 5), (x, y), (x, y), cfg(init=str(tmp_path / "w.safetensors")))
