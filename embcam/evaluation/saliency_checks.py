"""Sanity and faithfulness checks of a heatmap method, without Ray or files (docs/design.md
§7, "Sanity and faithfulness checks").

* Model randomisation (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps"):
  the model's blocks (:func:`cascade_blocks`) are re-initialised one after another from
  the output down, cumulatively, and at each step the heatmaps of the same images are
  compared with the trained model's by Spearman rank correlation (:func:`spearman_rows`).
  A method whose maps do not depend on the model keeps rho = 1 and fails.
* Deletion (Petsiuk et al., RISE, BMVC 2018), for embeddings: the hottest pixels are
  replaced by a fill (a blurred copy or the mean colour) in ``steps`` equal shares, the
  image is embedded again, and the cosine of its embedding with its proxy is tracked; the
  area under that curve (:func:`trapezoid_auc`, fraction removed 0..1) is compared with
  random orders and with the uniform map (every pixel fades by the same share per step).
  Lower = more faithful.
* Insertion (the same paper): the other way round, from the fully filled image, the
  hottest pixels revealed first, with the same fills, orders and uniform map. Higher =
  more faithful.

An *explainer* is ``explain(model, x, proxies) -> (B, h, w)`` heatmaps for a normalised
batch ``x``; ``proxies`` is a (B, d) tensor or ``"self"`` (each image's own normalised
embedding under ``model``). :func:`cam_explainer` is EmbeddingCAM's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from ..cam import EmbeddingCAM, normalise
from ..results import upsample

Explainer = Callable[[nn.Module, Tensor, "Tensor | str"], Tensor]
FILLS = ("blur", "mean")
BLUR_SIGMA = 1 / 16  # of the input side: the "blur" fill's Gaussian sigma (8 px at 128 px)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def cam_explainer(target_layer: str | None = None, reshape=None) -> Explainer:
    """EmbeddingCAM's heatmaps (its embedding-map strategy) for any model it is given."""
    def explain(model: nn.Module, x: Tensor, proxies) -> Tensor:
        return EmbeddingCAM(model, target_layer, "embedding-map", reshape=reshape)(x, proxies).heatmaps
    return explain


# --- Spearman ------------------------------------------------------------------------------


def spearman_rows(a, b) -> np.ndarray:
    """Spearman's rho of each row pair of ``a`` and ``b`` (N, n): Pearson's r of their
    average ranks; NaN where a row is constant (rho is undefined there)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman_rows needs two (N, n) arrays of one shape, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)  # ties: the mean of the ranks they span
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(1) / denominator, np.nan)


# --- model randomisation --------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One unit of the cascade: a module (``name``) or the direct parameters of an opened
    module (``name`` + "(own parameters)"), randomised together."""

    name: str
    module: nn.Module
    own_only: bool = False  # only the module's direct parameters (its children are blocks of their own)

    @property
    def label(self) -> str:
        base = self.name or "(model)"
        return base + " (own parameters)" if self.own_only else base


def cascade_blocks(model: nn.Module, probe: Tensor) -> list[Block]:
    """The blocks of ``model`` in the order the forward of ``probe`` first reaches them.

    The model is opened from the top: the root, a container (Sequential, ModuleList,
    ModuleDict) and a module whose parameters lie mostly in a container of composite
    modules are replaced by their children (a ResNet's stages become their residual
    blocks, a ViT's encoder its layers; a residual block stays whole); anything else is
    one block. The direct parameters of an opened module (a ViT's class token, position
    embedding) are one block, placed where the module is first called. Blocks without
    parameters, and blocks the forward never calls, are left out (randomising them
    changes nothing)."""
    order: dict[int, int] = {}

    def first_call(module, args) -> None:
        order.setdefault(id(module), len(order))

    handles = [m.register_forward_pre_hook(first_call) for m in model.modules()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    blocks = _blocks(model, "")
    called = [b for b in blocks if id(b.module) in order]
    return sorted(called, key=lambda b: order[id(b.module)])


def _blocks(module: nn.Module, name: str) -> list[Block]:
    if not any(True for _ in module.parameters()):
        return []
    children = list(module.named_children())
    if children and (name == "" or isinstance(module, CONTAINERS) or _dominant_child(module)):
        own = [Block(name, module, own_only=True)] if any(True for _ in module.parameters(recurse=False)) else []
        return own + [b for child, m in children for b in _blocks(m, f"{name}.{child}" if name else child)]
    return [Block(name, module)]


def _dominant_child(module: nn.Module) -> bool:
    """Whether a container of blocks (composite modules, not layers or groups of layers)
    holds more than half of ``module``'s parameters: a ViT encoder's ``layers``, not a
    ConvNeXt block's ``block`` (layers) or an inverted residual's (Conv-BN groups)."""
    total = sum(p.numel() for p in module.parameters())
    for child in module.children():
        parts = [m for m in child.children() if any(True for _ in m.parameters())]
        blocks = all(any(True for _ in m.children()) and not isinstance(m, CONTAINERS) for m in parts)
        if isinstance(child, CONTAINERS) and parts and blocks \
                and sum(p.numel() for p in child.parameters()) * 2 > total:
            return True
    return False


def randomise_block(block: Block, seed: int) -> None:
    """Re-initialise ``block`` in place, reproducibly from ``seed``: every submodule with
    ``reset_parameters`` (Conv, Linear, norms: PyTorch's own initialisation, running
    statistics reset) is reset; any other parameter is redrawn from a normal with the
    trained tensor's mean and (population) std."""
    modules = [block.module] if block.own_only else list(block.module.modules())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        reset: set[int] = set()
        for m in modules:
            if hasattr(m, "reset_parameters") and not (block.own_only and list(m.children())):
                m.reset_parameters()
                reset.update(id(p) for p in m.parameters(recurse=False))
        for m in modules:
            for p in m.parameters(recurse=False):
                if id(p) not in reset:
                    mean, std = p.mean(), p.std(unbiased=False) if p.numel() > 1 else p.new_zeros(())
                    p.copy_(torch.randn_like(p) * std + mean)


def cascade(model: nn.Module, x: Tensor, proxies, explain: Explainer, seed: int = 0,
            blocks: list[Block] | None = None, batch_size: int = 64,
            progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Cascading randomisation from the output down, on a copy of ``model``.

    Returns ``{"blocks": [label, ...] in cascade order, "trained": (N, h, w) maps,
    "rho": (steps, N) Spearman of each step's map with the trained one, "constant": (steps,)
    randomised maps that were constant}``. Step s has the first s + 1 blocks randomised.
    A randomised map that is constant shares no ranking with the trained one: its rho is 0.
    Images whose trained map is constant have NaN throughout (the caller leaves them out).
    ``proxies``: (N, d) fixed vectors, or "self" (each model's own output).
    ``progress(step, steps, block)`` is called after each step."""
    work = copy.deepcopy(model).eval()
    if blocks is None:
        blocks = cascade_blocks(work, x[:1])
    else:  # the same blocks in the copy
        modules = dict(work.named_modules())
        blocks = [Block(b.name, modules[b.name], b.own_only) for b in blocks]
    trained = _explain_all(work, x, proxies, explain, batch_size)
    flat = trained.reshape(len(trained), -1)
    trained_constant = np.ptp(flat, axis=1) == 0
    rho = np.full((len(blocks), len(x)), np.nan)
    constant = np.zeros(len(blocks), np.int64)
    for step, block in enumerate(reversed(blocks)):
        randomise_block(block, seed * 1000 + step)
        heat = _explain_all(work, x, proxies, explain, batch_size).reshape(len(x), -1)
        if heat.shape != flat.shape:
            raise ValueError(f"heatmaps changed shape from {flat.shape} to {heat.shape} at block {block.label}")
        flat_random = np.ptp(heat, axis=1) == 0
        constant[step] = int((flat_random & ~trained_constant).sum())
        values = spearman_rows(flat, heat)
        values[flat_random] = 0.0
        values[trained_constant] = np.nan
        rho[step] = values
        if progress is not None:
            progress(step + 1, len(blocks), block.label)
    return {"blocks": [b.label for b in reversed(blocks)], "trained": trained, "rho": rho,
            "constant": constant, "trained_constant": int(trained_constant.sum())}


def _explain_all(model, x, proxies, explain, batch_size) -> np.ndarray:
    parts = []
    for start in range(0, len(x), batch_size):
        p = proxies if isinstance(proxies, str) else proxies[start:start + batch_size]
        parts.append(explain(model, x[start:start + batch_size], p).detach().double().cpu().numpy())
    return np.concatenate(parts)


# --- deletion ---------------------------------------------------------------------------------


def fill_images(pixels: np.ndarray, kind: str) -> np.ndarray:
    """What deleted pixels become, per image (N, S, S, 3) in pixel units: ``blur`` = a
    Gaussian blur with sigma = side x BLUR_SIGMA (OpenCV, reflected border), ``mean`` =
    the image's mean colour."""
    pixels = np.asarray(pixels, np.float64)
    if kind == "mean":
        return np.broadcast_to(pixels.mean((1, 2), keepdims=True), pixels.shape).copy()
    if kind == "blur":
        sigma = pixels.shape[1] * BLUR_SIGMA
        return np.stack([cv2.GaussianBlur(p, (0, 0), sigmaX=sigma, sigmaY=sigma) for p in pixels])
    raise ValueError(f"unknown fill {kind!r}; choose one of {FILLS}")


def hottest_first(heatmap: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Pixel indices of a side x side input, hottest first: the raw map upsampled
    bilinearly (``embcam.results.upsample``); ties (the zeros of the ReLU) in random order."""
    h, w = heatmap.shape
    row = {"heatmap": heatmap.reshape(-1), "heatmap_height": h, "heatmap_width": w}
    heat = upsample(row, (side, side)).reshape(-1)
    return np.lexsort((rng.permutation(heat.size), -heat))


def deletion_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels deleted after step k = 0..steps: round(k * pixels / steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.rint(np.arange(steps + 1) * pixels / steps).astype(np.int64)


def deleted_images(image: np.ndarray, fill: np.ndarray, order: np.ndarray | None, steps: int) -> np.ndarray:
    """(steps + 1, S, S, 3): ``image`` after each deletion step. ``order``: pixel indices,
    first deleted first; None = the uniform map, every pixel moved k / steps of the way
    to its fill at step k."""
    if order is None:
        share = (np.arange(steps + 1) / steps)[:, None, None, None]
        return (1 - share) * image + share * fill
    side = image.shape[0]
    rank = np.empty(side * side, np.int64)
    rank[order] = np.arange(side * side)  # the step at which each pixel goes is rank < count
    gone = rank.reshape(side, side)[None] < deletion_counts(side * side, steps)[:, None, None]
    return np.where(gone[..., None], fill, image)


def inserted_images(image: np.ndarray, fill: np.ndarray, order: np.ndarray | None, steps: int) -> np.ndarray:
    """(steps + 1, S, S, 3): the fill with ``image``'s pixels put back in ``order`` (first
    first), step 0 all fill, the last step the image; None = the uniform map, every pixel
    moved k / steps of the way from its fill back to the image at step k."""
    return deleted_images(fill, image, order, steps)


def deletion_fractions(side: int, steps: int, uniform: bool = False) -> np.ndarray:
    """The x axis: share of each pixel removed (uniform) or share of pixels removed."""
    if uniform:
        return np.arange(steps + 1) / steps
    return deletion_counts(side * side, steps) / (side * side)


def trapezoid_auc(x, y) -> np.ndarray:
    """Area under y(x) by the trapezoid rule (along the last axis)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return ((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2).sum(-1)


def embed_cosines(model: nn.Module, preprocess, images: np.ndarray, proxy: Tensor, batch_size: int = 64) -> np.ndarray:
    """Cosine of each image's embedding (``images`` (M, S, S, 3) pixels) with ``proxy`` (d)."""
    out = []
    p = normalise(proxy.double())
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = preprocess(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], np.float32)))
            out.append((normalise(model(x).double()) @ p).cpu().numpy())
    return np.concatenate(out)


def deletion(model: nn.Module, preprocess, pixels: np.ndarray, heatmaps: np.ndarray, proxies: Tensor, *,
             steps: int = 16, fill: str = "blur", seed: int = 0, random_orders: int = 3,
             batch_size: int = 64, progress: Callable[[int, int], None] | None = None) -> dict:
    """Deletion curves of each image (``pixels`` (N, S, S, 3) as the model gets them,
    ``heatmaps`` (N, h, w), ``proxies`` (N, d)) for: the heatmap's order, ``random_orders``
    random orders (seeded; their curves averaged per image) and the uniform map.

    Returns ``{"fractions": {method: (steps + 1,)}, "curves": {method: (N, steps + 1)},
    "auc": {method: (N,)}}`` with methods ``heatmap``, ``random``, ``uniform``."""
    return _curves(model, preprocess, pixels, heatmaps, proxies, steps, fill, seed, random_orders, batch_size,
                   progress, insert=False)


def insertion(model: nn.Module, preprocess, pixels: np.ndarray, heatmaps: np.ndarray, proxies: Tensor, *,
              steps: int = 16, fill: str = "blur", seed: int = 0, random_orders: int = 3,
              batch_size: int = 64, progress: Callable[[int, int], None] | None = None) -> dict:
    """Insertion curves, as :func:`deletion` (same arguments, the same orders for the same
    ``seed``, the same result) but from the filled image, the pixels put back in order;
    the x axis is the fraction revealed."""
    return _curves(model, preprocess, pixels, heatmaps, proxies, steps, fill, seed, random_orders, batch_size,
                   progress, insert=True)


def _curves(model, preprocess, pixels, heatmaps, proxies, steps, fill, seed, random_orders, batch_size, progress,
            insert: bool) -> dict:
    pixels = np.asarray(pixels, np.float64)
    n, side = len(pixels), pixels.shape[1]
    fills = fill_images(pixels, fill)
    perturbed = inserted_images if insert else deleted_images
    curves = {m: np.zeros((n, steps + 1)) for m in ("heatmap", "random", "uniform")}
    for i in range(n):
        tie = np.random.default_rng([seed, 0, i])
        orders = [hottest_first(heatmaps[i], side, tie)]
        orders += [np.random.default_rng([seed, 1 + r, i]).permutation(side * side) for r in range(random_orders)]
        stacks = [perturbed(pixels[i], fills[i], order, steps) for order in orders]
        stacks.append(perturbed(pixels[i], fills[i], None, steps))
        cos = embed_cosines(model, preprocess, np.concatenate(stacks), proxies[i], batch_size)
        cos = cos.reshape(len(stacks), steps + 1)
        curves["heatmap"][i], curves["uniform"][i] = cos[0], cos[-1]
        curves["random"][i] = cos[1:-1].mean(0)
        if progress is not None:
            progress(i + 1, n)
    fractions = {"heatmap": deletion_fractions(side, steps), "random": deletion_fractions(side, steps),
                 "uniform": deletion_fractions(side, steps, uniform=True)}
    return {"fractions": fractions, "curves": curves,
            "auc": {m: trapezoid_auc(fractions[m], c) for m, c in curves.items()}}
