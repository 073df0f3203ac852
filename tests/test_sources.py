import torch
import torch.nn.functional as F

import pytest
import yaml

from kd.app.jobs import train_teacher_job
from kd.config import TrainConfig
from kd.errors import KDError
from kd.losses import soft_cross_entropy
from kd.sources import TableSource, smoothing_table
from teachers import SOURCES, label_methods, label_source, make_source
from teachers.onehot import OneHot
from teachers.smoothing import LabelSmoothing


def test_onehot_targets_and_loss():
    src = OneHot(5)
    y = torch.tensor([4, 0, 2])
    torch.testing.assert_close(src.targets(y), F.one_hot(y, 5).float())
    z = torch.randn(3, 5)
    torch.testing.assert_close(src.loss_terms(z, y)["ce"], F.cross_entropy(z, y))  # torch's own CE, not ours


def test_ls_spreads_alpha_uniformly_over_all_classes_like_torch():
    k, alpha = 6, 0.2
    src = LabelSmoothing(k, alpha)
    y = torch.tensor([1, 5])
    t = src.targets(y)
    assert torch.allclose(t[0, 1], torch.tensor(1 - alpha + alpha / k))
    assert torch.allclose(t[0, 0], torch.tensor(alpha / k))
    z = torch.randn(2, k)
    torch.testing.assert_close(soft_cross_entropy(z, t), F.cross_entropy(z, y, label_smoothing=alpha))
    torch.testing.assert_close(src.loss_terms(z, y)["ce"], soft_cross_entropy(z, t))


def test_soft_labels_give_m_times_table():
    table = smoothing_table(4, 0.1)
    src = TableSource(table)
    m = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    expected = 0.7 * table[0] + 0.3 * table[1]
    torch.testing.assert_close(src.targets(m)[0], expected)
    z = torch.randn(2, 4)
    torch.testing.assert_close(LabelSmoothing(4, 0.1).loss_terms(z, m)["ce"], soft_cross_entropy(z, m @ table))


def test_label_source_factory_names():
    assert isinstance(label_source("onehot", 3), OneHot)
    assert label_source("ls", 3, 0.3).alpha == 0.3
    assert label_source("lspp", 3).alpha == 0.1


@pytest.mark.parametrize("name", label_methods())
def test_each_source_reports_the_options_it_trains_with(name):
    """What a run's files record comes from the built source: every declared option at its default, and a given
    value as given (a source that stored an option under another name would fail here)."""
    cls = SOURCES[name]
    assert make_source(name, 10).resolved_options() == {o.name: o.default for o in cls.options}
    for o in cls.options:
        value = o.default * 0.5 + (0.5 if o.low is None or o.low < 0.5 else o.low)  # inside every declared range
        value = min(value, 0.9) if o.high is not None else value
        assert make_source(name, 10, **{o.name: value}).resolved_options()[o.name] == pytest.approx(value)


@pytest.mark.parametrize("name", ["mbls", "zipf-ls", "fl-3", "flsd-53", "tfkd-reg", "onehot"])
def test_a_source_without_a_spec_argument_refuses_one_naming_its_flags(name):
    with pytest.raises(KDError, match=f"teacher '{name}' takes no argument") as e:
        make_source(name, 10, arg="0.3")
    for o in SOURCES[name].options:
        assert o.flag in str(e.value)


def test_the_run_files_hold_the_resolved_options(tmp_path):
    """`kd train-teacher --method zipf-ls --power 2`: config.yaml and summary.json hold the power given and the
    alpha the source took by default, so the run can be repeated from its own files."""
    cfg = TrainConfig(method="zipf-ls", epochs=1, batch_size=256, power=2.0)
    train_teacher_job(cfg, tmp_path / "run", progress=False, log=None)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    default = SOURCES["zipf-ls"].option("alpha").default
    assert (written["power"], written["alpha"]) == (2.0, default)
    assert (summary["power"], summary["alpha"], summary["method"], summary["source"]) == (2.0, default, "zipf-ls",
                                                                                          "zipf-ls")
