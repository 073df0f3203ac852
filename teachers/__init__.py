"""Target sources, one module per kind: onehot, smoothing (LS), lspp (LS++ and its trainer)."""
from __future__ import annotations

from kd.errors import KDError
from kd.sources import TargetSource

DEFAULT_ALPHA = 0.1


def label_source(method: str, num_classes: int, alpha: float | None = None) -> TargetSource:
    """The source a teacher is trained with: ``onehot``, ``ls`` or ``lspp``."""
    from teachers.lspp import LSPPLoss
    from teachers.onehot import OneHot
    from teachers.smoothing import LabelSmoothing

    a = DEFAULT_ALPHA if alpha is None else float(alpha)
    if method == "onehot":
        return OneHot(num_classes)
    if method == "ls":
        return LabelSmoothing(num_classes, a)
    if method == "lspp":
        return LSPPLoss(num_classes, a)
    raise KDError(f"unknown method '{method}'; choose onehot, ls or lspp")


SPEC_HELP = (
    "onehot | ls[:ALPHA] | proxy:PATH (a c_matrix.safetensors or an LS++ run) | "
    "network:RUN_DIR (online KD) | cached:FILE (from `kd teacher cache`)"
)


def teacher_from_spec(spec: str, info, num_train: int | None = None, *, alpha: float | None = None,
                      temperature: float | None = None, hard_weight: float = 0.0) -> TargetSource:
    """Parse a teacher SPEC into a source checked against the data set described by ``info``."""
    kind, _, arg = spec.partition(":")
    k = info.num_classes
    if kind in ("onehot", "ls") and (kind == "ls" or not arg):
        if arg:
            try:
                alpha = float(arg)
            except ValueError:
                raise KDError(f"bad teacher '{spec}': ls:ALPHA needs a number, e.g. ls:0.1") from None
            if not 0 < alpha < 1:
                raise KDError(f"bad teacher '{spec}': alpha must lie in (0, 1)")
        return label_source(kind, k, alpha)
    if kind == "proxy" and arg:
        from teachers.proxy import load_proxy

        src = load_proxy(arg, alpha=alpha, num_classes=k)
        ds = src.meta.get("dataset")
        if ds and ds != info.name:
            raise KDError(f"{arg}: the C-matrix was made on data set '{ds}', not '{info.name}'")
        return src
    if kind == "network" and arg:
        from teachers.network import NetworkTeacher, load_teacher_network, normalisation_affine

        model, meta = load_teacher_network(arg)
        if meta.get("dataset") != info.name:
            raise KDError(f"teacher run {arg} was trained on '{meta.get('dataset')}', not '{info.name}'")
        if meta["num_classes"] != k:
            raise KDError(f"teacher run {arg} has K={meta['num_classes']} classes but the data set has {k}")
        return NetworkTeacher(model, k, temperature, hard_weight, normalisation_affine(meta, info.mean, info.std))
    if kind == "cached" and arg:
        from teachers.cached import load_cache

        return load_cache(arg, info.name, num_train, k)
    raise KDError(f"unknown teacher '{spec}'; use {SPEC_HELP}")
