"""The registry of model sources and architectures (in the spirit of timm's ``create_model``).

A spec names a source and what to build from it:

- ``torchvision:<arch>[+<head>]``, ``embcam:small-resnet[+<head>]``,
  ``timm:<name>[+<head>]``: the built-in sources. A checkpoint may name only these.
  ``<head>`` is the embedding head: ``identity`` (default: the pooled features) or
  ``linear:<d>``.
- ``torchscript:<file>`` and ``<package.module>:<factory>``: user code, built in
  :func:`embcam.models.build_model` and only from a spec the caller names.

torchvision CNNs and Swin become ``EmbeddingNet(backbone, pool, head)``: ``backbone`` is
torchvision's own feature modules under torchvision's own names (so a state dict key is
``backbone.`` + torchvision's key) and ends in an NCHW map, the default target layer (the
split point); ``pool`` is global average pooling plus what torchvision puts between its
pooling and its final Linear (ConvNeXt's LayerNorm2d, MobileNetV3's Linear + Hardswish),
under ``pool.`` + torchvision's key. torchvision's ViT stays torchvision's
``VisionTransformer`` with ``heads`` replaced by the embedding head. timm models are
``timm.create_model(name, pretrained=False, num_classes=0 or d)``.

Every model built here carries two plain attributes: ``embcam_target_layer`` (the layer
to explain by default; None = the split point) and ``embcam_reshape`` (None, ``"tokens"``
for a ViT's (B, 1 + h*w, C) tokens, ``"nhwc"`` for a channels-last map).
:class:`Architecture` also says how a weight file in the source's own names maps onto
the model (``classifiers``, ``prefixes``); :func:`embcam.models.load_model` applies it.
Nothing here downloads weights: every builder is called with ``weights=None`` /
``pretrained=False``.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN_SOURCES = ("torchvision", "embcam", "timm")
USER_SOURCES = ("torchscript:<file>", "<package.module>:<factory>")
HEADS = "'identity' or 'linear:<d>' (e.g. linear:128)"


@dataclass(frozen=True)
class Preprocessing:
    """How images reach the model: resize to size x size (no crop, so the heatmap
    covers the whole image), scale to [0, 1], normalise per channel."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 RGB batch (already resized) -> (B, 3, S, S) float32."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


# -- building blocks ------------------------------------------------------------------


class GeM(nn.Module):
    """Generalised-mean pooling, ``(mean x^p)^(1/p)`` over the spatial grid."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean((-2, -1)).pow(1.0 / self.p)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1))


class EmbeddingNet(nn.Module):
    """backbone (conv features) -> pool (to a K vector) -> head (to the embedding y).

    ``forward_features``/``forward_head`` split the network at the backbone's output,
    the default target layer. With ``GlobalAvgPool`` and an affine head the split is
    the paper's "simple network" and EmbeddingCAM needs no backward pass (eq. 17).
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.pool, self.head = backbone, pool, head

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.jit.export
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (same names, so the same state dict), here so that
    the small model does not import torchvision (about a second of every worker's start)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def small_resnet() -> nn.Sequential:
    """A 4-stage ResNet with one BasicBlock per stage, widths 16-32-64-128 (~0.3M params)."""

    def stage(cin: int, cout: int, stride: int) -> BasicBlock:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return BasicBlock(cin, cout, stride, downsample=down)

    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 16, 3, 2, 1, bias=False), bn1=nn.BatchNorm2d(16), relu=nn.ReLU(inplace=True),
        layer1=stage(16, 16, 1), layer2=stage(16, 32, 2), layer3=stage(32, 64, 2), layer4=stage(64, 128, 2),
    ))


def embedding_head(head: str, in_features: int) -> nn.Module:
    """``identity`` or ``linear:<d>`` on ``in_features`` inputs."""
    if head == "identity":
        return nn.Identity()
    return nn.Linear(in_features, head_width(head))


def head_width(head: str) -> int | None:
    """d of ``linear:<d>``, None for ``identity``; anything else is a ValueError."""
    if head == "identity":
        return None
    if head.startswith("linear:") and head[7:].isdigit() and int(head[7:]) > 0:
        return int(head[7:])
    raise ValueError(f"unknown embedding head {head!r}: use {HEADS}")


# -- the registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """One architecture of a built-in source.

    ``make(head, image_size)`` builds it randomly initialised. A weight file in the
    source's own names maps onto the model so: a key under a ``classifiers`` name (the
    source's final Linear) goes to the embedding head named by its value (left out when
    the head is ``identity``); any other key ``k`` becomes the first of
    ``prefix + k`` (``prefixes``) that the model has. ``legacy_key`` renames old keys."""

    source: str
    name: str
    make: Callable[[str, int], nn.Module]
    preprocessing: Preprocessing
    classifiers: dict[str, str] = field(default_factory=dict)
    prefixes: tuple[str, ...] = ("",)
    legacy_key: Callable[[str], str] | None = None

    @property
    def spec(self) -> str:
        return f"{self.source}:{self.name}"

    def build(self, head: str = "identity", image_size: int | None = None) -> nn.Module:
        head_width(head)  # a bad head fails before anything is built
        return self.make(head, image_size or self.preprocessing.size)


def resolve(spec: str) -> tuple[Architecture, str] | None:
    """(architecture, head) of a built-in spec, None for user code and TorchScript;
    a malformed or misspelled spec is a one-line ValueError."""
    source, sep, rest = spec.partition(":")
    if not sep or not rest:
        hint = _close_spec(spec.partition("+")[0])
        raise ValueError(f"model spec {spec!r} must look like 'torchvision:resnet50+linear:128'{hint}")
    if source not in BUILTIN_SOURCES:
        return None
    name, _, head = rest.partition("+")
    head_width(head or "identity")
    return architecture(source, name, spec), head or "identity"


def architecture(source: str, name: str, spec: str | None = None) -> Architecture:
    """The registered architecture ``source:name``; an unknown one is a ValueError that
    lists the source's architectures (and the closest names)."""
    if source == "timm":
        return _timm_architecture(name, spec or f"timm:{name}")
    known = _registry(source)
    if name in known:
        return known[name]
    listing = f"`embcam models {source}:` lists its {len(known)} architectures" if len(known) > 1 else (
        f"{source} has: {', '.join(known)}")
    raise ValueError(f"unknown architecture {name!r} in {spec or source + ':' + name!r}{_close(name, list(known))}; "
                     f"{listing}; {sources_line()}")


def unknown_source_message(spec: str) -> str:
    """The error for a spec whose source is neither built in nor an importable module."""
    source = spec.partition(":")[0]
    return (f"unknown model source {source!r} in {spec!r} (not a built-in source, and no module of "
            f"that name imports){source_suggestion(spec)}; {sources_line()}")


def source_suggestion(spec: str) -> str:
    """'; did you mean 'torchvision:resnet18'?' for a spec whose source is a misspelt
    built-in one (``torchvison:resnet18``); else ''."""
    source, _, rest = spec.partition(":")
    matches = difflib.get_close_matches(source, [*BUILTIN_SOURCES, "torchscript"], n=1, cutoff=0.6)
    return f"; did you mean {matches[0] + ':' + rest!r}?" if matches and matches[0] != source else ""


def sources_line() -> str:
    return f"sources: {', '.join(s + ':' for s in BUILTIN_SOURCES)}, {', '.join(USER_SOURCES)}"


def _close(word: str, names: list[str]) -> str:
    matches = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, matches))}?" if matches else ""


def _close_spec(name: str) -> str:
    """'; did you mean 'torchvision:resnet50'?' for a spec that forgot its source."""
    specs = {a.name: a.spec for source in ("embcam", "torchvision") for a in _registry(source).values()}
    matches = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(specs[m]) for m in matches)}?" if matches else ""


def _registry(source: str) -> dict[str, Architecture]:
    if source == "embcam":
        return {"small-resnet": _EMBCAM_SMALL_RESNET}
    return _torchvision_architectures()


def _with_defaults(model: nn.Module, target_layer: str | None, reshape: str | None) -> nn.Module:
    """The contract with EmbeddingCAM: where to explain by default and how to read it."""
    model.embcam_target_layer = target_layer
    model.embcam_reshape = reshape
    return model


def _small_resnet(head: str, image_size: int) -> nn.Module:
    return _with_defaults(EmbeddingNet(small_resnet(), GlobalAvgPool(), embedding_head(head, 128)), None, None)


_EMBCAM_SMALL_RESNET = Architecture("embcam", "small-resnet", _small_resnet, Preprocessing())


# -- torchvision -------------------------------------------------------------------------


def _children(net: nn.Module, *names: str) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))


def _resnet(net):  # resnet, wide_resnet, resnext
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return _children(net, *names), GlobalAvgPool(), net.fc.in_features


def _features(net):  # mobilenet_v2, efficientnet: features -> pool -> dropout, Linear
    return _children(net, "features"), GlobalAvgPool(), net.classifier[-1].in_features


def _mobilenet_v3(net):  # its Linear + Hardswish after the pool is part of the features
    pool = nn.Sequential(OrderedDict(avgpool=net.avgpool, flatten=nn.Flatten(), classifier=net.classifier[:3]))
    return _children(net, "features"), pool, net.classifier[3].in_features


def _regnet(net):
    return _children(net, "stem", "trunk_output"), GlobalAvgPool(), net.fc.in_features


def _convnext(net):  # LayerNorm2d + Flatten between the pool and the Linear
    pool = nn.Sequential(OrderedDict(avgpool=net.avgpool, classifier=net.classifier[:2]))
    return _children(net, "features"), pool, net.classifier[2].in_features


def _densenet(net):  # torchvision applies a ReLU after features (F.relu): so does the backbone
    return (nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU())), GlobalAvgPool(),
            net.classifier.in_features)


def _swin(net):  # features are NHWC; torchvision's norm then its permute give NCHW
    return _children(net, "features", "norm", "permute"), GlobalAvgPool(), net.head.in_features


_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_legacy_key(key: str) -> str:
    """torchvision's published DenseNet files name ``...denselayer1.norm.1.weight`` what
    the model calls ``...denselayer1.norm1.weight`` (torchvision renames them the same way)."""
    return _DENSENET_LEGACY.sub(r"\1\2", key)


@dataclass(frozen=True)
class _Family:
    pattern: str  # torchvision builder names (re.fullmatch)
    split: Callable | None  # torchvision model -> (backbone, pool, width); None: ViT
    classifier: str  # torchvision's final Linear
    legacy_key: Callable[[str], str] | None = None


_TORCHVISION_FAMILIES = (
    _Family(r"resnet\d+|wide_resnet\d+_2|resnext\d+_\d+x\d+d", _resnet, "fc"),
    _Family(r"mobilenet_v2|efficientnet_(b\d|v2_[sml])", _features, "classifier.1"),
    _Family(r"mobilenet_v3_(small|large)", _mobilenet_v3, "classifier.3"),
    _Family(r"regnet_[xy]_\w+", _regnet, "fc"),
    _Family(r"convnext_\w+", _convnext, "classifier.2"),
    _Family(r"densenet\d+", _densenet, "classifier", _densenet_legacy_key),
    _Family(r"swin_(v2_)?[tsb]", _swin, "head"),
    _Family(r"vit_[bhl]_\d+", None, "heads.head"),
)

_torchvision_cache: dict[str, Architecture] = {}


def _torchvision_architectures() -> dict[str, Architecture]:
    """Every torchvision classification builder of a family above, discovered from
    torchvision (imported here: a second that the small model does not need)."""
    if not _torchvision_cache:
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            family = next((f for f in _TORCHVISION_FAMILIES if re.fullmatch(f.pattern, name)), None)
            if family is not None:
                _torchvision_cache[name] = _torchvision_architecture(name, family)
    return _torchvision_cache


def _torchvision_architecture(name: str, family: _Family) -> Architecture:
    from torchvision.models import get_model_builder, get_model_weights

    builder = get_model_builder(name)
    if family.split is None:
        return Architecture("torchvision", name, lambda head, size: _vit(name, builder, head, size),
                            _torchvision_preprocessing(get_model_weights(name)),
                            {family.classifier: "heads"}, ("",))

    def make(head: str, image_size: int) -> nn.Module:
        backbone, pool, width = family.split(builder(weights=None))
        return _with_defaults(EmbeddingNet(backbone, pool, embedding_head(head, width)), None, None)

    return Architecture("torchvision", name, make, _torchvision_preprocessing(get_model_weights(name)),
                        {family.classifier: "head"}, ("backbone.", "pool."), family.legacy_key)


def _torchvision_preprocessing(weights) -> Preprocessing:
    """The eval crop size (and normalisation) of torchvision's DEFAULT weights."""
    settings = weights.DEFAULT.transforms.keywords  # functools.partial(ImageClassification, crop_size=...)
    return Preprocessing(int(settings["crop_size"]), tuple(settings.get("mean", IMAGENET_MEAN)),
                         tuple(settings.get("std", IMAGENET_STD)))


def _vit(name: str, builder, head: str, image_size: int) -> nn.Module:
    patch = int(name.rsplit("_", 1)[1])
    if image_size % patch:
        raise ValueError(f"torchvision:{name} needs an image size divisible by its patch size {patch}, "
                         f"got {image_size}")
    net = builder(weights=None, image_size=image_size)  # the position embedding follows the size
    net.heads = embedding_head(head, net.hidden_dim)
    last = len(net.encoder.layers) - 1  # its token output has a gradient only at the class token
    return _with_defaults(net, f"encoder.layers.encoder_layer_{last}.ln_1", "tokens")


# -- timm ----------------------------------------------------------------------------------


def _timm():
    if importlib.util.find_spec("timm") is None:
        raise ValueError("timm is not installed: pip install 'embcam[timm]'")
    import timm

    return timm


def _timm_architecture(name: str, spec: str) -> Architecture:
    timm = _timm()
    if not timm.is_model(name):  # also keeps hf-hub:/local-dir: names (a download, a config file) out
        names = timm.list_models()
        raise ValueError(f"unknown architecture {name!r} in {spec!r}{_close(name, names)}; timm has {len(names)} "
                         f"architectures (timm.list_models() lists them); {sources_line()}")
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    preprocessing = Preprocessing(int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std)) if cfg else Preprocessing()

    def make(head: str, image_size: int) -> nn.Module:
        options = {"pretrained": False, "num_classes": head_width(head) or 0}
        if image_size != preprocessing.size:
            try:  # ViT-like models size their position embedding for it
                return _timm_defaults(timm.create_model(name, img_size=image_size, **options))
            except TypeError as exc:  # a CNN refuses img_size (before building anything): any size works
                if "img_size" not in str(exc):
                    raise
        return _timm_defaults(timm.create_model(name, **options))

    return Architecture("timm", name, make, preprocessing, {c: c for c in classifiers}, ("",))


def _timm_defaults(model: nn.Module) -> nn.Module:
    """ViT-like: the last block's first norm, as tokens; NHWC models (Swin): the final
    norm; CNNs: the last stage of ``feature_info``."""
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "num_prefix_tokens") and blocks is not None and hasattr(blocks[-1], "norm1"):
        return _with_defaults(model, f"blocks.{len(blocks) - 1}.norm1", "tokens")
    last_stage = model.feature_info[-1]["module"] if getattr(model, "feature_info", None) else None
    if getattr(model, "output_fmt", "NCHW") == "NHWC":  # a str or timm's str-valued Format
        return _with_defaults(model, "norm" if isinstance(getattr(model, "norm", None), nn.Module) else last_stage,
                              "nhwc")
    return _with_defaults(model, last_stage, None)


# -- listing ---------------------------------------------------------------------------------


class MetaParameters(TorchFunctionMode):
    """Parameters and buffers on the meta device: builds any model with no memory and
    no weight init, to read its structure. ``torch.arange`` and ``torch.tensor`` stay
    real, since builders compute settings with them (torchvision's RegNet widths)."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.eye}
    INIT = {"normal_", "uniform_", "fill_", "zero_", "erfinv_", "mul_", "add_", "clamp_", "copy_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif getattr(func, "__name__", "") in self.INIT and args and getattr(args[0], "is_meta", False):
            return args[0]  # weight init fills values a meta tensor does not have (and keeps its shape)
        return func(*args, **kwargs)


def build_on_meta(arch: Architecture, head: str = "identity", image_size: int | None = None) -> nn.Module:
    """``arch.build(...)`` with meta parameters (its structure only: no values)."""
    with MetaParameters():
        return arch.build(head, image_size)


@dataclass(frozen=True)
class Description:
    spec: str
    target_layer: str | None
    input_size: int
    reshape: str | None
    width: int  # the embedding width with +identity


def describe(arch: Architecture) -> Description:
    """The defaults a spec builds with, read off a meta build. The target layer is named as
    ``--target-layer`` would name it: the split point (None) is the backbone's last module."""
    model = build_on_meta(arch, "linear:1")
    head = next(iter(arch.classifiers.values()), "head")
    return Description(arch.spec, model.embcam_target_layer or split_layer(model), arch.preprocessing.size,
                       model.embcam_reshape, model.get_submodule(head).in_features)


def split_layer(model: nn.Module) -> str:
    """The module whose output is the split point (``forward_features``): the last module of
    an ``EmbeddingNet``'s sequential backbone (``backbone.layer4`` of a ResNet), else ``backbone``."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Sequential) and len(backbone):
        return f"backbone.{list(backbone.named_children())[-1][0]}"
    return "backbone"


def _natural(name: str) -> list:
    """resnet18 < resnet34 < resnet101."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_table(pattern: str = "") -> str:
    """``embcam models``: one line per registered spec containing ``pattern`` (a
    ``timm:<name>`` pattern describes that timm model), then the other sources."""
    registered = sorted(_torchvision_architectures().values(), key=lambda a: _natural(a.name))
    archs = [a for a in [_EMBCAM_SMALL_RESNET, *registered] if pattern in a.spec]
    if pattern.startswith("timm:"):
        archs = [architecture("timm", pattern[5:], pattern)]
    if not archs:
        return f"no registered spec contains {pattern!r}; `embcam models` lists them all"
    rows = [("spec", "default target layer", "size", "reshape", "width")]
    for d in map(describe, archs):
        rows.append((d.spec, d.target_layer or "backbone", str(d.input_size), d.reshape or "-", str(d.width)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.rjust(w) if i in (2, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    timm_line = ("timm:<name>: any of timm.list_models(); `embcam models timm:<name>` shows its defaults"
                 if importlib.util.find_spec("timm") else "timm:<name>: not installed (pip install 'embcam[timm]')")
    return "\n".join(lines + [
        "", "heads: +identity (default; width above) or +linear:<d>; size: the preprocessing size (--image-size; "
        "a checkpoint saved by embcam carries its own)",
        timm_line, "your own code: torchscript:<file>, <package.module>:<factory> (named with --model only)"])
