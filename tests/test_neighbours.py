import torch

from benchmarks.neighbours import top_c_neighbours, top_confusions


def test_top_confusions_count_wrong_predictions_per_true_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 2, 2, 1, 0, 0, 1, 1, 0])
    assert top_confusions(pred, labels, 3) == [[2, 1], [0, 2], [1, 0]]


def test_top_c_neighbours_skip_the_diagonal():
    c = torch.tensor([[0.0, 0.7, 0.3], [0.5, 0.0, 0.5], [0.1, 0.9, 0.0]])
    assert top_c_neighbours(c) == [[1, 2], [0, 2], [1, 0]]
