"""Embedding models from a spec string, their target layers and their preprocessing.

A spec names an architecture; creation is one function, :func:`load_model`:

- ``torchvision:<arch>[+<head>]``: a torchvision backbone (resnet18/34/50/101,
  mobilenet_v2) without its classifier, global average pooling, then an embedding
  head: ``identity`` (the pooled features) or ``linear:<d>``. Example:
  ``torchvision:resnet50+linear:128``. Weights are never downloaded: they come from
  a checkpoint or stay random.
- ``embcam:small-resnet[+<head>]``: a small 4-stage ResNet (BasicBlocks, widths
  16-32-64-128) for CPU training and the bundled demo model.
- ``torchscript:<path>``: a TorchScript file whose module exports
  ``forward_features`` and ``forward_head`` (see :func:`export_torchscript`).
- ``<package.module>:<factory>``: user code, imported only because the user named
  it; ``factory()`` returns an ``nn.Module``.

Checkpoints are data, never code: they are read with ``torch.load(...,
weights_only=True)`` (tensors and plain containers; anything else is refused with a
one-line ValueError). A checkpoint written by :func:`save_checkpoint` also records the
spec and the preprocessing, so ``load_model(checkpoint=path)`` alone rebuilds the model;
the recorded spec may name only a built-in architecture (``torchvision:``, ``embcam:``).
User code and TorchScript run only from a spec the caller names (``spec=``, ``--model``).
"""
from __future__ import annotations

import importlib
import io
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
BUILTIN_SOURCES = ("torchvision", "embcam", "timm")  # timm: reserved, no timm model is built yet


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


def _torchvision_backbone(arch: str) -> tuple[nn.Sequential, int]:
    import torchvision  # here: a second of import that the small model does not need

    net = getattr(torchvision.models, arch)(weights=None)
    if arch.startswith("resnet"):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), net.fc.in_features
    return net.features, net.last_channel  # mobilenet_v2


def _head(spec: str, in_features: int) -> nn.Module:
    if spec == "identity":
        return nn.Identity()
    if spec.startswith("linear:") and spec[7:].isdigit() and int(spec[7:]) > 0:
        return nn.Linear(in_features, int(spec[7:]))
    raise ValueError(f"unknown embedding head {spec!r}: use 'identity' or 'linear:<d>' (e.g. linear:128)")


def build_model(spec: str) -> nn.Module:
    """Create the (randomly initialised) model a spec names. See the module docstring."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"model spec {spec!r} must look like 'torchvision:resnet50+linear:128'")
    if kind in BUILTIN_SOURCES:
        arch, _, head = rest.partition("+")
        if kind == "embcam" and arch == "small-resnet":
            backbone, width = small_resnet(), 128
        elif kind == "torchvision" and arch in TORCHVISION_ARCHS:
            backbone, width = _torchvision_backbone(arch)
        else:
            known = [f"torchvision:{a}" for a in TORCHVISION_ARCHS] + ["embcam:small-resnet"]
            raise ValueError(f"unknown architecture in {spec!r}; known: {', '.join(known)}")
        return EmbeddingNet(backbone, GlobalAvgPool(), _head(head or "identity", width))
    if kind == "torchscript":
        return torch.jit.load(rest, map_location="cpu")
    module = importlib.import_module(kind)  # user code: only because the user named it
    model = getattr(module, rest)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_target_layer(model: nn.Module) -> str | None:
    """The layer to explain when none is named. ``None`` means the split point of a
    model with ``forward_features``/``forward_head`` (the backbone output: layer4 of
    a ResNet, the last feature block of MobileNetV2); otherwise ``layer4``/``features``."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return None
    for name in ("layer4", "features"):
        if hasattr(model, name):
            return name
    raise ValueError("cannot guess a target layer for this model: name one (e.g. target_layer='layer4')")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule with dotted ``name``; a wrong name lists the valid candidates."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    candidates = [n for n in modules if n and n.count(".") <= 2]
    raise ValueError(f"no layer named {name!r} in {type(model).__name__}; candidates: {', '.join(candidates)}")


def save_checkpoint(path: str | Path, model: nn.Module, spec: str, preprocessing: Preprocessing,
                    **metadata: str | int | float) -> None:
    """Save weights with the spec and preprocessing, loadable with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"spec": spec, "preprocessing": asdict(preprocessing), "metadata": metadata,
                "state_dict": state}, path)


def load_model(spec: str | None = None, checkpoint: str | Path | None = None,
               image_size: int | None = None) -> tuple[nn.Module, Preprocessing, str]:
    """Build a model from ``spec`` and/or an embcam checkpoint; returns (model in eval
    mode, its preprocessing, the resolved spec). A plain state dict works too."""
    preprocessing = Preprocessing()
    state = None
    if checkpoint is not None:
        state, stored_spec, stored_preprocessing = _read_checkpoint(checkpoint)
        if not spec and stored_spec is not None:
            spec = _checkpoint_spec(stored_spec, checkpoint)
        preprocessing = stored_preprocessing or preprocessing
    if not spec:
        raise ValueError("no model: give a spec (e.g. torchvision:resnet50+linear:128) or an embcam checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # without a checkpoint every worker must still build the same weights
        model = build_model(spec)
    if state is not None:
        _load_state(model, state, checkpoint)
    if image_size is not None:
        preprocessing = Preprocessing(image_size, preprocessing.mean, preprocessing.std)
    return model.eval(), preprocessing, spec


def _read_checkpoint(checkpoint: str | Path) -> tuple[dict, str | None, Preprocessing | None]:
    """(state dict, recorded spec, recorded preprocessing) of a state dict or an embcam checkpoint."""
    if "://" in str(checkpoint):  # object storage: read through pyarrow's filesystems
        from .fetch import ReadLimits, read_bytes
        source = io.BytesIO(read_bytes(str(checkpoint), ReadLimits(max_bytes=16 << 30, read_timeout=600)))
    else:
        source = open(checkpoint, "rb")  # a missing or unreadable path fails here, with its own message
    with source, warnings.catch_warnings():  # "dispatching to torch.jit.load": not with weights_only, refused below
        warnings.filterwarnings("ignore", "'torch.load' received a zip file that looks like a TorchScript")
        try:
            blob = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and torch raise many types, OSError included
            raise ValueError(f"checkpoint {checkpoint} is not a weights-only PyTorch file "
                             f"({_short_reason(exc)})") from None
    spec = preprocessing = None
    if isinstance(blob, dict) and "state_dict" in blob:
        spec = blob.get("spec")
        if spec is not None and not isinstance(spec, str):
            raise ValueError(f"checkpoint {checkpoint}: its 'spec' must be a string, not {type(spec).__name__}")
        if "preprocessing" in blob:
            preprocessing = _checkpoint_preprocessing(blob["preprocessing"], checkpoint)
        blob = blob["state_dict"]
    if not (isinstance(blob, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items())):
        raise ValueError(f"checkpoint {checkpoint} is neither a state dict (a dict of names to tensors) "
                         "nor an embcam checkpoint (see save_checkpoint)")
    return blob, spec, preprocessing


def _short_reason(exc: Exception) -> str:
    """``Type: first words`` of a torch.load error, cut before anything read from the file:
    pickle and torch put that after a colon, in quotes or as numbers (``invalid load key,
    'x'``, ``KeyError: 101``), and the weights-only unpickler after its first sentence."""
    words = re.match(r"[A-Za-z ,()`_=./-]*", str(exc)).group().split(". ")[0].strip(" ,.")[:100]
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


def _checkpoint_spec(spec: str, checkpoint: str | Path) -> str:
    """The spec a checkpoint records, if it names a built-in architecture.

    Whoever wrote a checkpoint file must not choose code to run (``os:system``,
    ``torchscript:<any file>``): user code and TorchScript load only from a spec the
    caller names. Checked before anything is imported or opened.
    """
    if spec.partition(":")[0] not in BUILTIN_SOURCES:
        raise ValueError(f"checkpoint {checkpoint} names model {spec[:100]!r}, but a checkpoint may only name "
                         "built-in models (torchvision:, embcam:): user code and TorchScript must be named "
                         "on the command line with --model")
    return spec


def _checkpoint_preprocessing(entry: object, checkpoint: str | Path) -> Preprocessing:
    def numbers(v: object, positive: bool = False) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
            for x in v)

    if isinstance(entry, dict):
        size, mean, std = entry.get("size"), entry.get("mean"), entry.get("std")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0 and numbers(mean) and numbers(std, True):
            return Preprocessing(size, tuple(map(float, mean)), tuple(map(float, std)))
    raise ValueError(f"checkpoint {checkpoint} has a bad 'preprocessing' entry: expected "
                     "{'size': an int > 0, 'mean': 3 numbers, 'std': 3 numbers > 0}")


def _load_state(model: nn.Module, state: dict, source) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
        raise ValueError(f"checkpoint {source} does not match the model: "
                         f"missing keys: {show(missing) or 'none'}; unexpected keys: {show(unexpected) or 'none'}; "
                         f"shape mismatches (checkpoint vs model): {show(shapes) or 'none'}")
    model.load_state_dict(state)


def export_torchscript(model: EmbeddingNet, path: str | Path) -> None:
    """Script an EmbeddingNet so ``torchscript:<path>`` can be explained (via its
    exported ``forward_features``/``forward_head``)."""
    torch.jit.script(model.eval()).save(str(path))
