"""The folders are the layers: kd core < teachers < students < benchmarks < kd/app. Read with ast, nothing run."""
import ast
from pathlib import Path

from conftest import ROOT

ALLOWED = {  # layer -> the layers it may import
    "core": {"core"},
    "teachers": {"core", "teachers"},
    "students": {"core", "teachers", "students"},  # the training side builds label-only sources by name
    "benchmarks": {"core", "teachers", "students", "benchmarks"},
    "app": {"core", "teachers", "students", "benchmarks", "app"},
}


def layer_of_module(name: str) -> str | None:
    top = name.split(".")[0]
    if top == "kd":
        return "app" if name == "kd.app" or name.startswith("kd.app.") else "core"
    return top if top in ("teachers", "students", "benchmarks") else None


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] == "kd":  # kd/__main__.py is `python -m kd`: the command line, so the app layer
        return "app" if len(rel) > 1 and rel[1] in ("app", "__main__.py") else "core"
    return rel[0]


def upward_imports(source: str, layer: str) -> list[str]:
    """Every import (top level or inside a function) that reaches a layer ``layer`` may not use."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            target = layer_of_module(n)
            if target is not None and target not in ALLOWED[layer]:
                bad.append(n)
    return bad


def test_the_checker_catches_an_upward_import():
    assert upward_imports("def f():\n    from kd.app.jobs import distill_job\n", "core") == ["kd.app.jobs", "kd.app.jobs.distill_job"]
    assert upward_imports("import students\n", "teachers") == ["students"]
    assert upward_imports("from kd import app\n", "benchmarks") == ["kd.app"]
    assert upward_imports("from kd.engine import fit\nimport teachers.lspp\n", "benchmarks") == []


def test_no_module_imports_a_layer_above_its_own():
    files = [p for d in ("kd", "teachers", "students", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    bad = {str(p.relative_to(ROOT)): upward_imports(p.read_text(), layer_of_file(p)) for p in files}
    assert {f: b for f, b in bad.items() if b} == {}
