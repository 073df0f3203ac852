import torch

from kd.metrics import c_beside_network, c_neighbours


def _logits_predicting(pred, k, runner_up=None):
    """Logits whose argmax is ``pred``; the second largest is ``runner_up`` (default: the next class)."""
    z = torch.zeros(len(pred), k)
    for n, p in enumerate(pred):
        z[n, p] = 5.0
        z[n, (p + 1) % k if runner_up is None else runner_up[n]] = 4.0
    return z


def test_the_network_side_counts_errors_made_twice_then_fills_by_mean_softmax():
    """Class 0: taken for 2 three times and for 1 once: 2 is its nearest (errors), 1 (one error) does not count
    as a confusion, so the second place goes by mean softmax, which 3 leads. Class 1: no errors: both places by
    mean softmax. Checked against sums written out by hand."""
    k = 4
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    pred = [2, 2, 2, 1, 0, 1, 1]
    runner = [3, 3, 3, 3, 3, 0, 0]
    logits = _logits_predicting(pred, k, runner)
    c = torch.full((k, k), 1 / 3).fill_diagonal_(0)
    c[0] = torch.tensor([0.0, 0.1, 0.6, 0.3])  # C's strongest for class 0: 2, then 3
    rows = c_beside_network(c, logits, labels, 2)
    p = logits.softmax(1)
    mean0 = p[labels == 0].mean(0)
    assert mean0[3] > mean0[1]  # the hand check: 3 leads 1 on mean softmax
    assert [j for j, _, _ in rows[0]["net"]] == [2, 3] and rows[0]["net"][0][1] == 3
    assert rows[0]["shared"] == 2 and rows[0]["first"]
    mean1 = p[labels == 1].mean(0)
    order1 = sorted((j for j in range(k) if j != 1), key=lambda j: (-float(mean1[j]), j))
    assert [j for j, _, _ in rows[1]["net"]] == order1[:2] == [0, 2]
    assert rows[2]["net"][0][2] == 0.0  # a class without samples: mean softmax 0, ties to the lower index
    assert [j for j, _, _ in rows[2]["net"]] == [0, 1]


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
