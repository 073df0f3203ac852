"""The table of target sources: one module per source, one line per source here.

``SOURCES`` maps a name to its :class:`kd.sources.TargetSource` subclass. The CLI's choices
and help, the SPEC parser, `kd train-teacher --method` and the `kd bench` rows are all read
from it. Installed packages add sources through the entry-point group ``proxykd.sources``
(name = "package.module:ClassName"); they are read once, when this package is imported, and
treated exactly like the built-in ones.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from kd.errors import KDError
from kd.sources import Option, SourceContext, TargetSource
from teachers.cached import CachedTeacher
from teachers.focal import AdaptiveFocalLoss, FocalLoss
from teachers.lspp import LSPPLoss
from teachers.lspp_ablation import LSPPCrossEntropy, LSPPSymmetricCrossEntropy
from teachers.mbls import MarginLabelSmoothing
from teachers.network import NetworkTeacher
from teachers.ols import OnlineLabelSmoothing
from teachers.onehot import OneHot
from teachers.proxy import DEFAULT_ALPHA, ProxyTeacher
from teachers.smoothing import LabelSmoothing
from teachers.tfkd import TfKDRegularization, TfKDSelf
from teachers.zipf import ZipfLabelSmoothing

ENTRY_POINT_GROUP = "proxykd.sources"

BUILTIN: tuple[type[TargetSource], ...] = (
    OneHot, LabelSmoothing, LSPPLoss, ProxyTeacher, NetworkTeacher, CachedTeacher,   # the spine
    LSPPCrossEntropy, LSPPSymmetricCrossEntropy,                                      # LS++'s loss ablation
    TfKDRegularization, TfKDSelf, OnlineLabelSmoothing, ZipfLabelSmoothing,           # the paper's comparisons
    MarginLabelSmoothing, FocalLoss, AdaptiveFocalLoss,
)


def _discover() -> dict[str, type[TargetSource]]:
    """Built-in sources, then those installed packages declare under ``proxykd.sources``."""
    table = {cls.name: cls for cls in BUILTIN}
    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if seen.get(ep.name) == ep.value:
            continue  # the same distribution found twice on sys.path
        if ep.name in table:
            warnings.warn(f"source '{ep.name}' ({ep.value}) reuses a name already taken; ignored")
            continue
        seen[ep.name] = ep.value
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break the built-in sources
            warnings.warn(f"source '{ep.name}' ({ep.value}) could not be loaded: {type(e).__name__}: {e}")
            continue
        if not (isinstance(cls, type) and issubclass(cls, TargetSource)):
            warnings.warn(f"source '{ep.name}' ({ep.value}) is not a kd.sources.TargetSource subclass; ignored")
            continue
        table[ep.name] = cls
    return table


SOURCES: dict[str, type[TargetSource]] = _discover()


def option_table(sources=None) -> dict[str, list[tuple[type[TargetSource], Option]]]:
    """Option name -> the sources declaring it, with each one's declaration: CLI flags and YAML keys come from here.

    An option declared by several sources must have one type (it is one flag); a plug-in that declares a
    known name with another type has that option ignored, with a warning.
    """
    table: dict[str, list[tuple[type[TargetSource], Option]]] = {}
    for cls in (SOURCES.values() if sources is None else sources):
        for opt in cls.options:
            uses = table.setdefault(opt.name, [])
            if uses and uses[0][1].type is not opt.type:
                warnings.warn(f"source '{cls.name}' declares option '{opt.name}' as {opt.type.__name__}, but "
                              f"'{uses[0][0].name}' declares it as {uses[0][1].type.__name__}; ignored for '{cls.name}'")
                continue
            uses.append((cls, opt))
    return table


def option_names() -> tuple[str, ...]:
    """Every source option's name: the config keys a run may carry besides TrainConfig's own fields."""
    return tuple(option_table())


def check_options(source_name: str, options: dict, label_only: bool = False) -> None:
    """Refuse (one line) options that source ``source_name`` does not take, before a run starts."""
    _lookup(source_name, label_only).given_options(options)


def declared_options(source_name: str, options: dict) -> dict:
    """The options among ``options`` that source ``source_name`` declares (a run directory's config.yaml
    from before sources declared their options lists every option key; resuming it keeps its source's)."""
    cls = SOURCES.get(source_name)
    names = {o.name for o in cls.options} if cls is not None else set()
    return {k: v for k, v in options.items() if k in names}


def row_table() -> dict[str, tuple[type[TargetSource], dict]]:
    """`kd bench` row name -> (its source, the settings its stand-in is built with), every source's rows."""
    return {row: (cls, opts) for cls in SOURCES.values() for row, opts in cls.bench_rows().items()}


def bench_rows() -> list[str]:
    """`kd bench`'s rows: ``bare`` (a hand-written loop, the floor), then the rows of every source."""
    return ["bare", *row_table()]


def label_methods() -> list[str]:
    """Sources built from labels alone: what `kd train-teacher --method` accepts."""
    return [name for name, cls in SOURCES.items() if cls.label_only]


def spec_forms() -> list[str]:
    """Each source's SPEC as a user types it: ``onehot``, ``ls[:ALPHA]``, ``proxy:PATH``, ..."""
    out = []
    for name, cls in SOURCES.items():
        arg = cls.spec_arg
        out.append(name if not arg else (f"{name}[:{arg[1:-1]}]" if arg.startswith("[") else f"{name}:{arg}"))
    return out


def spec_help() -> str:
    return " | ".join(spec_forms())


def _lookup(name: str, label_only: bool) -> type[TargetSource]:
    cls = SOURCES.get(name)
    if cls is None or (label_only and not cls.label_only):
        choices = label_methods() if label_only else spec_forms()
        what = "method" if label_only else "teacher"
        raise KDError(f"unknown {what} '{name}'; choose {' | '.join(choices)}")
    return cls


def make_source(name: str, num_classes: int, *, arg: str = "", dataset: str | None = None,
                num_train: int | None = None, info=None, label_only: bool = False, model=None, c_matrix=None,
                logits=None, **options) -> TargetSource:
    """Build source ``name`` for K = ``num_classes``; ``options`` are alpha, temperature, hard_weight, ...

    ``arg`` is what follows "NAME:" in a SPEC (a path for proxy, network and cached). With
    ``label_only`` only the sources that train from labels alone are accepted. In-memory artifacts
    take the place of a path: ``model=`` a network (``network``, ``tfkd-self``; frozen in place),
    ``c_matrix=`` a K x K C-matrix (``proxy``), ``logits=`` N x K teacher outputs (``cached``).
    """
    cls = _lookup(name, label_only)
    given = {"model": model, "c_matrix": c_matrix, "logits": logits}
    takes = {"network": "model", "tfkd-self": "model", "proxy": "c_matrix", "cached": "logits"}
    for what, value in given.items():
        if value is not None and takes.get(name) != what:
            users = " or ".join(f"'{n}'" for n, w in takes.items() if w == what)
            raise KDError(f"{what}= is an in-memory artifact of {users} sources, not of '{name}'; drop it")
    if arg and any(v is not None for v in given.values()):
        raise KDError(f"source '{name}' was given both a path ({arg}) and an in-memory artifact; give one")
    ctx = SourceContext(int(num_classes), dataset, num_train, cls.given_options(options), info, teacher_model=model,
                        artifacts={k: v for k, v in given.items() if v is not None and k != "model"})
    return cls.from_spec(arg, ctx)


def teacher_from_spec(spec: str, info, num_train: int | None = None, **options) -> TargetSource:
    """Parse a teacher SPEC ("NAME" or "NAME:ARG") into a source checked against the data set ``info``."""
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise KDError(f"unknown teacher '{spec}'; use {spec_help()}")
    return make_source(name, info.num_classes, arg=arg, dataset=info.name, num_train=num_train, info=info, **options)


def label_source(method: str, num_classes: int, alpha: float | None = None) -> TargetSource:
    """The source a teacher network is trained with (``onehot``, ``ls``, ``lspp``, ...)."""
    return make_source(method, num_classes, label_only=True, alpha=alpha)


__all__ = ["SOURCES", "bench_rows", "row_table", "DEFAULT_ALPHA", "make_source", "teacher_from_spec", "label_source", "label_methods",
           "spec_help", "option_table", "option_names", "check_options", "SourceContext", "TargetSource", "Option"]
