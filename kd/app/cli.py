"""The `kd` command line: a thin layer over the Python API. Bad input: one line, exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from typing import NoReturn

import torch

import teachers
from kd.app.demo import run_demo
from kd.app.jobs import cache_job, distill_job, export_proxy_job, train_teacher_job
from kd.app.sweep import run_sweep, summary_table
from kd.config import COMPILE_MODES, TrainConfig, load_yaml_config
from kd.errors import KDError
from kd.runs import check_new_file, launch_rank, resumable_config


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exits with 2, and takes flags only
    as spelled in full (a prefix such as --compile must not quietly mean --compile-mode)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


S = argparse.SUPPRESS


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Training flags shared by every verb that trains; each mirrors a key of TrainConfig / YAML."""
    g = p.add_argument_group("training (each flag mirrors a key of --config FILE.yaml)")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file of keys mirroring these flags; flags win")
    g.add_argument("--model", default=S, help="registered name (lenet, resnet18, ...; fasttext, text-transformer for text), timm:NAME, torchvision:NAME, or hf:DIR (a local Hugging Face text classifier); default: the data set's")
    g.add_argument("--dataset", default=S, help="digits (default), mnist, fashion-mnist, cifar10, cifar100, svhn, tinyimagenet, imagenet100, animals10n, imagefolder:PATH (your own images: PATH/train/CLASS/*, PATH/val/CLASS/*), or text:PATH (your own text: PATH/train.csv and PATH/test.csv, or .tsv, .jsonl, .json)")
    g.add_argument("--preprocess", choices=["matched", "paper"], default=S,
                   help="matched (default): training and test images prepared alike; paper: the authors' released "
                   "Fashion-MNIST pipeline (training images reflect-padded to 32, test images resized to 32: a "
                   "train/test mismatch), to reproduce the paper's numbers, not to train by")
    g.add_argument("--data-root", default=S, help="where the data set lies (default: $KD_DATA_ROOT or ./data)")
    g.add_argument("--image-size", type=int, default=S,
                   help="imagefolder:PATH: side of the square the images are resized to (default: the first image's)")
    g.add_argument("--download", action="store_true", default=S, help="allow torchvision to download the data set")
    g.add_argument("--epochs", type=int, default=S, help="default 30")
    g.add_argument("--batch-size", type=int, default=S, help="default 128")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate, default 0.1")
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum (Nesterov), default 0.9")
    g.add_argument("--weight-decay", type=float, default=S, help="default 5e-4")
    g.add_argument("--no-c-weight-decay", dest="c_weight_decay", action="store_false", default=S,
                   help="exclude LS++'s C logits from weight decay")
    g.add_argument("--c-lr-scale", type=float, default=S, metavar="F",
                   help="LS++'s C learns at F x --lr (default 1: one rate for network and C, the paper's setting); "
                   "raise it when a run reports that C stayed near uniform")
    g.add_argument("--init", default=S, metavar="FILE",
                   help="start from these weights: safetensors, or a PyTorch checkpoint read without running its code "
                   "(bare state dict, state_dict/model/EMA entries, timm's and torchvision's training checkpoints); strict")
    g.add_argument("--reset-head", action="store_true", default=S,
                   help="re-initialise the classifier of --init/--pretrained weights for this data set's classes "
                   "(fine-tune a 1000-class checkpoint on 10 classes)")
    g.add_argument("--pretrained", action="store_true", default=S,
                   help="timm:NAME / torchvision:NAME models: start from the library's own pretrained weights "
                   "(from its local cache, or downloaded; offline, give the file with --init FILE)")
    g.add_argument("--log-with", default=S, metavar="NAME[,NAME]",
                   help="experiment trackers through accelerate: tensorboard, mlflow, wandb, aim, trackio, ... (the "
                   "config, every epoch's metrics and loss terms, C's movement, the learning rate); off by default")
    g.add_argument("--log-every", type=int, default=S, metavar="N",
                   help="with --log-with: the training loss every N optimizer steps too (default 50; 0: epochs only)")
    g.add_argument("--log-dir", default=S, help="with --log-with: where the trackers write (default: the run directory)")
    # -- text data sets (text:PATH) --
    g.add_argument("--text-column", default=S, help="text:PATH: the column holding the text (default text)")
    g.add_argument("--label-column", default=S,
                   help="text:PATH: the column holding the label, a name or an integer (default label)")
    g.add_argument("--tokenizer", default=S, metavar="FILE|hf:DIR",
                   help="text:PATH: encode with this tokenizer.json (a text run's) or a local Hugging Face tokenizer; "
                   "default: one built from the training split (a student takes its teacher run's)")
    g.add_argument("--max-length", type=int, default=S, help="text:PATH: tokens kept per sample (default 256)")
    g.add_argument("--hash-buckets", type=int, default=S, metavar="N",
                   help="text:PATH: hash n-grams into N ids instead of a vocabulary of the training split (default 0: "
                   "vocabulary)")
    g.add_argument("--word-ngrams", type=int, default=S, metavar="N", help="text:PATH: word n-grams up to N (default 2)")
    g.add_argument("--char-ngrams", type=int, default=S, metavar="N",
                   help="text:PATH: also each word's character n-grams of length 3..N (default 0: none)")
    g.add_argument("--max-vocab", type=int, default=S, metavar="N",
                   help="text:PATH: keep the N most frequent n-grams in the vocabulary (default 100000)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=S)
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], default=S, help="after warm-up; default cosine")
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up, default 1")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S, help="turn off batch augmentation")
    g.add_argument("--mixup", type=float, default=S, metavar="ALPHA", help="Mixup with Beta(ALPHA, ALPHA) per batch (0: off)")
    g.add_argument("--cutmix", type=float, default=S, metavar="ALPHA",
                   help="CutMix with Beta(ALPHA, ALPHA) (0: off); with --mixup, one of the two per batch, p = 0.5")
    g.add_argument("--cutout", type=int, default=S, metavar="SIZE", help="Cutout: a SIZE x SIZE square zeroed per image (0: off)")
    g.add_argument("--aa", default=S, metavar="rand-mM-nN",
                   help="RandAugment (torchvision v2) with N ops of magnitude M per image, in --num-workers loader workers")
    g.add_argument("--seed", type=int, default=S, help="default 0")
    g.add_argument("--val-fraction", type=float, default=S, metavar="F",
                   help="hold out a stratified share F of the training set and evaluate on it instead of the test "
                   "set (for choosing settings; the summary's metrics are then val_*); default 0: off")
    g.add_argument("--val-seed", type=int, default=S, help="which stratified share --val-fraction holds out (default 0)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=S)
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=S, help="mixed precision: autocast in the training step (fp16 adds a gradient scaler)")
    g.add_argument("--channels-last", action="store_true", default=S)
    g.add_argument("--compile-mode", choices=list(COMPILE_MODES), default=S,
                   help="torch.compile the training step (forward, source terms, backward, optimiser step); "
                   "reduce-overhead also replays it as CUDA graphs (CUDA only): for small GPU steps that are "
                   "launch-bound. Compilation takes the first step. Default none")
    g.add_argument("--compile-backend", default=S, help="torch.compile backend for --compile-mode (default inductor)")
    g.add_argument("--num-workers", type=int, default=S, help="loader workers for streamed folder data sets and --aa "
                   "(default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its last finished epoch (its own config.yaml)")


def add_source_flags(p: argparse.ArgumentParser, sources) -> None:
    """One flag per option the sources declare (--alpha, --temperature, ...), typed and described by them."""
    g = p.add_argument_group("target source options (each source takes the ones it names; unset: its default)")
    for name, uses in teachers.option_table(sources).items():
        g.add_argument(uses[0][1].flag, type=uses[0][1].type, default=S,
                       help="; ".join(f"{cls.name}: {opt.describe()}" for cls, opt in uses))


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> TrainConfig:
    cfg = TrainConfig()
    if getattr(args, "config", None):
        cfg = cfg.updated(load_yaml_config(args.config), where=args.config, option_names=teachers.option_names())
    names = teachers.option_names()
    given = {k: v for k, v in vars(args).items()
             if (k in TrainConfig.__dataclass_fields__ or k in names) and k not in skip and k != "options"}
    return cfg.updated(given, where="flags", option_names=names)  # checked once, by the job


def _train(args, student: bool) -> int:
    """`kd train-teacher` and `kd distill`: resolve the config, run the job, print the final metrics."""
    if args.resume:
        names = teachers.option_names()
        if getattr(args, "config", None) or any((k in TrainConfig.__dataclass_fields__ or k in names) and k != "lr"
                                                for k in vars(args)):
            raise KDError("--resume continues a run with its own config.yaml; give only --out (and --lr to lower "
                          "the learning rate, --quiet)")
        cfg = TrainConfig.from_dict(resumable_config(args.out), where=f"{args.out}/config.yaml", option_names=names)
        source = cfg.teacher.partition(":")[0] if student and cfg.teacher else cfg.method
        cfg = replace(cfg, options=teachers.declared_options(source, cfg.options))
        if "lr" in vars(args):  # e.g. after a diverged epoch: continue from the last good checkpoint, slower
            cfg = cfg.updated({"lr": args.lr})
    else:
        cfg = config_from_args(args)
    job = distill_job if student else train_teacher_job
    s = job(cfg, args.out, progress=not args.quiet, log=None if args.quiet else print, resume=args.resume).summary
    if launch_rank() != 0:
        return 0
    what = f"student {s['model']} from {cfg.teacher}" if student else f"{cfg.method or 'lspp'} teacher {s['model']}"
    ev = s["evaluated_on"]
    print(f"{what} -> {args.out}: {ev} acc {s[ev + '_acc']:.4f}  nll {s[ev + '_nll']:.4f}  ece {s[ev + '_ece']:.4f}  "
          f"({s['seconds_per_epoch']:.2f}s/epoch)")
    return 0


def _cmd_train_teacher(args) -> int:
    return _train(args, student=False)


def _cmd_distill(args) -> int:
    return _train(args, student=True)


def _cmd_proxy_export(args) -> int:
    out = export_proxy_job(args.run_dir, args.out, args.source, args.alpha, args.data_root, args.device, args.top_k,
                           **_teacher_file_args(args), dataset=args.dataset)
    print(f"proxy teacher ({args.source}{f', top {args.top_k}' if args.top_k else ''}) -> {out}")
    return 0


def _teacher_file_args(args) -> dict:
    return {"model": args.model, "weights": args.weights, "pretrained": args.pretrained, "class_map": args.class_map,
            "teacher_norm": args.teacher_norm}


def _cmd_teacher_cache(args) -> int:
    out = cache_job(args.run_dir, args.dataset, args.out, args.data_root, args.device, args.top_k,
                    **_teacher_file_args(args))
    print(f"teacher outputs{f' (top {args.top_k})' if args.top_k else ''} -> {out}")
    return 0


def _write_rows(frame, path) -> None:
    """A benchmark's rows as CSV at ``path`` (already checked to be new), when one was asked for."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        print(f"rows -> {path}")


def _cmd_large_k_bench(args) -> int:
    import benchmarks.large_k as lk

    out = check_new_file(args.out) if args.out else None
    lspp_out = check_new_file(out.with_name(out.stem + "_lspp" + out.suffix)) if out else None
    log = None if args.quiet else print
    try:
        ks = tuple(int(k) for k in args.classes.split(","))
    except ValueError:
        raise KDError(f"--classes takes comma-separated numbers of classes, e.g. 1000,21841; got '{args.classes}'") from None
    if len(ks) != 2 or min(ks) < 2:
        raise KDError(f"--classes takes two numbers of classes of at least 2 (the LS++ rows time the first and "
                      f"price the second), got '{args.classes}'")
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    df = lk.run_large_k(args.device, ks, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                        warmup=args.warmup, top_k=args.top_k, n_cached=args.n_cached, sources=sources,
                        max_dense_bytes=int(args.max_dense_gib * 2 ** 30), amp=args.amp, log=log,
                        compile_mode=args.compile_mode, compile_backend=args.compile_backend)
    # LS++ at K = 21,841 needs ~19 GB for C's state and loss temporaries: measured where the device has room
    room = torch.cuda.get_device_properties(0).total_memory // 2 if args.device == "cuda" else 8 * 2 ** 30
    ldf = lk.lspp_large_k(args.device, ks[0], ks[1], batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                          warmup=args.warmup, amp=args.amp, max_measure_bytes=room, log=log)
    print(lk.markdown(df, ldf))
    _write_rows(df, out)
    _write_rows(ldf, lspp_out)
    return 0


def _cmd_bench(args) -> int:
    from benchmarks.cost import markdown, run_bench  # the benchmarks load where their verbs run

    out = check_new_file(args.out) if args.out else None
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    df = run_bench(args.preset, args.device, args.batch_size, args.steps, args.repeats, args.warmup, args.amp,
                   args.channels_last, sources, args.data, args.data_root, log=None if args.quiet else print,
                   mode=args.mode, compile=args.compile, epoch_size=args.epoch_size,
                   compile_backend=args.compile_backend, compile_mode=args.compile_mode)
    print(markdown(df))
    _write_rows(df, out)
    return 0


def _cmd_loader_bench(args) -> int:
    from benchmarks.loader import loader_ratio

    out = check_new_file(args.out) if args.out else None
    r = loader_ratio(args.dataset, args.model, args.batch_size, args.repeats, args.data_root, args.device,
                     log=None if args.quiet else print, aa=args.aa, num_workers=args.num_workers)
    print(f"{r['dataset']} / {r['model']}: real-loader epoch {r['real_epoch_s_median']:.2f}s, in-memory epoch "
          f"{r['memory_epoch_s_median']:.2f}s, ratio {r['ratio']:.3f} (medians of {r['repeats']}; "
          f"paired {r['paired_ratio']:.3f})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2) + "\n")
    return 0


def _cmd_sweep(args) -> int:
    if args.dry_run:
        from kd.app.sweep import pending

        print(pending(args.file))
        return 0
    df = run_sweep(args.file, log=None if args.quiet else print, jobs=args.jobs)
    print(summary_table(df))
    return 0


def _cmd_report(args) -> int:
    from kd.app.report import make_report  # matplotlib and scikit-learn load only for this verb

    index = make_report(args.inputs, args.out, bench=args.bench, cache=args.cache, device=args.device,
                        data_root=args.data_root, tsne_points=args.tsne_points, log=None if args.quiet else print)
    print(f"report -> {index}")
    return 0


def _cmd_calibrate(args) -> int:
    from kd.app.jobs import calibrate_run
    from kd.calibration import CALIBRATION, read_calibration

    rows = []
    for run in args.runs:
        kept = read_calibration(run) is not None
        c = calibrate_run(run, data_root=args.data_root, device=args.device, seed=args.seed)
        how = (f"{c['val_fraction']:g} validation split" if c["fitted_on"] == "validation split"
               else "test halves, crossed")
        rows.append(f"| {run}{' (kept)' if kept else ''} | {how} | {c['temperature']:.3f} | {c['test_acc'] * 100:.2f} | "
                    f"{c['test_nll']:.3f} -> {c['test_nll_ts']:.3f} | {c['test_ece'] * 100:.2f} -> {c['test_ece_ts'] * 100:.2f} | "
                    f"{c['test_aece'] * 100:.2f} -> {c['test_aece_ts'] * 100:.2f} |")
    print("| run | T fitted on | T | test acc (%) | NLL | ECE-15 (%) | adaptive ECE (%) |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"each run's temperature and calibrated test metrics are in RUN/{CALIBRATION}; "
          f"a run calibrated before keeps its file (kept)")
    return 0


def _cmd_demo(args) -> int:
    run_demo(out=args.out, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs, device=args.device)
    return 0


def _train_teacher_parser(sub) -> None:
    methods = teachers.label_methods()
    method_help = "; ".join(f"{m}: {teachers.SOURCES[m].summary}" for m in methods)
    p = sub.add_parser("train-teacher", help="train a network with a label-only source (" + ", ".join(methods) + ")",
                       description="Train a teacher network. With --method lspp the run also holds its learned "
                       "C-matrix. Methods: " + method_help + ".")
    p.add_argument("--method", choices=methods, default=S, help="default lspp")
    add_source_flags(p, [teachers.SOURCES[m] for m in methods])
    p.add_argument("--out", required=True, help="new run directory (must not exist or be empty)")
    add_train_flags(p)
    p.set_defaults(func=_cmd_train_teacher)


def _distill_parser(sub) -> None:
    spec_help = teachers.spec_help()
    sources_help = "; ".join(f"{n}: {c.summary}" for n, c in teachers.SOURCES.items())
    p = sub.add_parser("distill", help="train a student from a teacher SPEC",
                       description="Train a student from a teacher source. SPEC: " + spec_help + ". Sources: "
                       + sources_help + ". Cached rows describe un-augmented inputs: combine cached: with "
                       "--no-augment (a warning is printed when augmentation is on).")
    p.add_argument("--teacher", default=S, metavar="SPEC", help="required (unless --resume): " + spec_help)
    p.add_argument("--student", dest="model", default=S, help="student model name (default: the data set's)")
    p.add_argument("--out", required=True, help="new run directory (must not exist or be empty)")
    add_source_flags(p, teachers.SOURCES.values())
    add_train_flags(p)
    p.set_defaults(func=_cmd_distill)


def _device_flag(p, default: str = "auto") -> None:
    choices = ["auto", "cpu", "cuda"] if default == "auto" else ["cpu", "cuda"]
    p.add_argument("--device", choices=choices, default=default)


def _proxy_parser(sub) -> None:
    p = sub.add_parser("proxy", help="proxy teachers (C-matrices)")
    psub = p.add_subparsers(dest="proxy_command", required=True, parser_class=_Parser)
    e = psub.add_parser("export", help="write a C-matrix proxy from any trained teacher run",
                        description="A proxy teacher from any trained network: the class-conditional mean of its "
                        "softmax over the training set, diagonal removed, rows renormalised (measured); an LS++ run "
                        "also offers the C it learned (learned).")
    e.add_argument("run_dir", nargs="?", default=None, help="a finished run (or give --model with --weights FILE)")
    e.add_argument("--out", required=True, help="new .safetensors file")
    _teacher_network_flags(e)
    e.add_argument("--dataset", default=None, help="with --model: the data set the network runs on (a run's own by default)")
    e.add_argument("--from", dest="source", choices=["auto", "learned", "measured"], default="auto",
                   help="auto: learned where the run has one, else measured")
    alpha = teachers.SOURCES["proxy"].option("alpha")  # the proxy's own option: its flag, type and check
    e.add_argument(alpha.flag, type=alpha.type, default=None,
                   help=f"weight of C in the target, stored with the proxy ({alpha.bounds()}; default: the run's, "
                   f"else {teachers.DEFAULT_ALPHA:g})")
    e.add_argument("--data-root", default=None)
    _device_flag(e)
    e.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep the K largest entries of each row, renormalised to sum to 1, stored sparsely "
                   "(1 <= K < number of classes; for a large number of classes)")
    e.set_defaults(func=_cmd_proxy_export)


def _teacher_parser(sub) -> None:
    p = sub.add_parser("teacher", help="teacher utilities")
    tsub = p.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    c = tsub.add_parser("cache", help="cache a teacher run's logits for every training sample",
                        description="Compute a teacher's logits once per training sample (un-augmented inputs) "
                        "for `kd distill --teacher cached:FILE`.")
    c.add_argument("run_dir", nargs="?", default=None, help="a finished run (or give --model with --weights FILE)")
    _teacher_network_flags(c)
    c.add_argument("--dataset", default=None, help="default: the data set the teacher was trained on (needed with --model)")
    c.add_argument("--out", required=True, help="new .safetensors file")
    c.add_argument("--data-root", default=None)
    _device_flag(c)
    c.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="store each sample's K largest probabilities (float16) and their classes instead of "
                   "all logits; targets spread the remaining mass uniformly (FKD). 1 <= K < number of classes")
    c.set_defaults(func=_cmd_teacher_cache)


def _teacher_network_flags(p) -> None:
    """A teacher network given as a file (or the library's weights) instead of a run directory, and how it maps."""
    p.add_argument("--model", default=None, help="the teacher's network (registered name, timm:NAME, torchvision:NAME) "
                   "when it is not a run directory; with --weights FILE or --pretrained")
    p.add_argument("--weights", default=None, metavar="FILE", help="--model's weights: safetensors or a PyTorch "
                   "checkpoint (read without running its code)")
    p.add_argument("--pretrained", action="store_true", help="--model's weights from its library (timm, torchvision)")
    p.add_argument("--class-map", default=None, metavar="FILE|imagenet", help="a teacher trained on more or other "
                   "classes: its output for each class of the data (JSON or CSV; 'imagenet' for WordNet-id class names)")
    p.add_argument("--teacher-norm", default=None, metavar="NORM", help="the teacher's input normalisation: dataset "
                   "(default for files), imagenet, or MEAN,.../STD,...")


def _timing_flags(p) -> None:
    """What every timing verb shares: device, batch, steps x repeats, warm-up, precision, output."""
    _device_flag(p, "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's for the device")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 10 on CPU, 20 on CUDA)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per source before timing")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--out", default=None, metavar="FILE.csv", help="also write the rows as CSV (new file)")
    p.add_argument("--quiet", action="store_true")


def _bench_parser(sub) -> None:
    rows = teachers.bench_rows()
    p = sub.add_parser("bench", help="time one training step per teacher source, side by side",
                       description="Time a full training step of a preset's student for each target source "
                       "(bare PyTorch loop, then every registered source on stand-in artifacts: " + ", ".join(rows[1:])
                       + "), interleaved over repeats; prints medians and ratios to onehot.")
    p.add_argument("--preset", required=True, help="the student, teacher and input shapes timed: a name in "
                   "benchmarks/cost.py's PRESETS (an unknown name lists them)")
    _timing_flags(p)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--sources", default=",".join(rows), help="comma-separated subset of " + ",".join(rows))
    p.add_argument("--mode", choices=["step", "epoch"], default="step",
                   help="step: STEPS steps per repeat on batches in memory; epoch: one whole epoch per repeat through "
                   "the real loader (of --data, or of --epoch-size synthetic images of the preset's shape)")
    p.add_argument("--epoch-size", type=int, default=None, metavar="N",
                   help="--mode epoch without --data: synthetic samples per epoch (default 8 batches on CPU, 50 on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="add a SOURCE+compile row per source (torch.compile of the student, and of the teacher network "
                   "where there is one); compilation is timed apart, never inside the timed steps")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile (default inductor)")
    p.add_argument("--compile-mode", choices=[m for m in COMPILE_MODES if m != "none"], default="default",
                   help="--compile's mode: default, or reduce-overhead (the step replayed as CUDA graphs: "
                   "SOURCE+graphs rows; CUDA only), or max-autotune")
    p.add_argument("--data", default=None, metavar="DATASET", help="draw batches from this real data set's loader instead of synthetic tensors")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=_cmd_bench)


def _large_k_bench_parser(sub) -> None:
    p = sub.add_parser("large-k-bench", help="step cost at a large number of classes: dense and top-k proxies and caches, LS++",
                       description="A linear head on 512 random features at two numbers of classes: onehot, the dense "
                       "proxy, the top-k proxy and the top-k cache side by side, then LS++'s step time and memory at "
                       "both (measured where the device has room, priced from its code otherwise; a second CSV, "
                       "FILE_lspp.csv).")
    _timing_flags(p)
    p.add_argument("--classes", default="1000,21841", metavar="K1,K2",
                   help="the two numbers of classes (default 1000,21841: ImageNet-1k and -21k)")
    p.add_argument("--sources", default="onehot,proxy,proxy-topk,cached-topk",
                   help="comma-separated subset of onehot, proxy, proxy-topk, cached-topk, cached (dense N x K)")
    p.add_argument("--top-k", type=int, default=10, help="entries kept per C row or per sample (default 10)")
    p.add_argument("--n-cached", type=int, default=100_000, help="samples in the stand-in caches (default 100,000)")
    p.add_argument("--max-dense-gib", type=float, default=4.0, help="leave out dense artifacts larger than this")
    p.add_argument("--compile-mode", choices=list(COMPILE_MODES), default="none",
                   help="compile every row's step (reduce-overhead: replayed as CUDA graphs, CUDA only); default none")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile-mode")
    p.set_defaults(func=_cmd_large_k_bench)


def _loader_bench_parser(sub) -> None:
    p = sub.add_parser("loader-bench", help="real-loader epoch time against the same steps on in-memory batches",
                       description="Times one training epoch through the real loader (batch augmentation included) "
                       "against the same steps on batches materialised beforehand; prints the ratio of medians.")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--data-root", default=None)
    _device_flag(p, "cpu")
    p.add_argument("--aa", default=None, metavar="rand-mM-nN", help="also apply RandAugment per image, in loader workers")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers for --aa (default 2)")
    p.add_argument("--out", default=None, metavar="FILE.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_loader_bench)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="a grid of runs x seeds from one YAML file, resumable",
                       description="Run every (run, seed) of a sweep file, skipping finished runs, then write a tidy "
                       "CSV and a markdown table of mean +- std over seeds. A `select: {lr: [...]}` block chooses each "
                       "run's learning rate on a validation split of the training set first. See kd/app/sweep/__init__.py "
                       "for the format.")
    p.add_argument("file")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in its own process with the threads split between them "
                   "(on a GPU they share it); default 1")
    p.add_argument("--dry-run", action="store_true",
                   help="train nothing: list the runs that would train now, and where each chosen rate lies in its grid")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_sweep)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="figures (PNG), their numbers (CSV) and an index.md for runs",
                       description="Figures for finished runs and C-matrix files: C-matrix heatmaps (paper Fig. 3), "
                       "class-wise training-set output probabilities (Fig. 4), t-SNE and class-centre distances of "
                       "penultimate test features (Fig. 5), reliability diagrams with ECE, learning curves, cost charts "
                       "from `kd bench` CSVs and, with lspp-ce / lspp-sce runs, the loss-ablation C-matrices (Fig. 6). "
                       "Runs are compared side by side on one colour scale. The network runs once per run over the "
                       "training and test sets; its outputs are cached in --cache (default OUT/cache).")
    p.add_argument("inputs", nargs="*", metavar="RUN_DIR", help="finished run directories or c_matrix .safetensors files")
    p.add_argument("--out", required=True, help="new report directory (must not exist or be empty)")
    p.add_argument("--bench", action="append", default=[], metavar="FILE.csv",
                   help="a `kd bench --out` CSV to chart (repeatable)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="model-output cache (default OUT/cache); give an earlier report's cache folder to reuse it")
    p.add_argument("--tsne-points", type=int, default=2000, help="seeded test subset for the t-SNE (default 2000)")
    p.add_argument("--data-root", default=None)
    _device_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_report)


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="temperature scaling of finished runs: T, calibrated NLL and ECE",
                       description="Fit each run's temperature (one scalar dividing its logits) by NLL on data its "
                       "network never trained on: its validation split when it was trained on one, else two "
                       "stratified halves of the test set, each scaled by the temperature fitted on the other, so that "
                       "the calibrated metrics cover the whole test set without scoring a sample with a temperature "
                       "fitted on it. Writes RUN/calibration.json (T, raw and calibrated test NLL, ECE-15, adaptive "
                       "ECE); nothing else of the run changes. `kd report` then draws reliability before and after.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    p.add_argument("--seed", type=int, default=0, help="seed of the cut into test halves (default 0)")
    p.add_argument("--data-root", default=None)
    _device_flag(p)
    p.set_defaults(func=_cmd_calibrate)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the bundled digits data: an LS++ teacher and four students")
    p.add_argument("--out", default=None, help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-epochs", type=int, default=30)
    _device_flag(p)
    p.set_defaults(func=_cmd_demo)


VERB_PARSERS = (_train_teacher_parser, _distill_parser, _proxy_parser, _teacher_parser, _bench_parser,
                _large_k_bench_parser, _loader_bench_parser, _sweep_parser, _report_parser, _calibrate_parser, _demo_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd", description="proxykd: train Label Smoothing++ teachers and distill students from networks or C-matrices.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in VERB_PARSERS:
        add(sub)
    return parser


def _quiet_torch_on_cpu() -> None:
    """Without a CUDA device, torch's C++ extension helper warns "No CUDA runtime is found" whenever torch.compile
    loads it on a machine with a CUDA toolkit: noise on a CPU run, so that logger speaks only of errors."""
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _leave_process_group() -> None:
    """Under torchrun: leave the process group, or a worker can abort at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run one `kd` command; its exit code. Callable from a user's own script, under torchrun too."""
    _quiet_torch_on_cpu()
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
    finally:
        _leave_process_group()


def finish(code: int) -> NoReturn:
    """End the process with a command's exit code; a data-parallel worker (torchrun's WORLD_SIZE above 1)
    ends at once, its output flushed, without the interpreter's teardown.

    torch 2.14.1's DistributedDataParallel keeps references to its gloo process group after
    ``destroy_process_group``, so the group's threads are still running when the interpreter shuts
    down, and a launch can then abort with "terminate called without an active exception" after the run
    is complete: ten lines of plain torch (a DDP model on gloo, 20 steps, ``destroy_process_group``,
    exit) did so in 2 of 40 two-process launches on this project's CPU machine, and in none of 30 that
    ended with ``os._exit``. Every file and tracker is closed by the time a command returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def entry() -> NoReturn:
    """`kd ...` and `python -m kd ...`: one command, then :func:`finish`."""
    finish(main())
