import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def bench_pages() -> str:
    """The text of every benchmarks page (benchmarks/README.md is their index): a table quoted on any of them counts."""
    return "\n".join(p.read_text() for p in sorted((ROOT / "benchmarks").glob("*.md")))


@pytest.fixture
def kd_main(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from kd.app.cli import main

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


class Killed(Exception):
    """Stands for a kill between epochs in the resume tests."""


def kill_after(n):
    """A ``log`` callback that raises :class:`Killed` once epoch ``n`` is logged (its checkpoint is on disk)."""
    def log(line):
        if line.startswith(f"epoch {n:3d}"):
            raise Killed
    return log
