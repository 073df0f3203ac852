"""The README's Python example runs as written, and `kd demo` produces its table."""
import re

from conftest import ROOT


def test_readme_python_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    code = blocks[0].replace("TrainConfig(", "TrainConfig(device='cpu', ")
    exec(compile(code, "README.md", "exec"), {})
    student_acc, teacher_acc = map(float, capsys.readouterr().out.strip().splitlines()[-1].split())
    assert student_acc > 0.6 and teacher_acc > 0.6  # 5 classes: chance is 0.2


def test_demo_prints_teacher_and_four_students(capsys):
    from kd.app.demo import run_demo

    rows = run_demo(teacher_epochs=1, student_epochs=2, device="cpu")
    out = capsys.readouterr().out
    assert [r["run"].split(" <- ")[-1] for r in rows[1:]] == ["onehot", "ls", "LS++ network (online KD)", "PT-LS++ (C-matrix)"]
    assert all(0 <= r["acc"] <= 1 for r in rows)
    assert "| run | test acc | NLL | ECE | s/epoch |" in out and "closest class" in out
    assert "| network |" in out and "network / proxy step time" in out
