"""Print the markdown table of one or more cost CSVs written by `kd bench --out` (for the README)."""
from __future__ import annotations

import sys

import pandas as pd

from benchmarks.cost import markdown


def main(paths: list[str]) -> int:
    for path in paths:
        print(f"`{path}`\n")
        print(markdown(pd.read_csv(path)))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
