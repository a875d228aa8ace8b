"""Make a model cheaper to run for explaining, without changing what it computes.

Two rewrites, both exact up to float rounding (about 1e-6 relative in float32, 1e-15
in float64) and both leaving the module tree, its names and hooks in place:

- BatchNorm folding: an eval-mode ``BatchNorm2d`` that only ever sees one
  ``Conv2d``'s output is folded into that conv's weight and bias and becomes an
  ``Identity`` under the same name, so a target layer named after either still
  exists and still yields the same tensor (the BN's output).
- channels_last: conv weights (and so every activation after the first conv) in
  NHWC, the layout oneDNN and cuDNN convolutions run fastest in at batch sizes above
  a few images. On CPU at batch 1 it is slower; see BENCHMARKS.md.

And one opt-in step that costs start-up time: ``compile_batch_size`` compiles the
backbone with ``torch.compile`` and inference freezing (weights constant-folded and
prepacked for the convolution library). Freezing applies only to forward passes run without
autograd, which is every forward of the single-pass (embedding-map) path and the
feature pass of the autograd path; tools that take a gradient from the score run the
forward with autograd on, where it does not apply. Batches are padded to exactly that size, so one compiled graph
serves ragged tails and batches thinned by bad images without recompiling.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def prepare_for_inference(model: nn.Module, target_layer: str | None = None, channels_last: bool = True,
                          compile_batch_size: int | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode with BatchNorm folded (except where folding
    would change ``target_layer``'s output), optionally channels_last weights and,
    with ``compile_batch_size``, a compiled backbone (an ``EmbeddingNet`` explained at
    its backbone output, the default target; compilation happens on the first call)."""
    if compile_batch_size is not None:
        check_compilable(model, target_layer, compile_batch_size)
    model = copy.deepcopy(model).eval()
    if not isinstance(model, torch.jit.ScriptModule):
        fold_batchnorm(model, target_layer)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_batch_size is not None:
        compiled = torch.compile(model.backbone, dynamic=False)
        model.backbone = PaddedBatches(compiled, compile_batch_size)
    return model


class PaddedBatches(nn.Module):
    """Runs ``module`` on batches of exactly ``size`` rows: longer inputs in chunks, a
    short one zero-padded, outputs cut back (rows never interact in an eval model)."""

    def __init__(self, module: nn.Module, size: int):
        super().__init__()
        self.module, self.size = module, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        parts = []
        for chunk in x.split(self.size):
            # Always a fresh tensor: the compiled graph is also specialised on whether
            # its input is an inference-mode tensor, so views of the caller's would
            # compile a second graph.
            padded = chunk.new_zeros((self.size, *chunk.shape[1:]))
            padded[:len(chunk)] = chunk
            with inductor_config.patch(freezing=True):  # read when tracing, not just compiling
                parts.append(self.module(padded)[:len(chunk)])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_compilable(model: nn.Module, target_layer: str | None, batch_size: int) -> None:
    """Raise ValueError unless ``prepare_for_inference`` can compile this model."""
    if batch_size < 1:
        raise ValueError(f"compile_batch_size must be >= 1, got {batch_size}")
    if isinstance(model, torch.jit.ScriptModule) or not (
            isinstance(getattr(model, "backbone", None), nn.Module) and hasattr(model, "forward_head")):
        raise ValueError("compiling needs an embcam EmbeddingNet (backbone -> pool -> head); "
                         f"got {type(model).__name__}")
    if target_layer not in (None, "backbone"):
        raise ValueError(f"compiling explains at the backbone output; target layer {target_layer!r} would "
                         "need hooks inside the compiled graph: leave it unset or do not compile")


def fold_batchnorm(model: nn.Module, target_layer: str | None = None) -> int:
    """Fold, in place, every foldable Conv2d -> BatchNorm2d pair of an eval-mode model;
    returns how many were folded (0 for a model torch.fx cannot trace)."""
    if model.training:
        raise ValueError("BatchNorm folding needs an eval-mode model (running statistics)")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - dynamic control flow etc.: run the model as it is
        return 0
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        conv_name, bn_name = source.target, node.target
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if not (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.running_mean is not None):
            continue
        if calls[conv_name] != 1 or calls[bn_name] != 1 or len(source.users) != 1:
            continue  # a shared module, or the conv's output is used elsewhere too
        if target_layer is not None and _inside(conv_name, target_layer) and not _inside(bn_name, target_layer):
            continue  # the target's output is the conv's, before the BN: keep it as it is
        _set(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set(model, bn_name, nn.Identity())
        folded += 1
    return folded


def _inside(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
