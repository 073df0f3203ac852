"""The README stays short and self-contained; benchmarks/README.md quotes only committed result files."""
import re

import pandas as pd
import pytest

from conftest import ROOT

README = ROOT / "README.md"
BENCH_README = ROOT / "benchmarks" / "README.md"
PAPER_TITLE = "Label Smoothing++: Enhanced Label Regularization for Training Neural Networks"


def _result_csvs() -> list[str]:
    """Every `benchmarks/results/NAME.csv` path benchmarks/README.md mentions (globs and placeholders excluded)."""
    return sorted(set(re.findall(r"benchmarks/results/[\w.+-]+\.csv", BENCH_README.read_text())))


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_links_nothing_outside_the_repository():
    text = README.read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_readme_cites_the_paper():
    text = " ".join(README.read_text().split())  # the title may wrap across lines
    text = text.replace("> ", "")
    assert PAPER_TITLE in text
    assert "Chhabra" in text and "BMVC" in text


def test_benchmarks_readme_mentions_only_committed_csvs():
    paths = _result_csvs()
    assert paths, "benchmarks/README.md names no result CSV"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("path", [p for p in _result_csvs()
                                  if p.split("/")[-1].startswith("cost_") and not p.endswith("_lspp.csv")])
def test_benchmarks_readme_cost_tables_are_the_committed_csvs(path):
    from benchmarks import large_k
    from benchmarks.cost import markdown

    df = pd.read_csv(ROOT / path)
    if path.split("/")[-1].startswith("cost_large-k"):  # with its LS++ table, FILE_lspp.csv, where there is one
        lspp = ROOT / path.replace(".csv", "_lspp.csv")
        table = large_k.markdown(df, pd.read_csv(lspp) if lspp.is_file() else None)
    else:
        table = markdown(df)
    assert table in BENCH_README.read_text()


def test_readme_layout_names_every_module_and_folder_of_kd():
    """The layout table's kd/ row names each module and package of kd/ (a new file, or a moved one, shows here)."""
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `kd/` |"))
    kd_dir = README.parent / "kd"
    names = {p.stem for p in kd_dir.glob("*.py") if not p.name.startswith("_")}
    names |= {p.name for p in kd_dir.iterdir() if p.is_dir() and (p / "__init__.py").is_file() and p.name != "app"}
    missing = sorted(n for n in names if f"`{n}`" not in row and f"`{n}/`" not in row and f"`{n}.py`" not in row)
    assert not missing, f"README layout: kd/ row does not name {missing}"
