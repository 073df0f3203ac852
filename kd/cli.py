"""The `kd` command line: a thin layer over the Python API. Bad input: one line, exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from kd.errors import KDError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exits with 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


S = argparse.SUPPRESS


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Training flags shared by every verb that trains; each mirrors a key of TrainConfig / YAML."""
    g = p.add_argument_group("training (each flag mirrors a key of --config FILE.yaml)")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file of keys mirroring these flags; flags win")
    g.add_argument("--model", default=S, help="registered name (lenet, resnet18, ...), timm:NAME or torchvision:NAME; default: the data set's")
    g.add_argument("--dataset", default=S, help="digits (default), fashion-mnist, cifar10, cifar100, svhn, tinyimagenet, imagenet100, animals10n")
    g.add_argument("--data-root", default=S, help="where the data set lies (default: $KD_DATA_ROOT or ./data)")
    g.add_argument("--download", action="store_true", default=S, help="allow torchvision to download the data set")
    g.add_argument("--epochs", type=int, default=S, help="default 30")
    g.add_argument("--batch-size", type=int, default=S, help="default 128")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate, default 0.1")
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum (Nesterov), default 0.9")
    g.add_argument("--weight-decay", type=float, default=S, help="default 5e-4")
    g.add_argument("--no-c-weight-decay", dest="c_weight_decay", action="store_false", default=S,
                   help="exclude LS++'s C logits from weight decay")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=S)
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], default=S, help="after warm-up; default cosine")
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up, default 1")
    g.add_argument("--alpha", type=float, default=S, help="LS / LS++ mixing weight in (0, 1), default 0.1")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S, help="turn off batch augmentation")
    g.add_argument("--seed", type=int, default=S, help="default 0")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=S)
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=S, help="mixed precision (accelerate)")
    g.add_argument("--channels-last", action="store_true", default=S)
    g.add_argument("--num-workers", type=int, default=S, help="loader workers for folder data sets")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> "TrainConfig":
    from kd.config import TrainConfig, load_yaml_config

    cfg = TrainConfig()
    if getattr(args, "config", None):
        cfg = cfg.updated(load_yaml_config(args.config), where=args.config)
    given = {k: v for k, v in vars(args).items()
             if k in TrainConfig.__dataclass_fields__ and k not in skip}
    return cfg.updated(given, where="flags").validate()


def _cmd_train_teacher(args) -> int:
    from kd.jobs import train_teacher_job

    cfg = config_from_args(args)
    log = None if args.quiet else print
    result = train_teacher_job(cfg, args.out, progress=not args.quiet, log=log)
    s = result.summary
    print(f"{cfg.method} teacher -> {args.out}: acc {s['test_acc']:.4f}  nll {s['test_nll']:.4f}  "
          f"ece {s['test_ece']:.4f}  ({s['train_seconds']:.1f}s)")
    return 0


def _cmd_distill(args) -> int:
    from kd.jobs import distill_job

    cfg = config_from_args(args)
    log = None if args.quiet else print
    result = distill_job(cfg, args.out, progress=not args.quiet, log=log)
    s = result.summary
    print(f"student {s['model']} from {cfg.teacher} -> {args.out}: acc {s['test_acc']:.4f}  "
          f"nll {s['test_nll']:.4f}  ece {s['test_ece']:.4f}  ({s['seconds_per_epoch']:.2f}s/epoch)")
    return 0


def _cmd_proxy_export(args) -> int:
    from kd.jobs import export_proxy_job

    if args.alpha is not None and not 0 < args.alpha < 1:
        raise KDError(f"--alpha must lie in (0, 1), got {args.alpha}")
    out = export_proxy_job(args.run_dir, args.out, args.source, args.alpha, args.data_root, args.device)
    print(f"proxy teacher ({args.source}) -> {out}")
    return 0


def _cmd_teacher_cache(args) -> int:
    from kd.jobs import cache_job

    out = cache_job(args.run_dir, args.dataset, args.out, args.data_root, args.device)
    print(f"teacher outputs -> {out}")
    return 0


def _cmd_demo(args) -> int:
    from kd.demo import run_demo

    run_demo(out=args.out, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd", description="proxykd: train Label Smoothing++ teachers and distill students from networks or C-matrices.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train-teacher", help="train a network with 1-hot, LS or LS++ targets",
                       description="Train a teacher network. With --method lspp the run also holds its learned C-matrix.")
    p.add_argument("--method", choices=["onehot", "ls", "lspp"], default=S, help="default lspp")
    p.add_argument("--out", required=True, help="new run directory (must not exist or be empty)")
    add_train_flags(p)
    p.set_defaults(func=_cmd_train_teacher)

    from teachers import SPEC_HELP

    p = sub.add_parser("distill", help="train a student from a teacher SPEC",
                       description="Train a student from a teacher source. SPEC: " + SPEC_HELP + ". "
                       "Cached rows describe un-augmented inputs: combine cached: with --no-augment "
                       "(a warning is printed when augmentation is on).")
    p.add_argument("--teacher", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--student", dest="model", default=S, help="student model name (default: the data set's)")
    p.add_argument("--out", required=True, help="new run directory (must not exist or be empty)")
    p.add_argument("--temperature", type=float, default=S,
                   help="network teacher: use Hinton's KD loss at temperature T (default: CE on the teacher's probabilities)")
    p.add_argument("--hard-weight", type=float, default=S, help="Hinton KD: weight w of the hard-label CE, (1-w) on the soft term")
    add_train_flags(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("proxy", help="proxy teachers (C-matrices)")
    psub = p.add_subparsers(dest="proxy_command", required=True, parser_class=_Parser)
    e = psub.add_parser("export", help="write a C-matrix proxy from any trained teacher run",
                        description="A proxy teacher from any trained network: the class-conditional mean of its "
                        "softmax over the training set, diagonal removed, rows renormalised (measured); an LS++ run "
                        "also offers the C it learned (learned).")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True, help="new .safetensors file")
    e.add_argument("--from", dest="source", choices=["auto", "learned", "measured"], default="auto",
                   help="auto: learned where the run has one, else measured")
    e.add_argument("--alpha", type=float, default=None, help="alpha stored with the proxy (default: the run's, else 0.1)")
    e.add_argument("--data-root", default=None)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.set_defaults(func=_cmd_proxy_export)

    p = sub.add_parser("teacher", help="teacher utilities")
    tsub = p.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    c = tsub.add_parser("cache", help="cache a teacher run's logits for every training sample",
                        description="Compute a teacher's logits once per training sample (un-augmented inputs) "
                        "for `kd distill --teacher cached:FILE`.")
    c.add_argument("run_dir")
    c.add_argument("--dataset", default=None, help="default: the data set the teacher was trained on")
    c.add_argument("--out", required=True, help="new .safetensors file")
    c.add_argument("--data-root", default=None)
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.set_defaults(func=_cmd_teacher_cache)

    p = sub.add_parser("demo", help="the main job on the bundled digits data: an LS++ teacher and four students")
    p.add_argument("--out", default=None, help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KDError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kd: interrupted", file=sys.stderr)
        return 130
