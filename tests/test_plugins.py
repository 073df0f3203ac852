"""A source is one file: a package outside proxykd registers one through the `proxykd.sources` entry point."""
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd

from conftest import ROOT

TOY = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    from kd.sources import Option, SourceContext, TableSource


    class Toy(TableSource):
        """Targets: a share ``keep`` on the label, the rest spread uniformly; its loss term has its own name."""

        name = "toy"
        summary = "a test source from outside proxykd"
        label_only = True
        options = (Option("keep", "mass kept on the label", 0.5, low=0.0, high=1.0),)

        @classmethod
        def from_spec(cls, arg: str, ctx: SourceContext) -> "Toy":
            k, keep = ctx.num_classes, cls.option("keep").check(cls.value(ctx, "keep"), cls.name)
            src = cls(keep * torch.eye(k) + (1 - keep) / k)
            src.keep = keep
            return src

        def loss_terms(self, logits, labels, *, inputs=None, index=None):
            return {"toy_ce": F.cross_entropy(logits.float(), self.targets(labels))}
''')


def _plugin_path(tmp_path):
    site = tmp_path / "site"
    (site / "toy_sources").mkdir(parents=True)
    (site / "toy_sources" / "__init__.py").write_text(TOY)
    dist = site / "toy_sources-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-sources\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[proxykd.sources]\ntoy = toy_sources:Toy\n")
    return site


def _kd(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "kd", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_an_installed_source_trains_a_teacher_and_a_student_without_touching_proxykd(tmp_path):
    site = _plugin_path(tmp_path)
    r = _kd(site, "distill", "--help")
    assert r.returncode == 0 and "toy" in r.stdout

    for verb, flag, out in (("distill", "--teacher", tmp_path / "student"),
                            ("train-teacher", "--method", tmp_path / "teacher")):
        r = _kd(site, verb, flag, "toy", "--epochs", 3, "--out", out, "--device", "cpu", "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        m = pd.read_csv(out / "metrics.csv")
        assert m["loss_toy_ce"].iloc[-1] < m["loss_toy_ce"].iloc[0]  # the plug-in's own term was trained on
        assert json.loads((out / "summary.json").read_text())["epochs"] == 3

    r = _kd(site, "bench", "--preset", "digits", "--steps", 1, "--repeats", 1, "--warmup", 0, "--sources", "onehot,toy")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| toy |" in r.stdout


def test_without_the_plugin_the_name_is_refused_in_one_line(tmp_path):
    r = _kd(tmp_path, "distill", "--teacher", "toy", "--epochs", 1, "--out", tmp_path / "s", "--quiet")
    assert r.returncode == 2
    assert "unknown teacher 'toy'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_plugin_source_takes_an_option_of_its_own_from_flags_and_yaml(tmp_path):
    site = _plugin_path(tmp_path)
    r = _kd(site, "train-teacher", "--help")
    assert r.returncode == 0 and "--keep" in r.stdout and "toy: mass kept on the label (default 0.5; in [0, 1])" in r.stdout

    out = tmp_path / "flag"
    r = _kd(site, "train-teacher", "--method", "toy", "--keep", 0.8, "--epochs", 1, "--out", out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["keep"] == 0.8  # written back as a plain key

    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: toy\nkeep: 0.9\nepochs: 1\ndevice: cpu\n")
    r = _kd(site, "train-teacher", "--config", cfg, "--out", tmp_path / "yaml", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "yaml" / "config.yaml").read_text())["keep"] == 0.9

    for args, message in ((["--method", "toy", "--keep", 1.5], "--keep must lie in [0, 1] for 'toy', got 1.5"),
                          (["--method", "onehot", "--keep", 0.5], "source 'onehot' has no option --keep")):
        r = _kd(site, "train-teacher", *args, "--epochs", 1, "--out", tmp_path / "bad", "--quiet")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()
