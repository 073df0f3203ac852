import torch
import torch.nn.functional as F

from kd.losses import soft_cross_entropy
from kd.sources import TableSource, smoothing_table
from teachers import label_source
from teachers.onehot import OneHot
from teachers.smoothing import LabelSmoothing


def test_onehot_targets_and_loss():
    src = OneHot(5)
    y = torch.tensor([4, 0, 2])
    torch.testing.assert_close(src.targets(y), F.one_hot(y, 5).float())
    z = torch.randn(3, 5)
    torch.testing.assert_close(src.loss_terms(z, y)["ce"], soft_cross_entropy(z, F.one_hot(y, 5).float()))


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
