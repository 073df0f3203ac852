"""What `kd report` needs a network for: one pass over the training set (class-mean softmax) and one over the
test set (logits, penultimate features of a seeded subset), cached by a hash of the weights; the t-SNE."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from kd import runs
from kd.config import TrainConfig
from kd.data import load_dataset_of_run, make_loader
from kd.engine import predict, resolve_device
from kd.errors import KDError
from teachers.network import load_teacher_network
from teachers.proxy import class_mean_probabilities
from kd.app.report.inputs import CACHE_FORMAT, SUBSET_SEED, Source


# ---------------------------------------------------------------------------------------
# Running the network once (cached)


def penultimate(model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x -> (logits, penultimate features); see the module docstring for how each model provides them."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):  # timm
        def run(x):
            f = model.forward_features(x)
            return model.forward_head(f), model.forward_head(f, pre_logits=True).flatten(1)
        return run
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise KDError(f"{type(model).__name__} has no nn.Linear classifier layer to take penultimate features "
                      "from; the feature figure (t-SNE, class-centre distances) cannot be made for it")
    grabbed: list[torch.Tensor] = []
    linears[-1].register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))

    def run(x):
        grabbed.clear()
        logits = model(x)
        return logits, grabbed[-1].flatten(1)
    return run


def _weights_hash(run_dir: Path) -> str:
    h = hashlib.sha256()
    with open(run_dir / runs.WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@torch.inference_mode()
def compute_outputs(src: Source, data_root: str | None, device: str, points: int) -> dict[str, torch.Tensor]:
    """One pass over the training set (class-mean softmax) and one over the test set (logits, and the
    penultimate features of a seeded subset of ``points`` samples), un-augmented, eval mode."""
    model, meta = load_teacher_network(src.path)
    split = load_dataset_of_run(meta, data_root, src.path)  # a text run: encoded with its own tokenizer.json
    dev = resolve_device(device)
    model = model.to(dev).eval()
    forward = penultimate(model)
    cfg = TrainConfig(batch_size=512, augment=False, num_workers=0)
    k = int(meta["num_classes"])
    train_logits, train_labels = predict(model, split.train, split.info, device=dev)
    train_labels = train_labels.cpu().long()
    class_probs = class_mean_probabilities(train_logits.float().softmax(1).cpu(), train_labels, k, empty_rows=True)
    n_test = len(split.test)
    subset = torch.sort(torch.randperm(n_test, generator=torch.Generator().manual_seed(SUBSET_SEED))[:points]).values
    keep = torch.zeros(n_test, dtype=torch.bool)
    keep[subset] = True
    logits, labels, feats, feat_idx = [], [], [], []
    for x, y, idx in make_loader(split.test, split.info, cfg, train=False, device=dev):
        out, f = forward(x.to(dev))
        logits.append(out.float().cpu())
        labels.append(y.cpu().long())
        sel = keep[idx.cpu()]
        feats.append(f[sel.to(f.device)].float().cpu())
        feat_idx.append(idx.cpu()[sel])
    test_labels = torch.cat(labels)
    feat_idx_t = torch.cat(feat_idx).long()
    return {"train_class_probs": class_probs, "train_class_counts": torch.bincount(train_labels, minlength=k),
            "test_logits": torch.cat(logits), "test_labels": test_labels,
            "features": torch.cat(feats), "feature_index": feat_idx_t, "feature_labels": test_labels[feat_idx_t]}


def tsne(features: torch.Tensor) -> torch.Tensor:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    with threadpool_limits(1):  # BLAS / OpenMP threads slow scikit-learn's t-SNE down several-fold on shared cores
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=SUBSET_SEED,
                   n_jobs=1).fit_transform(features.double().numpy())
    return torch.from_numpy(np.ascontiguousarray(emb)).float()


def cached_outputs(src: Source, cache_dir: Path, data_root: str | None, device: str, points: int,
                   log: Callable[[str], None] | None = print) -> tuple[dict[str, torch.Tensor], bool]:
    """The run's outputs from ``cache_dir`` when there, else computed and added (never overwritten).
    Returns (tensors, True when they came from the cache)."""
    key = f"{_weights_hash(src.path)[:20]}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(src.summary['dataset']))}-n{points}"
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise KDError(f"cache file {path} is unreadable ({e}); delete it or give another --cache") from None
        if meta.get("format") != CACHE_FORMAT or "tsne" not in tensors:
            raise KDError(f"{path} is not a kd report cache file; delete it or give another --cache")
        return tensors, True
    if log:
        log(f"running {src.label} over {src.summary['dataset']} (train and test sets) ...")
    tensors = compute_outputs(src, data_root, device, points)
    if log:
        log(f"t-SNE of {len(tensors['features'])} test features of {src.label} ...")
    tensors["tsne"] = tsne(tensors["features"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    runs.save_safetensors(path, {k: v.contiguous() for k, v in tensors.items()},
                          {"format": CACHE_FORMAT, "run": str(src.path), "dataset": str(src.summary["dataset"]),
                           "points": str(points), "subset_seed": str(SUBSET_SEED)})
    return tensors, False
