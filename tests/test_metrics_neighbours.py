import torch

from kd.metrics import c_neighbours, top_confusions


def test_top_confusions_count_wrong_predictions_per_true_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 2, 2, 1, 0, 0, 1, 1, 0])
    assert top_confusions(pred, labels, 3) == [[2, 1], [0, 2], [1, 0]]


def test_c_neighbours_skip_the_diagonal():
    c = torch.tensor([[0.0, 0.7, 0.3], [0.5, 0.0, 0.5], [0.1, 0.9, 0.0]])
    assert c_neighbours(c) == [[1, 2], [0, 2], [1, 0]]


def test_neighbours_refuses_to_overwrite_an_existing_out_file(tmp_path, capsys):
    from benchmarks.neighbours import main

    out = tmp_path / "table.md"
    out.write_text("kept")
    assert main(["no/such/lspp", "no/such/onehot", "--out", str(out)]) == 2
    assert out.read_text() == "kept"
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err
