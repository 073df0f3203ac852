"""The paper's claims against the study's committed CSVs: holds / does not hold / within noise.

Each claim compares two rows of one results CSV (a metric over seeds). The verdict is Welch's
two-sided t-test of the two seed samples at the 5% level: a significant difference in the claimed
direction *holds*, one the other way *does not hold*, anything else is *within noise*. With three
seeds a side the test only resolves differences of a few standard errors: it says what this study
can tell apart, not that smaller effects are absent.

    python -m benchmarks.claims            # prints the markdown table benchmarks/study.md carries
    python -m benchmarks.claims --questions   # the project's own questions (C's learning rate)
    python -m benchmarks.claims --since REV   # the verdicts that differ from those of git revision REV's CSVs
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Claim:
    text: str           # the claim, as the paper makes it
    paper: str          # the paper's own numbers
    table: str          # results CSV stem, {regime} filled in
    better: str         # the row claimed higher (lower for ECE/NLL)
    worse: str
    metric: str = "test_acc"
    regimes: tuple[str, ...] = ("matched", "paper")


ACC = "test_acc"
CLAIMS = [
    Claim("LS++ beats 1-hot (Table 3, LeNet)", "83.79 vs 82.23", "fmnist_methods_{regime}", "LS++", "1-hot"),
    Claim("LS++ beats LS (Table 3)", "83.79 vs 82.55", "fmnist_methods_{regime}", "LS++", "LS"),
    Claim("LS++ beats TF-KD reg (Table 3)", "83.79 vs 82.40", "fmnist_methods_{regime}", "LS++", "TF-KD reg"),
    Claim("LS++ beats OLS (Table 3)", "83.79 vs 82.97", "fmnist_methods_{regime}", "LS++", "OLS"),
    Claim("LS++ beats Zipf's LS (Tables 1-2; not run on FMNIST)", "e.g. 65.07 vs 59.25 (TinyImageNet)",
          "fmnist_methods_{regime}", "LS++", "Zipf-LS"),
    Claim("LS++ beats MbLS (Table 2; not run on FMNIST)", "e.g. 69.01 vs 65.15 (TinyImageNet)",
          "fmnist_methods_{regime}", "LS++", "MbLS"),
    Claim("LS++ beats FL-3 (Tables 1-2; not run on FMNIST)", "e.g. 81.05 vs 77.25 (CIFAR-100)",
          "fmnist_methods_{regime}", "LS++", "FL-3"),
    Claim("LS++ beats FLSD-53 (Tables 1-2; not run on FMNIST)", "e.g. 81.05 vs 76.78 (CIFAR-100)",
          "fmnist_methods_{regime}", "LS++", "FLSD-53"),
    Claim("LS++ mitigates overconfidence, read as calibration: lower ECE-15 than 1-hot (abstract)", "no ECE reported",
          "fmnist_methods_{regime}", "LS++", "1-hot", "test_ece"),
    Claim("LS++ mitigates overconfidence after temperature scaling: lower ECE-15 than 1-hot, each scaled by its "
          "own T", "no ECE reported", "fmnist_methods_{regime}", "LS++", "1-hot", "test_ece_ts"),
    Claim("LS++ mitigates overconfidence after temperature scaling: lower NLL than 1-hot, each scaled by its own T",
          "no NLL reported", "fmnist_methods_{regime}", "LS++", "1-hot", "test_nll_ts"),
    Claim("LS++ beats 1-hot on MNIST (not in the paper)", "-", "mnist_methods_{regime}", "LS++", "1-hot",
          regimes=("matched",)),
    Claim("LS++ has a lower ECE-15 than 1-hot on MNIST", "-", "mnist_methods_{regime}", "LS++", "1-hot", "test_ece",
          regimes=("matched",)),
    Claim("LS++ has a lower ECE-15 than 1-hot on MNIST after temperature scaling", "-", "mnist_methods_{regime}",
          "LS++", "1-hot", "test_ece_ts", regimes=("matched",)),
    Claim("SCE-ours beats CE for learning C (Table 5)", "81.19 vs 80.45 (CIFAR-10)", "fmnist_ablation",
          "LS++", "LS++ with CE", regimes=("matched",)),
    Claim("SCE-ours beats the original SCE (Table 5)", "81.19 vs 79.92 (CIFAR-10)", "fmnist_ablation",
          "LS++", "LS++ with SCE-original", regimes=("matched",)),
    Claim("CE collapses C's rows: lower row entropy than SCE-ours (Fig. 6)", "one-hot rows (CIFAR-10)",
          "fmnist_ablation", "LS++", "LS++ with CE", "c_row_entropy_bits", regimes=("matched",)),
    Claim("The original SCE collapses C's rows too (Fig. 6)", "one-hot rows (CIFAR-10)",
          "fmnist_ablation", "LS++", "LS++ with SCE-original", "c_row_entropy_bits", regimes=("matched",)),
    *[Claim(f"LS++ adds to {aug} (Table 7, FMNIST ResNet18)", paper, "fmnist_augment_{regime}",
            f"{aug} LS++", f"{aug} 1-hot")
      for aug, paper in (("Cutout", "88.92 vs 88.36"), ("Mixup", "88.59 vs 88.48"), ("CutMix", "88.27 vs 88.11"),
                         ("RandAug", "92.85 vs 92.40"))],
    Claim("Input and label regularisation together beat LS++ alone: RandAug + LS++ (Table 7, Sec. 5.4)",
          "92.85 vs 87.47", "fmnist_augment_{regime}", "RandAug LS++", "LS++"),
    Claim("RandAugment lifts 1-hot far above the other augmentations (Table 7: 92.40 vs 88.11-88.48)",
          "92.40 vs 88.48 (Mixup)", "fmnist_augment_{regime}", "RandAug 1-hot", "Mixup 1-hot"),
    Claim("Distillation beats training alone: the LS++ net as teacher (Table 6)", "e.g. 79.90 vs 78.67",
          "fmnist_distill_resnet8", "student <- LS++ net", "student alone", regimes=("matched",)),
    Claim("The LS++ net is a better teacher than the 1-hot net (Table 6)", "e.g. 79.90 vs 78.67",
          "fmnist_distill_resnet8", "student <- LS++ net", "student <- 1-hot net", regimes=("matched",)),
    Claim("The LS++ net is a better teacher than the LS net (Table 6)", "e.g. 79.90 vs 79.40",
          "fmnist_distill_resnet8", "student <- LS++ net", "student <- LS net", regimes=("matched",)),
    Claim("PT-LS++ beats training alone (Sec. 5.3)", "e.g. 79.75 vs 75.87 (Table 1 R18)",
          "fmnist_distill_resnet8", "student <- PT-LS++", "student alone", regimes=("matched",)),
    Claim("PT-LS++ trails the LS++ network teacher (Sec. 5.3)", "e.g. 79.75 vs 79.90",
          "fmnist_distill_resnet8", "student <- LS++ net", "student <- PT-LS++", regimes=("matched",)),
    Claim("A proxy student trains faster than online KD: about half the time (Sec. 5.3)", "about 2x (R101 -> SN)",
          "fmnist_distill_resnet8", "student <- PT-LS++", "student <- LS++ net", "train_seconds",
          regimes=("matched",)),
    Claim("A PT-LS++ student is better calibrated than one trained alone, after temperature scaling (ECE-15)",
          "-", "fmnist_distill_resnet8", "student <- PT-LS++", "student alone", "test_ece_ts", regimes=("matched",)),
    # Table 4 on text: the fortunes categories, fastText (the paper: BERT on 20 Newsgroups, AG News, Yahoo Answers)
    Claim("LS++ beats 1-hot on text (Table 4)", "85.55 vs 85.02 (20NG), 94.67 vs 94.39 (AG News)", "fortunes_text",
          "LS++", "1-hot", regimes=("text",)),
    *[Claim(f"LS++ beats {other} on text (not in Table 4)", "-", "fortunes_text", "LS++", other, regimes=("text",))
      for other in ("LS", "OLS", "Zipf-LS")],
    Claim("LS++ has a lower ECE-15 than 1-hot on text after temperature scaling", "-", "fortunes_text", "LS++",
          "1-hot", "test_ece_ts", regimes=("text",)),
    Claim("Distillation beats training alone on text: the LS++ net as teacher (Table 6's claim)", "-",
          "fortunes_text", "student <- LS++ net", "student alone", regimes=("text",)),
    Claim("PT-LS++ beats training alone on text (Sec. 5.3's claim)", "-", "fortunes_text", "student <- PT-LS++",
          "student alone", regimes=("text",)),
    Claim("PT-LS++ trails the LS++ network teacher on text (Sec. 5.3's claim)", "-", "fortunes_text",
          "student <- LS++ net", "student <- PT-LS++", regimes=("text",)),
    # no time claim on text: its runs shared the 2-core CPU with other sweeps (two identical runs, the 1-hot teacher and
    # the student alone, took 46 and 89 s), so its train_seconds do not compare
]
#: Questions of this project's own (not the paper's), judged the same way: does C learn better with a rate of its own?
QUESTIONS = [
    *[Claim(f"C at {f}x the network's learning rate gives a more accurate network than at 1x", "-", f"{d}_c_learning_rate",
            f"LS++ C lr x{f}", "LS++ C lr x1" if d == "fmnist" else "LS++", regimes=("",))
      for d in ("fmnist", "digits") for f in (10, 100, 1000)],
    # row entropy: the row claimed higher comes first (C at one rate, nearer uniform)
    *[Claim(f"C at {f}x the network's learning rate moves further from uniform: lower row entropy", "-",
            f"{d}_c_learning_rate", "LS++ C lr x1" if d == "fmnist" else "LS++", f"LS++ C lr x{f}",
            "c_row_entropy_bits", regimes=("",))
      for d in ("fmnist", "digits") for f in (10, 1000)],
    *[Claim("AdamW for network and C gives a more accurate network than SGD at one rate", "-", f"{d}_c_learning_rate",
            "LS++ AdamW", "LS++ C lr x1" if d == "fmnist" else "LS++", regimes=("",)) for d in ("fmnist", "digits")],
    *[Claim("AdamW for network and C moves C further from uniform than SGD at one rate", "-",
            f"{d}_c_learning_rate", "LS++ C lr x1" if d == "fmnist" else "LS++", "LS++ AdamW", "c_row_entropy_bits",
            regimes=("",)) for d in ("fmnist", "digits")],
]
ALPHA_TEST = 0.05
LOWER_IS_BETTER = {"test_ece", "test_nll", "test_aece", "test_ece_ts", "test_nll_ts", "test_aece_ts"}
UNITS = {ACC: ("{:.2f}", 100), "test_ece": ("{:.2f}", 100), "test_ece_ts": ("{:.2f}", 100),
         "c_row_entropy_bits": ("{:.2f}", 1),
         "train_seconds": ("{:.0f} s", 1)}


def verdict(a: pd.Series, b: pd.Series, lower_is_better: bool = False) -> tuple[float, float, float, str]:
    """(difference in the claimed direction, its standard error, Welch's two-sided p, verdict) for seed
    samples a (claimed better) and b."""
    from scipy.stats import ttest_ind

    diff = (b.mean() - a.mean()) if lower_is_better else (a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return diff, float("nan"), float("nan"), "one seed: not judged"
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    p = float(ttest_ind(a, b, equal_var=False).pvalue) if se > 0 else (0.0 if diff else 1.0)
    if p < ALPHA_TEST:
        return diff, se, p, "holds" if diff > 0 else "does not hold"
    return diff, se, p, "within noise"


def _fmt(metric: str, values: pd.Series) -> str:
    f, scale = UNITS.get(metric, ("{:.3f}", 1))
    sd = values.std(ddof=1) * scale if len(values) > 1 else float("nan")
    return f"{f.format(values.mean() * scale)} ± {f.format(sd).replace(' s', '')}"


def claims_frame(results: Path = RESULTS, claims: list[Claim] = CLAIMS) -> pd.DataFrame:
    """One row per (claim, regime) whose CSV and rows exist."""
    rows = []
    for c in claims:
        for regime in c.regimes:
            path = results / (c.table.format(regime=regime) + ".csv")
            if not path.is_file():
                continue
            df = pd.read_csv(path)
            if c.metric not in df.columns:
                continue  # a column this table does not have yet (calibration: the sweep has not been rerun)
            a, b = df.loc[df["name"] == c.better, c.metric].dropna(), df.loc[df["name"] == c.worse, c.metric].dropna()
            if a.empty or b.empty:
                continue
            lower = c.metric in LOWER_IS_BETTER or c.metric == "train_seconds"
            diff, se, p, v = verdict(a, b, lower)
            f, scale = UNITS.get(c.metric, ("{:.3f}", 1))
            rows.append({"claim": c.text, "paper": c.paper, "regime": regime, "metric": c.metric,
                         "ours": f"{c.better}: {_fmt(c.metric, a)}; {c.worse}: {_fmt(c.metric, b)}",
                         "difference": f"{f.format(diff * scale)} (SE {f.format(se * scale)}; p {p:.3f})"
                         .replace(" s (", " (").replace(" s;", ";"),
                         "seeds": f"{len(a)}, {len(b)}", "verdict": v, "csv": path.name})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    lines = ["| claim of the paper | paper | regime | ours (mean ± std over seeds) | difference (claimed direction) | "
             "holds here? |", "|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.claim} | {r.paper} | {r.regime} | {r.ours} | {r.difference} | **{r.verdict}** |")
    return "\n".join(lines)


def questions_markdown(df: pd.DataFrame) -> str:
    """The project's own questions (:data:`QUESTIONS`): no paper column, the data set from the CSV's name."""
    lines = ["| question | data set | ours (mean ± std over seeds) | difference (asked direction) | verdict |",
             "|---|---|---|---|---|"]
    for r in df.itertuples():
        data = "Fashion-MNIST" if r.csv.startswith("fmnist") else "digits"
        lines.append(f"| {r.claim} | {data} | {r.ours} | {r.difference} | **{r.verdict}** |")
    return "\n".join(lines)


def changed_since(rev: str, claims: list[Claim] = CLAIMS) -> str:
    """A markdown table of the claims whose verdict differs from the one the committed CSVs of git revision
    ``rev`` gave (claims new since then are listed as new)."""
    import io
    import subprocess
    import tarfile
    import tempfile

    root = RESULTS.parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "benchmarks/results"], cwd=root, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        before = claims_frame(Path(tmp) / "benchmarks" / "results", claims)
    now = claims_frame(RESULTS, claims)
    old = {(r.claim, r.regime, r.csv): r for r in before.itertuples()}
    lines = [f"| claim | regime | table | verdict at {rev} | verdict now | difference then | difference now |",
             "|---|---|---|---|---|---|---|"]
    for r in now.itertuples():
        o = old.get((r.claim, r.regime, r.csv))
        if o is None:
            lines.append(f"| {r.claim} | {r.regime} | {r.csv} | (new) | **{r.verdict}** | | {r.difference} |")
        elif o.verdict != r.verdict:
            lines.append(f"| {r.claim} | {r.regime} | {r.csv} | {o.verdict} | **{r.verdict}** | {o.difference} | "
                         f"{r.difference} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--questions", action="store_true", help="this project's own questions (C's learning rate)")
    p.add_argument("--since", metavar="REV", help="list the verdicts that differ from git revision REV's")
    args = p.parse_args(argv)
    if args.since:
        print(changed_since(args.since, QUESTIONS if args.questions else CLAIMS))
    elif args.questions:
        print(questions_markdown(claims_frame(Path(args.results), QUESTIONS)))
    else:
        print(markdown(claims_frame(Path(args.results))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
