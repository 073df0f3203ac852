"""Models by name: the paper's small-input nets, or any timm / torchvision classifier.

Registered names (``lenet``, ``mlp``, ``resnet18`` ... ``resnet101``, ``shufflenetv2``,
``densenet121``) are small-input variants: a 3x3 stride-1 stem and no stem max-pool, as the
paper used on 32x32 and 64x64 images. ``resnet8`` and ``resnet20`` are He et al.'s CIFAR nets. ``timm:NAME`` and ``torchvision:NAME`` take a library
model as it is; a bare name not registered here is looked up in timm, then torchvision.
:func:`build_model` adds the weights a run starts from: a file (``--init``) or the library's own
pretrained weights (``--pretrained``, timm and torchvision names only).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kd.checkpoints import Checkpoint, load_into, read_checkpoint, sha256
from kd.data.text import PAD_ID, check_hf_dir, first_line, hf_path, quiet_transformers, transformers_module
from kd.errors import KDError


class LeNet(nn.Module):
    """LeNet-5: two 5x5 convolutions with max-pooling, then 120-84-K fully connected layers.

    On 32 x 32 inputs (and larger) the convolutions are unpadded, as in LeCun et al. 1998 and the
    paper authors' code (16 x 5 x 5 features for 32 x 32); smaller inputs get a 2-pixel zero border
    in the first convolution (28 x 28 then gives the same 16 x 5 x 5), 8 x 8 inputs in both.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28):
        super().__init__()
        pad1 = 2 if image_size < 32 else 0
        pad2 = 2 if image_size < 16 else 0  # keep 8x8 inputs from vanishing
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(n, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A two-hidden-layer perceptron over flattened inputs (tabular data, or images flattened)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class _CifarBlock(nn.Module):
    """A basic residual block; a strided or widening shortcut is option A of He et al. 2016 (the
    input subsampled by the stride, new channels zero): no parameters, as in their CIFAR nets."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:
            short = nn.functional.pad(short, (0, 0, 0, 0, 0, self.extra))
        return torch.relu(out + short)


class CifarResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet with 6n + 2 layers: a 3x3 convolution to 16 channels, three
    stages of n basic blocks (16, 32, 64 channels; strides 1, 2, 2), global average pool, linear.
    n = 1 is ResNet-8 (75k parameters on 1-channel input), n = 3 ResNet-20 (0.27M): teachers a CPU can train."""

    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise KDError(f"a CIFAR ResNet has 6n + 2 layers (8, 14, 20, 32, ...), not {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        blocks, c = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_CifarBlock(c, width, stride if i == 0 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    return lambda in_channels, num_classes, image_size: CifarResNet(depth, in_channels, num_classes)


def _small_stem_resnet(arch: str) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        import torchvision

        m = getattr(torchvision.models, arch)(num_classes=num_classes)
        m.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
        return m

    return build


def _small_shufflenetv2(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision

    m = torchvision.models.shufflenet_v2_x1_0(num_classes=num_classes)
    m.conv1 = nn.Sequential(
        nn.Conv2d(in_channels, 24, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True)
    )
    m.maxpool = nn.Identity()
    return m


def _small_densenet121(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision

    m = torchvision.models.densenet121(num_classes=num_classes)
    m.features.conv0 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    m.features.pool0 = nn.Identity()
    return m


def _lenet(in_channels, num_classes, image_size):
    return LeNet(in_channels, num_classes, image_size)


def _mlp(in_channels, num_classes, image_size):
    return MLP(in_channels * image_size * image_size, num_classes)


def _fasttext(in_channels, num_classes, image_size):
    """Text: ``in_channels`` is the number of token ids (a text set's channels are its vocabulary)."""
    return FastText(in_channels, num_classes)


def _text_transformer(in_channels, num_classes, image_size):
    """Text: ``in_channels`` token ids, ``image_size`` positions (the data set's maximum sequence length)."""
    return TextTransformer(in_channels, num_classes, image_size)


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet": _lenet,
    "mlp": _mlp,
    "resnet8": _cifar_resnet(8),
    "resnet20": _cifar_resnet(20),
    "resnet18": _small_stem_resnet("resnet18"),
    "resnet34": _small_stem_resnet("resnet34"),
    "resnet50": _small_stem_resnet("resnet50"),
    "resnet101": _small_stem_resnet("resnet101"),
    "shufflenetv2": _small_shufflenetv2,
    "densenet121": _small_densenet121,
    "fasttext": _fasttext,
    "text-transformer": _text_transformer,
}


def _timm_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise KDError(f"unknown timm model '{name}'; list names with `python -c \"import timm; print(timm.list_models())\"`")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _torchvision_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise KDError(f"unknown torchvision model '{name}'; see torchvision.models.list_models()")
    if in_channels != 3:
        raise KDError(f"torchvision model '{name}' takes 3 input channels, the data set has {in_channels}; use timm:{name} or a registered model")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a classifier by name with ``num_classes`` outputs for ``in_channels`` x size x size inputs.

    Text models (``fasttext``, ``text-transformer``, ``hf:DIR``) read token ids: ``in_channels`` is then the
    number of token ids and ``image_size`` the longest sequence (what a text set's DatasetInfo holds)."""
    if name in MODELS:
        return MODELS[name](in_channels, num_classes, image_size)
    if name.startswith("hf:"):
        return hf_classifier(hf_path(name), num_classes)
    if name.startswith("timm:"):
        return _timm_model(name[5:], in_channels, num_classes)
    if name.startswith("torchvision:"):
        return _torchvision_model(name[12:], in_channels, num_classes)
    import timm
    import torchvision

    if timm.is_model(name):
        return _timm_model(name, in_channels, num_classes)
    if name in torchvision.models.list_models():
        return _torchvision_model(name, in_channels, num_classes)
    raise KDError(
        f"unknown model '{name}'; use one of {', '.join(MODELS)}, or timm:NAME / torchvision:NAME / hf:DIR"
    )


def library_of(name: str) -> str | None:
    """'timm' or 'torchvision' for a model name those libraries build, None for proxykd's registered nets."""
    if name in MODELS:
        return None
    if name.startswith("timm:"):
        return "timm"
    if name.startswith("torchvision:"):
        return "torchvision"
    import timm
    import torchvision

    if timm.is_model(name):
        return "timm"
    if name in torchvision.models.list_models():
        return "torchvision"
    return None


def _bare(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith(("timm:", "torchvision:")) else name


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on port 443 within ``timeout`` seconds (a download would otherwise retry for a minute)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _missing_weights(what: str, where: str, why: str) -> KDError:
    return KDError(f"{what} are not in the local cache ({where}) and {why}; offline, download the file elsewhere "
                   f"and pass it with --init FILE (init= in Python)")


def _timm_pretrained(name: str, in_channels: int) -> Checkpoint:
    """timm's pretrained weights through timm's own loader, from the local cache when the file is there."""
    import timm

    cfg = dict(timm.create_model(name, pretrained=False).pretrained_cfg or {})
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url and not cfg.get("file"):
        raise KDError(f"timm has no pretrained weights for '{name}'; drop --pretrained or give --init FILE")
    files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    local = None
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        cache = constants.HF_HUB_CACHE
        local = next((p for f in files if isinstance(p := try_to_load_from_cache(hub_id, f), str)), None)
        what = f"timm's pretrained weights for '{name}' (Hugging Face hub '{hub_id}', {' or '.join(files)})"
        host = "huggingface.co"
    else:
        cache = str(Path(torch.hub.get_dir()) / "checkpoints")
        candidate = Path(cache) / os.path.basename(url or "")
        local = str(candidate) if url and candidate.is_file() else None
        what = f"timm's pretrained weights for '{name}' ({os.path.basename(url or '')})"
        host = (url or "").split("/")[2] if url and "//" in url else "github.com"
    overlay = {"file": local} if local else None
    if local is None:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "") or not _reachable(host):
            raise _missing_weights(what, cache, f"{host} cannot be reached")
    try:
        model = timm.create_model(name, pretrained=True, in_chans=in_channels, pretrained_cfg_overlay=overlay)
    except Exception as e:  # timm and huggingface_hub raise their own error types for a failed fetch
        raise _missing_weights(what, cache, f"could not be fetched ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None
    return Checkpoint(Path(local or f"timm:{name} (pretrained)"), model.state_dict(), None)


def _torchvision_pretrained(name: str) -> Checkpoint:
    """torchvision's default pretrained weights, from TORCH_HOME's cache (fetched there when reachable), read
    with weights_only like every other file."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise KDError(f"torchvision has no pretrained weights for '{name}'; drop --pretrained or give --init FILE") \
            from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(weights.url)
    if not file.is_file():
        what = f"torchvision's pretrained weights for '{name}' ({file.name})"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(file), progress=False)
        except Exception as e:  # urllib's URLError, OSError, a hash mismatch
            raise _missing_weights(what, str(folder), f"could not be downloaded ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return read_checkpoint(file)


def pretrained_checkpoint(name: str, in_channels: int = 3) -> Checkpoint:
    """The library's own pretrained weights for a timm or torchvision model name, at the library's number of classes."""
    library = library_of(name)
    if library is None:
        raise KDError(f"--pretrained takes the library's weights of timm:NAME or torchvision:NAME models; '{name}' is "
                      f"proxykd's own network: start it from a file with --init FILE")
    if library == "timm":
        return _timm_pretrained(_bare(name), in_channels)
    if in_channels != 3:
        raise KDError(f"torchvision's pretrained '{_bare(name)}' takes 3 input channels, the data set has {in_channels}; "
                      f"use timm:{_bare(name)}, whose loader adapts the first convolution")
    return _torchvision_pretrained(_bare(name))


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, *, init: str | None = None,
                pretrained: bool = False, reset_head: bool = False, log: Callable[[str], None] | None = None
                ) -> tuple[nn.Module, dict[str, Any]]:
    """A model by name with the weights a run starts from: ``init`` (a file, read without running its code; see
    :mod:`kd.checkpoints`) or the library's ``pretrained`` weights, loaded strictly; ``reset_head`` keeps a
    fresh classifier for ``num_classes``. Returns the model and what to record in the run's config
    (the file, its SHA-256, which entry of the file held the weights)."""
    if init and pretrained:
        raise KDError("--init FILE and --pretrained both give starting weights; choose one")
    if reset_head and not (init or pretrained):
        raise KDError("--reset-head re-initialises the classifier of --init or --pretrained weights; give one of them")
    model = create_model(name, num_classes, in_channels, image_size)
    record: dict[str, Any] = {}
    if init:
        ckpt = read_checkpoint(init)
        record = {"init": str(init), "init_sha256": sha256(init), **({"init_key": ckpt.key} if ckpt.key else {})}
    elif pretrained:
        ckpt = pretrained_checkpoint(name, in_channels)
        record = {"pretrained": True}
    else:
        return model, record
    reset = load_into(model, ckpt, reset_head=reset_head, num_classes=num_classes)
    if log is not None:
        log(f"weights: {ckpt.describe()}" + (f", classifier re-initialised for {num_classes} classes ({', '.join(reset)})"
                                             if reset_head else ""))
    return model, record


# ---------------------------------------------------------------------------------------
# Text models: they read token ids (kd.data.text), padding found by its id


class FastText(nn.Module):
    """fastText's classifier (Joulin et al. 2017): the mean of the token embeddings (padding left out), then a
    linear layer."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64, pad_id: int = PAD_ID):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=pad_id)
        nn.init.uniform_(self.embedding.weight, -1.0 / dim, 1.0 / dim)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(x))


class TextTransformer(nn.Module):
    """A small pre-norm transformer encoder: token and learned position embeddings, ``layers`` encoder layers
    with the padding masked, a final layer norm, the mean over real tokens, then a linear layer."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int = 256, dim: int = 64, heads: int = 4,
                 layers: int = 2, dropout: float = 0.1, pad_id: int = PAD_ID):
        super().__init__()
        self.pad_id, self.max_length = pad_id, max_length
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.max_length:
            raise KDError(f"a batch of {x.shape[1]} tokens per sample reached a text-transformer of "
                          f"{self.max_length} positions; the data set's collate cuts sequences at its max_length")
        pad = x == self.pad_id
        h = self.embedding(x) + self.position(torch.arange(x.shape[1], device=x.device))
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


class HFClassifier(nn.Module):
    """A Hugging Face sequence-classification model as a proxykd model: B x L token ids in (padding marked by
    ``pad_id``, turned into the attention mask), B x K logits out."""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, int(pad_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, attention_mask=(x != self.pad_id).long()).logits


def hf_classifier(directory: Path, num_classes: int) -> HFClassifier:
    """The directory's sequence-classification model with ``num_classes`` outputs (a classifier of another
    size is re-initialised), loaded from local files only."""
    transformers = transformers_module()
    directory = Path(directory).expanduser().resolve()
    check_hf_dir(directory)
    try:
        with quiet_transformers(transformers):
            tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(directory), num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise KDError(f"cannot load hf:{directory} as a sequence classifier ({first_line(e)})") from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = int(pad)  # models that pool the last real token look for it
    return HFClassifier(model, int(pad))
