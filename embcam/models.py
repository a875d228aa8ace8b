"""Embedding models from a spec string: build, load weights, save, find target layers.

A spec names a source and an architecture; creation is one function, :func:`load_model`.
The sources and their architectures are a registry, :mod:`embcam.architectures`
(``embcam models`` prints it):

- ``torchvision:<arch>[+<head>]``: a torchvision model without its classifier
  (ResNet/ResNeXt/Wide ResNet, MobileNetV2/V3, EfficientNet/V2, RegNet, ConvNeXt,
  DenseNet, Swin/V2, ViT) then an embedding head: ``identity`` (the pooled features) or
  ``linear:<d>``. Example: ``torchvision:resnet50+linear:128``.
- ``timm:<name>[+<head>]``: ``timm.create_model(name, pretrained=False, ...)``
  (``pip install 'embcam[timm]'``).
- ``embcam:small-resnet[+<head>]``: a small 4-stage ResNet (BasicBlocks, widths
  16-32-64-128) for CPU training and the bundled demo model.
- ``torchscript:<path>``: a TorchScript file whose module exports
  ``forward_features`` and ``forward_head`` (see :func:`export_torchscript`).
- ``<package.module>:<factory>``: user code, imported only because the user named
  it; ``factory()`` returns an ``nn.Module``.

Weights are never downloaded: they come from a file or stay random (seeded, so every
worker builds the same model). A file is an embcam checkpoint (:func:`save_checkpoint`,
which records the spec and the preprocessing, so ``load_model(checkpoint=path)`` alone
rebuilds the model) or a plain state dict. A plain state dict may also be in the
source's own names, as torchvision and timm save them (torchvision's
``resnet50-0676ba61.pth``): its keys are mapped onto the embcam model (``conv1.weight``
-> ``backbone.conv1.weight``), and the source's classifier (``fc.*``, ``classifier.*``,
``heads.*``, timm's ``pretrained_cfg["classifier"]``) becomes the embedding head, or is
left out where the head is ``+identity``.

A file must fit the model exactly: a model tensor it lacks or has with another shape
(a ``+linear:64`` head for a file whose head is ``Linear(512, 128)``) would keep its
random init, so it is an error that names the tensors, their shapes and the likely fix,
unless the caller allows a partial fit (``allow_partial=True``,
``--allow-partial-checkpoint``); :func:`load_checked` returns the account of what was
loaded (:class:`embcam.checkpoints.CheckpointLoad`).

Checkpoints are data, never code: they are read with ``torch.load(...,
weights_only=True)`` (tensors and plain containers; anything else is refused with a
one-line ValueError), and a recorded spec may name only a built-in source
(``torchvision:``, ``embcam:``, ``timm:``). User code and TorchScript run only from a
spec the caller names (``spec=``, ``--model``).
"""
from __future__ import annotations

import importlib
import io
import math
import re
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

# BUILTIN_SOURCES, IMAGENET_*, BasicBlock, GeM, GlobalAvgPool and small_resnet are re-exported: the
# building blocks lived here before the registry, and code that imports them from here keeps working
from .architectures import (  # noqa: F401
    BUILTIN_SOURCES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Architecture,
    BasicBlock,
    EmbeddingNet,
    GeM,
    GlobalAvgPool,
    Preprocessing,
    resolve,
    small_resnet,
    unknown_source_message,
)
from .checkpoints import CheckpointLoad


def build_model(spec: str, image_size: int | None = None) -> nn.Module:
    """Create the (randomly initialised) model a spec names; see the module docstring.
    ``image_size`` matters to ViTs (their position embedding); None = the
    architecture's preprocessing size."""
    resolved = resolve(spec)
    if resolved is not None:
        arch, head = resolved
        return arch.build(head, image_size)
    kind, _, rest = spec.partition(":")
    if kind == "torchscript":
        return torch.jit.load(rest, map_location="cpu")
    return _user_model(spec)


def _user_model(spec: str) -> nn.Module:
    kind, _, factory = spec.partition(":")
    try:
        module = importlib.import_module(kind)  # user code: only because the user named it
    except ModuleNotFoundError as exc:
        if exc.name is None or not (kind == exc.name or kind.startswith(exc.name + ".")):
            raise  # the user's module imports something missing: its own traceback says what
        raise ValueError(unknown_source_message(spec)) from None
    if not callable(getattr(module, factory, None)):
        raise ValueError(f"module {kind!r} has no factory {factory!r} (model spec {spec!r})")
    model = getattr(module, factory)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_target_layer(model: nn.Module) -> str | None:
    """The layer to explain when none is named: ``model.embcam_target_layer`` when the
    model has it (every registry model does; a user's factory may set it too). Else
    ``None``, the split point, for a model with ``forward_features``/``forward_head``
    (the backbone output: layer4 of a ResNet); otherwise ``layer4``/``features``."""
    if hasattr(model, "embcam_target_layer"):
        return model.embcam_target_layer
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


class LoadedModel(NamedTuple):
    model: nn.Module  # in eval mode
    preprocessing: Preprocessing
    spec: str  # the resolved spec
    checkpoint: CheckpointLoad | None  # how the weight file fitted (None: no file)


def load_model(spec: str | None = None, checkpoint: str | Path | None = None,
               image_size: int | None = None, allow_partial: bool = False) -> tuple[nn.Module, Preprocessing, str]:
    """Build a model from ``spec`` and/or a weight file; returns (model in eval mode, its
    preprocessing, the resolved spec): :func:`load_checked` without its account of the file."""
    return load_checked(spec, checkpoint, image_size, allow_partial)[:3]


def load_checked(spec: str | None = None, checkpoint: str | Path | None = None,
                 image_size: int | None = None, allow_partial: bool = False) -> LoadedModel:
    """Build a model from ``spec`` and/or a weight file. The file is an embcam checkpoint
    or a plain state dict, in embcam's names or, for a built-in source, in the source's own
    (see the module docstring). Preprocessing: the checkpoint's, else the architecture's;
    ``image_size`` replaces its size (and sizes a ViT's position embedding).

    A file must fit the model exactly: a model tensor it lacks or has with another shape
    (which would keep its random init), or a tensor the model has no place for, is a
    ValueError naming them, their shapes and the likely fix. ``allow_partial`` loads what
    fits instead; ``LoadedModel.checkpoint`` says what that was."""
    state = stored_spec = stored_preprocessing = None
    if checkpoint is not None:
        state, stored_spec, stored_preprocessing = _read_checkpoint(checkpoint)
        if not spec and stored_spec is not None:
            spec = _checkpoint_spec(stored_spec, checkpoint)
    if not spec:
        raise ValueError("no model: give a spec (e.g. torchvision:resnet50+linear:128) or an embcam checkpoint")
    resolved = resolve(spec)
    preprocessing = stored_preprocessing or (resolved[0].preprocessing if resolved else Preprocessing())
    if image_size is not None:
        preprocessing = replace(preprocessing, size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # without a checkpoint every worker must still build the same weights
        model = resolved[0].build(resolved[1], preprocessing.size) if resolved else build_model(spec)
    fit = None
    if state is not None:
        dropped = []
        if resolved is not None and stored_spec is None:  # embcam checkpoints are in embcam's names
            state, dropped = _from_source_names(state, model, resolved[0])
        fit = _load_state(model, state, str(checkpoint), dropped, spec, allow_partial)
    return LoadedModel(model.eval(), preprocessing, spec, fit)


def _from_source_names(state: dict, model: nn.Module, arch: Architecture) -> tuple[dict, list[str]]:
    """A plain state dict in the source's own names (torchvision's ``conv1.weight``)
    renamed to the model's (``backbone.conv1.weight``), and the keys of the source's
    classifier it left out; one already in the model's names passes unchanged. The
    source's classifier becomes the embedding head (whose shapes :func:`_load_state` then
    checks); it is left out only where the spec's head is ``+identity`` and has no place
    for it. Keys that fit nowhere stay as they are, for :func:`_load_state` to report."""
    if not arch.classifiers or (arch.prefixes != ("",) and any(key.startswith(arch.prefixes) for key in state)):
        return state, []  # embcam's own architecture, or a file in the model's names
    own = model.state_dict()
    renamed, dropped = {}, []
    for key, value in state.items():
        key = arch.legacy_key(key) if arch.legacy_key else key
        classifier = next((c for c in arch.classifiers if key.startswith(c + ".")), None)
        if classifier is None:
            renamed[next((p + key for p in arch.prefixes if p + key in own), key)] = value
            continue
        head = arch.classifiers[classifier]
        if any(k.startswith(head + ".") for k in own):
            renamed[head + key[len(classifier):]] = value
        else:  # +identity: explaining the features before the classifier is what the spec asks
            dropped.append(key)
    return renamed, dropped


def _read_checkpoint(checkpoint: str | Path) -> tuple[dict, str | None, Preprocessing | None]:
    """(state dict, recorded spec, recorded preprocessing) of a state dict or an embcam checkpoint."""
    if "://" in str(checkpoint):  # object storage: read through pyarrow's filesystems
        from .data.fetch import ReadLimits, read_bytes
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
                         f"built-in models ({', '.join(s + ':' for s in BUILTIN_SOURCES)}): user code and "
                         "TorchScript must be named on the command line with --model")
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


def _load_state(model: nn.Module, state: dict, path: str, dropped: list[str], spec: str,
                allow_partial: bool) -> CheckpointLoad:
    """Load the tensors of ``state`` that fit ``model``, having accounted for every one;
    a partial fit is an error unless ``allow_partial``. BatchNorm step counters a file
    lacks (saved before PyTorch 0.4.1; unused in eval) are not counted as missing."""
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    counters = {k for k in own if k.endswith(".num_batches_tracked") and k not in state}
    fit = CheckpointLoad(
        path=path, loaded=len(fits), missing=sorted(set(own) - set(state) - counters),
        unexpected=sorted(set(state) - set(own)),
        mismatched=[{"name": k, "checkpoint": list(state[k].shape), "model": list(own[k].shape)}
                    for k in sorted(set(own) & set(state)) if k not in fits],
        dropped=sorted(dropped))
    if fit.partial and not allow_partial:
        fix = _likely_fix(model, fit, spec)
        raise ValueError(f"checkpoint {path} does not fit model {spec}: {fit.problems()}"
                         + (f"; {fix}" if fix else "")
                         + "; to run anyway with the tensors not loaded at their random init: "
                           "--allow-partial-checkpoint (allow_partial=True)")
    model.load_state_dict(fits, strict=False)
    return fit


def _likely_fix(model: nn.Module, fit: CheckpointLoad, spec: str) -> str:
    """What most likely makes the file fit: another image size (a ViT's position
    embedding), the head the file has (when only a Linear head is off), no head
    (+identity), or another architecture."""
    if any("pos_embed" in m["name"] for m in fit.mismatched):
        return ("the position embeddings differ: the file is for another image size (give that size: "
                "image_size= / --image-size)")
    resolved = resolve(spec) if spec.partition(":")[0] in BUILTIN_SOURCES else None
    # the embedding head's module: where the source's classifier goes, else EmbeddingNet's head
    heads = (set(resolved[0].classifiers.values()) or {"head"}) if resolved else set()
    base = spec.partition("+")[0]
    unloaded = fit.missing + [m["name"] for m in fit.mismatched]
    modules = dict(model.named_modules())
    for m in fit.mismatched:
        layer, _, leaf = m["name"].rpartition(".")
        module, file_shape = modules.get(layer), m["checkpoint"]
        if (leaf == "weight" and isinstance(module, nn.Linear) and len(file_shape) == 2
                and file_shape[1] == module.in_features and all(n.startswith(layer + ".") for n in unloaded)):
            said = (f"the checkpoint's {layer} is Linear({file_shape[1]}->{file_shape[0]}), the model's "
                    f"Linear({module.in_features}->{module.out_features})")
            if layer in heads:
                return (f"{said}: use --model {base}+linear:{file_shape[0]} for the checkpoint's head "
                        f"(or {base}+identity for the features before it)")
            return said
    if heads and fit.missing and not fit.mismatched \
            and all(name.startswith(tuple(h + "." for h in heads)) for name in fit.missing):
        return f"the checkpoint has no embedding head: use --model {base}+identity"
    if unloaded:
        return "the file is likely for another architecture (`embcam models` lists them)"
    return ""


def export_torchscript(model: EmbeddingNet, path: str | Path) -> None:
    """Script an EmbeddingNet so ``torchscript:<path>`` can be explained (via its
    exported ``forward_features``/``forward_head``)."""
    torch.jit.script(model.eval()).save(str(path))
