"""The README stays short and self-contained; the benchmarks pages quote only committed result files and
link only to what exists."""
import re

import pandas as pd
import pytest

from conftest import ROOT, bench_pages

README = ROOT / "README.md"
BENCH_README = ROOT / "benchmarks" / "README.md"
BENCH_PAGES = sorted((ROOT / "benchmarks").glob("*.md"))  # the index and the pages it links, one per question
PAPER_TITLE = "Label Smoothing++: Enhanced Label Regularization for Training Neural Networks"


def _result_csvs() -> list[str]:
    """Every `benchmarks/results/NAME.csv` path the benchmarks pages mention (globs and placeholders excluded)."""
    return sorted(set(re.findall(r"benchmarks/results/[\w.+-]+\.csv", bench_pages())))


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    """The anchors a page offers: its headings' slugs (outside code blocks) and explicit `<a id=...>`."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found = {slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)">', text))


def _links(path):
    """(target file, anchor or '') of every relative markdown link on a page."""
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        yield (path.parent / file if file else path), anchor


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


def test_benchmarks_pages_mention_only_committed_csvs():
    paths = _result_csvs()
    assert paths, "the benchmarks pages name no result CSV"
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
    assert table in bench_pages()


@pytest.mark.parametrize("page", [README, *BENCH_PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_reach_a_file_and_a_heading_that_exist(page):
    """A moved section or a renamed heading breaks no link: each target file exists, each anchor is a heading of it."""
    broken = [f"{target.relative_to(ROOT)}#{anchor}" for target, anchor in _links(page)
              if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target))]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_benchmarks_index_links_every_page():
    """benchmarks/README.md is the index: every other page under benchmarks/ is reachable from it."""
    linked = {target.resolve() for target, _ in _links(BENCH_README)}
    orphans = [p.name for p in BENCH_PAGES if p != BENCH_README and p.resolve() not in linked]
    assert not orphans, f"benchmarks/README.md does not link {orphans}"


def test_readme_layout_names_every_module_and_folder_of_kd():
    """The layout table's kd/ row names each module and package of kd/ (a new file, or a moved one, shows here)."""
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `kd/` |"))
    kd_dir = README.parent / "kd"
    names = {p.stem for p in kd_dir.glob("*.py") if not p.name.startswith("_")}
    names |= {p.name for p in kd_dir.iterdir() if p.is_dir() and (p / "__init__.py").is_file() and p.name != "app"}
    missing = sorted(n for n in names if f"`{n}`" not in row and f"`{n}/`" not in row and f"`{n}.py`" not in row)
    assert not missing, f"README layout: kd/ row does not name {missing}"
