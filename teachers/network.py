"""Online knowledge distillation: a frozen teacher network run on every batch.

By default the student is trained with cross-entropy on the teacher's probabilities (the
paper's Table 6 protocol). With a temperature it uses Hinton et al.'s loss instead:
(1 - w) * T^2 * KL(softmax(t/T) || softmax(s/T)) + w * CE(y, s), as two named terms (``kd``,
``hard_ce``) so that the metrics and trackers show the teacher's part apart from the labels'.

The teacher is a finished run directory (``network:RUN_DIR``), a network of any registered, timm or
torchvision name with weights from a file (``network:MODEL@FILE``, read without running its code)
or from the library (``network:MODEL@pretrained``), or, in Python, a module in memory
(``make_source("network", K, model=net)``). A teacher trained on more or other classes serves
through a class map (``--class-map``, :mod:`kd.classmap`): its logits restricted to the data set's
classes, then the softmax renormalises them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd import runs
from kd.checkpoints import checkpoint_num_classes, load_into, read_checkpoint
from kd.classmap import IMAGENET, imagenet_class_names, resolve_class_map
from kd.errors import KDError
from kd.losses import hinton_kd_terms, soft_cross_entropy
from kd.models import create_model, library_of, pretrained_checkpoint
from kd.sources import Option, SourceContext, TargetSource

#: ImageNet's channel mean and std (timm's and torchvision's pretrained networks expect inputs normalised so).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: The options every network-run teacher takes: which outputs stand for the data's classes, and what inputs it expects.
TEACHER_OPTIONS = (
    Option("class_map", "a teacher trained on more or other classes: its output for each class of the data, from a "
           "JSON or CSV file, or 'imagenet' (the data set's classes named by WordNet id, an ImageNet-1k teacher)",
           None, str),
    Option("teacher_norm", "the input normalisation the teacher was trained with: 'dataset' (the data set's; the "
           "default for files, a run directory's own for runs), 'imagenet', or MEAN,MEAN,.../STD,STD,...", None, str),
)


@dataclass
class LoadedTeacher:
    """A teacher network ready to run on the student's inputs."""

    model: nn.Module
    affine: tuple[torch.Tensor, torch.Tensor] | None = None  # student-normalised inputs -> the teacher's
    class_index: torch.Tensor | None = None                  # the teacher's output for each data set class
    meta: dict[str, Any] | None = None                       # what the teacher's files say (a run's summary)


class NetworkTeacher(TargetSource):
    """A frozen teacher: eval mode always, no gradient, never in the optimiser."""

    name = "network"
    summary = ("online KD: a trained teacher run executed on every batch (CE on its probabilities; "
               "--temperature for Hinton's loss)")
    spec_arg = "RUN_DIR|MODEL@FILE"
    needs_inputs = True
    options = (Option("temperature", "use Hinton's KD loss at temperature T (unset: CE on the teacher's probabilities)",
                      None, low=0.0, low_open=True),
               Option("hard_weight", "Hinton KD: weight w of the hard-label CE, (1 - w) on the soft term", 0.0,
                      low=0.0, high=1.0)) + TEACHER_OPTIONS

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "NetworkTeacher":
        t = load_checked_teacher(cls.name, arg, ctx)
        return cls(t.model, ctx.num_classes, cls.value(ctx, "temperature"), cls.value(ctx, "hard_weight"), t.affine,
                   t.class_index)

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "NetworkTeacher":
        if ctx.teacher_model is None:
            raise KDError("a network row needs a teacher model")
        return cls(ctx.teacher_model, ctx.num_classes)

    def __init__(self, teacher: nn.Module, num_classes: int, temperature: float | None = None,
                 hard_weight: float = 0.0, input_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
                 class_index: torch.Tensor | None = None):
        """``teacher`` is frozen in place: it is switched to eval mode and its parameters stop requiring
        gradients (the module you hand over is that teacher; pass a copy to keep training the original).
        ``input_affine`` maps the student's normalised inputs to the teacher's; ``class_index`` (K entries)
        picks the teacher outputs that stand for the data's K classes (see :mod:`kd.classmap`)."""
        super().__init__(num_classes)
        if class_index is not None:
            class_index = torch.as_tensor(class_index, dtype=torch.long)
            if class_index.shape != (self.num_classes,):
                raise KDError(f"a class map gives one teacher output per class: {self.num_classes} entries, got "
                              f"{tuple(class_index.shape)}")
        self.register_buffer("class_index", class_index, persistent=False)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = None if temperature is None else type(self).option("temperature").check(temperature, self.name)
        self.hard_weight = NetworkTeacher.option("hard_weight").check(hard_weight, self.name)
        if input_affine is not None:  # maps the student's normalised inputs to the teacher's
            self.register_buffer("in_scale", input_affine[0], persistent=False)
            self.register_buffer("in_shift", input_affine[1], persistent=False)
        else:
            self.in_scale = self.in_shift = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # a frozen teacher never switches to train mode (BN stats, dropout)
        return self

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits under inference mode, returned as an ordinary constant tensor."""
        with torch.inference_mode():
            if self.in_scale is not None:
                inputs = inputs * self.in_scale + self.in_shift
            logits = self.teacher(inputs).float()
            if self.class_index is not None:  # a teacher of other classes: the outputs that stand for the data's
                logits = logits.index_select(1, self.class_index)
        return logits.clone()  # an inference tensor cannot be saved for the student's backward

    def targets(self, labels, *, inputs=None, index=None):
        if inputs is None:
            raise ValueError("a network teacher needs the batch inputs")
        return self.teacher_logits(inputs).softmax(-1)

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        t_logits = self.teacher_logits(inputs)
        if self.temperature is None:
            return {"ce": soft_cross_entropy(logits, t_logits.softmax(-1))}
        # with mixup / cutmix the teacher sees the mixed input and the hard term is CE on the soft labels m
        return hinton_kd_terms(logits, t_logits, labels, self.temperature, self.hard_weight)


def load_checked_teacher(name: str, arg: str, ctx: SourceContext) -> LoadedTeacher:
    """The teacher network a SPEC argument (or ``make_source``'s ``model=``) names, checked against the data set:
    its outputs mapped to the data's classes (``class_map``) and its input normalisation mapped (``teacher_norm``)."""
    class_map, norm = (option.resolve(ctx.options.get(option.name)) for option in TEACHER_OPTIONS)
    if ctx.teacher_model is not None and not arg:  # a network in memory (Python)
        t = LoadedTeacher(ctx.teacher_model)
        k_teacher, names = _outputs(ctx.teacher_model, ctx), None
    elif not arg:
        raise KDError(f"teacher '{name}' needs a network: {name}:RUN_DIR (from `kd train-teacher`) or "
                      f"{name}:MODEL@FILE (a checkpoint of your own, e.g. {name}:timm:resnet50@teacher.pth)")
    elif "@" in arg:
        model_name, _, file = arg.partition("@")
        t = network_from_weights(model_name, file, ctx.info, ctx.num_classes, class_map is not None)
        k_teacher, names = t.meta["num_classes"], t.meta.get("class_names")
    else:
        t = _checked_run(arg, ctx, class_map is not None)
        k_teacher, names = t.meta["num_classes"], t.meta.get("class_names")
    if class_map is not None:
        data_names = (ctx.info.class_names if ctx.info is not None else None) or [str(i) for i in range(ctx.num_classes)]
        t.class_index = resolve_class_map(class_map, data_names, k_teacher, names)
    elif k_teacher is not None and k_teacher != ctx.num_classes:
        raise KDError(f"the teacher has {k_teacher} outputs but the data set has {ctx.num_classes} classes; map them "
                      f"with --class-map FILE (or 'imagenet'; class_map= in Python)")
    t.affine = teacher_affine(norm, t.meta, ctx.info) if (norm is not None or t.meta) else None
    return t


def _outputs(model: nn.Module, ctx: SourceContext) -> int | None:
    """How many outputs an in-memory network gives, read from its classifier (None when it cannot be told)."""
    from kd.checkpoints import head_prefixes

    try:
        prefix = head_prefixes(model)[0]
    except KDError:
        return None
    w = dict(model.named_parameters()).get(prefix + ".weight")
    return int(w.shape[0]) if w is not None else None


def _checked_run(arg: str, ctx: SourceContext, mapped: bool) -> LoadedTeacher:
    """A finished run's network, checked against the data set (the same data set and preparation, unless a class
    map connects a run trained on other classes)."""
    model, meta = load_teacher_network(arg)
    if ctx.dataset is not None and meta.get("dataset") != ctx.dataset and not mapped:
        raise KDError(f"teacher run {arg} was trained on '{meta.get('dataset')}', not '{ctx.dataset}'; use "
                      f"--dataset {meta.get('dataset')}, or connect the classes with --class-map")
    if ctx.info is not None and meta.get("preprocess", "matched") != ctx.info.preprocess and not mapped:
        raise KDError(f"teacher run {arg} was trained with --preprocess {meta.get('preprocess', 'matched')}, this run "
                      f"uses {ctx.info.preprocess}: the teacher would see images prepared otherwise; use the same")
    return LoadedTeacher(model, meta=meta)


def network_from_weights(model_name: str, file: str, info, num_classes: int, mapped: bool = False) -> LoadedTeacher:
    """``MODEL@FILE``: network ``model_name`` for the data set's input shape, its number of outputs read from the
    file's classifier, weights loaded strictly (``FILE`` read without running its code; ``pretrained``: the
    library's own weights, when no file of that name exists)."""
    if not model_name or not file:
        raise KDError(f"a teacher from weights is MODEL@FILE (e.g. timm:resnet50@teacher.safetensors), got "
                      f"'{model_name}@{file}'")
    channels = info.channels if info is not None else 3
    size = info.image_size if info is not None else 32
    if file == "pretrained" and not Path(file).exists():
        ckpt = pretrained_checkpoint(model_name, channels)
        names = imagenet_class_names() if library_of(model_name) else None
    else:
        ckpt = read_checkpoint(file)
        names = ckpt.class_names
    probe = create_model(model_name, num_classes, channels, size)
    k = checkpoint_num_classes(probe, ckpt.state, num_classes) or num_classes
    model = probe if k == num_classes else create_model(model_name, k, channels, size)
    load_into(model, ckpt, num_classes=k, what="teacher weights")
    if names is not None and len(names) != k:
        names = None
    meta = {"model": model_name, "num_classes": k, "class_names": names, "weights": str(ckpt.path)}
    return LoadedTeacher(model.eval(), meta=meta)


def parse_norm(norm: str | tuple) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--teacher-norm``: None for 'dataset', ImageNet's for 'imagenet', else (mean, std) from MEAN,../STD,.."""
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        return tuple(map(float, norm[0])), tuple(map(float, norm[1]))
    text = str(norm).strip().lower()
    if text == "dataset":
        return None
    if text == IMAGENET:
        return IMAGENET_NORM
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split("/"))
    except ValueError:
        raise KDError(f"--teacher-norm takes dataset, imagenet or MEAN,MEAN,.../STD,STD,..., got '{norm}'") from None
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise KDError(f"--teacher-norm: give as many means as standard deviations, all positive, got '{norm}'")
    return mean, std


def teacher_affine(norm, meta: dict | None, info) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The map from the student's normalised inputs to the teacher's: from ``norm`` when given, else from a run's
    recorded mean and std (None: the teacher expects the data set's own normalisation)."""
    if norm is not None:
        wanted = parse_norm(norm)
        if wanted is None:
            return None
        if info is None:
            raise KDError("--teacher-norm needs the data set's own normalisation; give the data set's info "
                          "(DatasetInfo) or normalise the teacher's inputs in the teacher module")
        if len(wanted[0]) not in (1, info.channels):
            raise KDError(f"--teacher-norm gives {len(wanted[0])} channel means; the data set has {info.channels} "
                          f"channels")
        meta = {"mean": list(wanted[0]), "std": list(wanted[1])}
    if info is None or not meta:
        return None
    return normalisation_affine(meta, info.mean, info.std)


def load_teacher_network(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a finished run's network from its summary.json and model.safetensors."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise KDError(f"{run_dir} is a file, not a run directory: name the network it holds weights for, "
                      f"MODEL@{run_dir} (e.g. network:resnet18@{run_dir}, network:timm:resnet50@{run_dir})")
    if not run_dir.is_dir():
        raise KDError(f"teacher run {run_dir} does not exist; train one with `kd train-teacher --out {run_dir}`, or "
                      f"give a checkpoint of your own as MODEL@FILE")
    s = runs.read_summary(run_dir)
    try:
        model = create_model(s["model"], s["num_classes"], s["in_channels"], s["image_size"])
    except KeyError as e:
        raise KDError(f"{run_dir}/summary.json lacks {e}; it was not written by kd train-teacher") from None
    runs.load_weights(run_dir / runs.WEIGHTS, model)
    return model.eval(), s


def normalisation_affine(teacher_meta: dict, mean, std) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Affine map from inputs normalised with (mean, std) to the teacher's normalisation, or None."""
    tm, ts = teacher_meta.get("mean"), teacher_meta.get("std")
    if tm is None or (list(tm) == list(mean) and list(ts) == list(std)):
        return None
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    tm, ts = torch.tensor(tm).view(1, -1, 1, 1), torch.tensor(ts).view(1, -1, 1, 1)
    return std / ts, (mean - tm) / ts
