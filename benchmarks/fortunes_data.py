"""A ``text:`` data set from Debian's fortunes: one quotation a sample, its file name the class.

The ``fortunes`` package installs files of quotations separated by lines holding only ``%``, one file per
category, in /usr/share/games/fortunes (the ``.dat`` index and ``.u8`` link beside each file are not read).
Offensive sections are left out: the ``off/`` folder (the ``fortunes-off`` package) is never entered, and no
file that resolves into it is read. Each quotation is stripped of surrounding blank space; a quotation found in
two categories is dropped (its label would be ambiguous), and categories with fewer than ``--min-quotes``
quotations are dropped, which the output says. The rest is split into train and test, stratified and seeded:

    python -m benchmarks.fortunes_data --out data/fortunes   # then: kd train-teacher --dataset text:data/fortunes
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kd.errors import KDError

FORTUNES = Path("/usr/share/games/fortunes")
OFFENSIVE = "off"          # the fortunes-off package's folder
SKIP_SUFFIXES = (".dat", ".u8")


@dataclass
class Fortunes:
    """Quotations by category, and what was left out on the way (for the command's report)."""

    quotes: dict[str, list[str]] = field(default_factory=dict)
    dropped_small: dict[str, int] = field(default_factory=dict)   # category -> its number of quotations
    ambiguous: int = 0                                             # quotations found in several categories


def category_files(source: Path) -> list[Path]:
    """The category files of a fortunes folder: regular top-level files, no index, link or offensive file."""
    if not source.is_dir():
        raise KDError(f"{source} is not a folder of fortune files; install Debian's fortunes package "
                      f"(apt-get install fortunes) or give --source DIR")
    off = (source / OFFENSIVE).resolve()
    files = []
    for f in sorted(source.iterdir()):
        if f.name.startswith(".") or f.suffix in SKIP_SUFFIXES or not f.is_file():
            continue
        if f.resolve().parent == off or off in f.resolve().parents:
            continue
        files.append(f)
    if not files:
        raise KDError(f"{source} holds no fortune files")
    return files


def read_quotes(path: Path) -> list[str]:
    """The quotations of one fortune file: the text between lines holding only ``%``, blank-stripped, empty ones
    dropped. UTF-8, or Latin-1 for the odd older file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    quotes, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            quotes.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    quotes.append("\n".join(current).strip())
    return [q for q in quotes if q]


def collect(source: Path, categories: list[str] | None, min_quotes: int) -> Fortunes:
    """Every category's distinct quotations; ambiguous quotations and small categories dropped."""
    files = category_files(source)
    if categories:
        names = {f.name for f in files}
        missing = [c for c in categories if c not in names]
        if missing:
            raise KDError(f"no fortune file '{missing[0]}' in {source} (offensive sections are never read); "
                          f"choose from {', '.join(sorted(names))}")
        files = [f for f in files if f.name in categories]
    seen: dict[str, set[str]] = defaultdict(set)
    per_file = {}
    for f in files:
        per_file[f.name] = list(dict.fromkeys(read_quotes(f)))  # distinct, in file order
        for q in per_file[f.name]:
            seen[q].add(f.name)
    out = Fortunes()
    out.ambiguous = sum(len(c) > 1 for c in seen.values())
    for name, quotes in per_file.items():
        kept = [q for q in quotes if len(seen[q]) == 1]
        if len(kept) < min_quotes:
            out.dropped_small[name] = len(kept)
        else:
            out.quotes[name] = kept
    if len(out.quotes) < 2:
        raise KDError(f"{len(out.quotes)} categories have at least {min_quotes} quotations; lower --min-quotes or "
                      f"choose other --categories")
    return out


def split_quotes(fortunes: Fortunes, test_fraction: float, seed: int, max_per_category: int | None):
    """(train rows, test rows) of (text, label), stratified by category and seeded; ``max_per_category``: a seeded
    sample of each category first."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for name, quotes in fortunes.quotes.items():
        if max_per_category is not None and len(quotes) > max_per_category:
            quotes = [quotes[i] for i in sorted(rng.choice(len(quotes), max_per_category, replace=False))]
        texts += quotes
        labels += [name] * len(quotes)
    idx = np.arange(len(texts))
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    rows = lambda part: [(texts[i], labels[i]) for i in sorted(part)]
    return rows(tr), rows(te)


def write_fortunes(out: Path, source: Path = FORTUNES, *, categories: list[str] | None = None, min_quotes: int = 50,
                   test_fraction: float = 0.2, seed: int = 0, max_per_category: int | None = None,
                   log=print) -> Path:
    """Write OUT/train.csv and OUT/test.csv (columns text, label); an existing file is never overwritten."""
    import pandas as pd

    if not 0.0 < test_fraction < 1.0:
        raise KDError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
    if min_quotes < 2 or (max_per_category is not None and max_per_category < 2):
        raise KDError("--min-quotes and --max-per-category must be at least 2 (a category needs a train and a "
                      "test quotation)")
    targets = [out / "train.csv", out / "test.csv"]
    existing = [t for t in targets if t.exists()]
    if existing:
        raise KDError(f"{existing[0]} already exists; choose a new --out (nothing was written)")
    fortunes = collect(source, categories, min_quotes)
    train, test = split_quotes(fortunes, test_fraction, seed, max_per_category)
    out.mkdir(parents=True, exist_ok=True)
    for target, rows in zip(targets, (train, test)):
        pd.DataFrame(rows, columns=["text", "label"]).to_csv(target, index=False)
    if log is not None:
        if fortunes.dropped_small:
            log(f"dropped {len(fortunes.dropped_small)} categories with fewer than {min_quotes} quotations: "
                + ", ".join(f"{k} ({n})" for k, n in sorted(fortunes.dropped_small.items())))
        if fortunes.ambiguous:
            log(f"dropped {fortunes.ambiguous} quotations found in more than one category")
        log(f"kept {len(fortunes.quotes)} categories: {len(train)} training and {len(test)} test quotations")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="new folder for train.csv and test.csv (a text:PATH data set)")
    p.add_argument("--source", default=str(FORTUNES), help=f"folder of fortune files (default {FORTUNES})")
    p.add_argument("--categories", default=None, help="comma-separated file names to use (default: all)")
    p.add_argument("--min-quotes", type=int, default=50, help="drop categories with fewer quotations (default 50)")
    p.add_argument("--max-per-category", type=int, default=None, metavar="N",
                   help="a seeded sample of at most N quotations per category (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of each category held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    try:
        out = write_fortunes(Path(args.out), Path(args.source), categories=categories, min_quotes=args.min_quotes,
                             test_fraction=args.test_fraction, seed=args.seed, max_per_category=args.max_per_category)
    except KDError as e:
        print(f"fortunes_data: error: {e}", file=sys.stderr)
        return 2
    print(f"fortunes -> {out} (kd train-teacher --dataset text:{out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
