"""Online knowledge distillation: a frozen teacher network run on every batch.

By default the student is trained with cross-entropy on the teacher's probabilities (the
paper's Table 6 protocol). With a temperature it uses Hinton et al.'s loss instead:
(1 - w) * T^2 * KL(softmax(t/T) || softmax(s/T)) + w * CE(y, s).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd import runs
from kd.errors import KDError
from kd.losses import hinton_kd_loss, soft_cross_entropy
from kd.models import create_model
from kd.sources import Option, SourceContext, TargetSource


class NetworkTeacher(TargetSource):
    """A frozen teacher: eval mode always, no gradient, never in the optimiser."""

    name = "network"
    summary = ("online KD: a trained teacher run executed on every batch (CE on its probabilities; "
               "--temperature for Hinton's loss)")
    spec_arg = "RUN_DIR"
    needs_inputs = True
    options = (Option("temperature", "use Hinton's KD loss at temperature T (unset: CE on the teacher's probabilities)",
                      None, low=0.0, low_open=True),
               Option("hard_weight", "Hinton KD: weight w of the hard-label CE, (1 - w) on the soft term", 0.0,
                      low=0.0, high=1.0))

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "NetworkTeacher":
        model, affine = load_checked_teacher(cls.name, arg, ctx)
        return cls(model, ctx.num_classes, cls.value(ctx, "temperature"), cls.value(ctx, "hard_weight"), affine)

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "NetworkTeacher":
        if ctx.teacher_model is None:
            raise KDError("a network row needs a teacher model")
        return cls(ctx.teacher_model, ctx.num_classes)

    def __init__(self, teacher: nn.Module, num_classes: int, temperature: float | None = None,
                 hard_weight: float = 0.0, input_affine: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(num_classes)
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
        return {"kd": hinton_kd_loss(logits, t_logits, labels, self.temperature, self.hard_weight)}


def load_checked_teacher(name: str, arg: str, ctx: SourceContext):
    """The network of run directory ``arg``, checked against the data set, and its input affine map."""
    if not arg:
        raise KDError(f"teacher '{name}' needs a run directory: {name}:RUN_DIR (from `kd train-teacher`)")
    model, meta = load_teacher_network(arg)
    if ctx.dataset is not None and meta.get("dataset") != ctx.dataset:
        raise KDError(f"teacher run {arg} was trained on '{meta.get('dataset')}', not '{ctx.dataset}'")
    if meta["num_classes"] != ctx.num_classes:
        raise KDError(f"teacher run {arg} has K={meta['num_classes']} classes but the data set has {ctx.num_classes}")
    if ctx.info is not None and meta.get("preprocess", "matched") != ctx.info.preprocess:
        raise KDError(f"teacher run {arg} was trained with --preprocess {meta.get('preprocess', 'matched')}, this run "
                      f"uses {ctx.info.preprocess}: the teacher would see images prepared otherwise; use the same")
    affine = normalisation_affine(meta, ctx.info.mean, ctx.info.std) if ctx.info is not None else None
    return model, affine


def load_teacher_network(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a finished run's network from its summary.json and model.safetensors."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KDError(f"teacher run {run_dir} does not exist; train one with `kd train-teacher --out {run_dir}`")
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
