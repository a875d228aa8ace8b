"""EmbeddingCAM: Grad-CAM for embedding networks, with a proxy vector in place of a
class score (Bachhawat, "Generalizing GradCAM for Embedding Networks", §3).

For an image with target-layer activation A (K, h, w), unnormalised embedding
y = f(x) (d) and proxy p (d):

    L = y . p                      (never the cosine: cos(y, y/|y|) has zero gradient)
    alpha_k = mean_ij dL/dA_kij
    H = ReLU(sum_k alpha_k A_k)    (raw, not min-max scaled)

alpha is linear in p: alpha = M p with M = mean_ij (dy/dA_.ij)^T (K x d), so
H_ij = ReLU(p . E_ij) with the *embedding map* E_ij = M^T A_.ij. Two strategies:

- ``autograd``: the paper's computation and the reference. Forward once, then one
  ``torch.autograd.grad(L, A)`` per proxy column; parameters are frozen for the call,
  so the graph starts at A and no parameter gradient is ever formed.
- ``embedding-map``: compute E once per image, then any number of heatmaps as
  ReLU(E . p) with no further network pass. M comes from one of three paths
  (``EmbeddingCAM.path``), chosen once from the model's structure (``embcam.tail``):

  - ``closed-form``: A reaches y only through its global average pool and an affine
    map (Linear, BatchNorm1d, Dropout, flatten...): M = W^T / Z (paper eq. 17), read off
    the model once. One plain forward, no backward at all.
  - ``pooled-jacobian``: A reaches y only through its global average pool v and some
    function g of v (a LayerNorm, an MLP): M = J_g(v)^T / Z, from d vector-Jacobian
    products through g alone (a graph on a K-vector), after one plain forward.
  - ``vjp``: anything else (GeM, a skip connection around the target, a layer inside
    the last block, a vision transformer, a model torch.fx cannot trace): d
    vector-Jacobian products from y back to A per image (torch.func.vjp, vmapped over
    chunks of unit vectors so memory stays bounded).

Vision transformers: the target output is turned into a (B, K, h, w) map by
``reshape`` ("tokens", "nhwc" or a callable; see ``EmbeddingCAM``), applied alike to
the activation and to its gradient. For a ViT the last block's token output has zero
gradient except at the class token (only the class token reaches the head after it),
so explain a layer before the last attention: ``blocks[-1].norm1`` in timm (as
pytorch-grad-cam does), ``encoder.layers.encoder_layer_11.ln_1`` in torchvision's
ViT-B/16.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor, nn

from .models import default_target_layer, get_layer
from .tail import Tail, analyse_tail

STRATEGIES = ("autograd", "embedding-map")
RESHAPES = ("tokens", "nhwc", "nchw")
MAX_PREFIX_TOKENS = 16  # class and register tokens a "tokens" reshape may drop
Reshape = Union[str, Callable[[Tensor], Tensor]]
_AFFINE_HEAD_TYPES = {"Identity", "Linear", "BatchNorm1d", "Dropout", "Flatten", "Sequential"}


@dataclass
class CAMResult:
    embeddings: Tensor          # (B, d) unnormalised y
    heatmaps: Tensor            # (B, h, w), or (B, P, h, w) for (B, P, d) proxies
    weights: Tensor | None      # channel weights alpha, (B, K) or (B, P, K): autograd only
    maps: Tensor | None         # embedding maps E, (B, d, h, w): embedding-map only


def heatmaps_from_maps(maps: Tensor, proxies: Tensor) -> Tensor:
    """H = ReLU(E . p) for embedding maps (B, d, h, w) and proxies (B, d) or (B, P, d)."""
    maps = maps.to(_heat_dtype(maps))
    p = proxies.to(maps.dtype)
    with _full_precision(maps):
        if p.dim() == 2:
            return torch.relu(torch.einsum("bdhw,bd->bhw", maps, p))
        return torch.relu(torch.einsum("bdhw,bpd->bphw", maps, p))


def embedding_map_path(model: nn.Module, target_layer: str | None = None, reshape: Reshape | None = None) -> str:
    """The path the embedding-map strategy takes on ``model`` ("closed-form",
    "pooled-jacobian" or "vjp"), from its structure alone (a torch.fx trace, no forward)."""
    return EmbeddingCAM(model, target_layer, "embedding-map", reshape=reshape).path


def cheapest_strategy(path: str, proxies_per_image: int, embedding_dim: int, maps_needed: bool = False) -> str:
    """The cheaper of the two exact strategies for images explained against
    ``proxies_per_image`` (P) proxies each, on a model whose embedding-map path is ``path``.

    On the closed form, E is one (K x d) product after a plain forward: as cheap as
    inference, and no graph is recorded. Elsewhere E costs d vector-Jacobian products
    (through the small head on "pooled-jacobian", from y to the target on "vjp") against
    P backwards for "autograd": E maps only when they are needed anyway, or when P >= d."""
    if maps_needed or path == "closed-form" or proxies_per_image >= embedding_dim:
        return "embedding-map"
    return "autograd"


def normalise(y: Tensor, eps: float = 1e-12) -> Tensor:
    """y / |y| along the last axis (a zero vector stays zero)."""
    return y / y.norm(dim=-1, keepdim=True).clamp_min(eps)


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int, int]:
    """(p, gh, gw) for ``tokens`` transformer tokens of an ``height`` x ``width`` image:
    the fewest leading tokens p (0..16: class, register tokens) such that the rest form
    a gh x gw grid with exactly the image's aspect ratio (gh * width == gw * height)."""
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        rest = tokens - prefix
        if (rest * height) % width:
            continue
        gh = math.isqrt(rest * height // width)
        if gh and gh * gh * width == rest * height and rest % gh == 0:
            return prefix, gh, rest // gh
    raise ValueError(f"{tokens} tokens do not form a grid with the {height}x{width} input's aspect ratio "
                     f"after dropping 0-{MAX_PREFIX_TOKENS} leading tokens; pass reshape= a callable "
                     "that returns (B, K, h, w)")


class EmbeddingCAM:
    """Heatmaps for an embedding network with respect to proxy vectors.

    ``target_layer``: a dotted module name, or None for the model's default (the
    ``forward_features`` output of models that split into ``forward_features`` /
    ``forward_head``, e.g. embcam's ``EmbeddingNet`` and its TorchScript export).
    ``top_k_channels``: keep only the k channels with the largest alpha (autograd).
    ``chunk_elements``: memory bound for the batched VJPs of the embedding-map path.
    ``reshape``: how the target output becomes a (B, K, h, w) map:
    "tokens" for (B, N, C) transformer tokens (leading class / register tokens are
    dropped, see ``token_grid``, and their gradient ignored), "nhwc" for (B, H, W, C)
    (Swin), "nchw" for none, or a callable ``f(activation) -> (B, K, h, w)`` that only
    re-indexes its input (it is applied to the activation and, the same way, to its
    gradient, as pytorch-grad-cam's ``reshape_transform`` is). None: the model's
    ``embcam_reshape`` attribute if it has one, else "nchw".

    The model is put in eval mode: batch statistics would make one image's map depend
    on the rest of the batch. The embedding-map path is chosen here, from the model as
    it is now (``path``: "closed-form", "pooled-jacobian" or "vjp"; "autograd" for the
    autograd strategy); build a new EmbeddingCAM after replacing modules or moving the
    model. The closed form's W^T is cached and read again when the weights change.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, strategy: str = "autograd",
                 top_k_channels: int | None = None, chunk_elements: int = 1 << 25,
                 reshape: Reshape | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        if top_k_channels is not None and strategy != "autograd":
            raise ValueError("top_k_channels needs the channel weights alpha, which the embedding-map "
                             "strategy never forms; use strategy='autograd'")
        if top_k_channels is not None and top_k_channels < 1:
            raise ValueError(f"top_k_channels must be >= 1, got {top_k_channels}")
        self.model = model.eval()
        self.strategy = strategy
        self.top_k_channels = top_k_channels
        self.chunk_elements = chunk_elements
        self.reshape = _resolve_reshape(model, reshape)
        name = default_target_layer(model) if target_layer is None else target_layer
        # Split mode: the target is the forward_features output; no hooks needed
        # (this is also how TorchScript models, which ignore Python hooks, are explained).
        self._split = name is None or (name == "backbone" and hasattr(model, "forward_head"))
        self._layer = None if self._split or name is None else get_layer(model, name)
        if isinstance(model, torch.jit.ScriptModule) and not self._split:
            raise ValueError("TorchScript models are explained at their forward_features output; "
                             "leave target_layer unset")
        self._tail = self._find_tail(None if self._split else name) if strategy == "embedding-map" else None
        self.path = "autograd" if strategy == "autograd" else (
            "vjp" if self._tail is None else "closed-form" if self._tail.affine else "pooled-jacobian")
        self._head_matrix: dict[tuple, tuple[tuple, Tensor]] = {}
        self._target_shapes: dict[tuple, torch.Size] = {}

    # -- public API -------------------------------------------------------------------

    def __call__(self, images: Tensor, proxies: Tensor | str = "self") -> CAMResult:
        """Heatmaps for ``images`` (B, 3, H, W) against ``proxies``: "self" (each
        image's own normalised embedding), a (d,) vector for every image, (B, d) one
        per image, or (B, P, d) several per image."""
        if self.strategy == "embedding-map":
            y, maps = self.embedding_maps(images)
            p, squeeze = _proxy_batch(proxies, y)
            heat = heatmaps_from_maps(maps, p)
            return CAMResult(y, heat[:, 0] if squeeze else heat, None, maps)
        size = images.shape[-2:]
        with self.target_graph(images) as (activation, y):
            p, squeeze = _proxy_batch(proxies, y.detach())
            alpha = self._channel_weights(activation, y, p, size)
        activation = self.as_map(activation.detach(), size)
        if self.top_k_channels is not None and self.top_k_channels < alpha.shape[-1]:
            keep = alpha.topk(self.top_k_channels, dim=-1).indices
            alpha = torch.zeros_like(alpha).scatter_(-1, keep, alpha.gather(-1, keep))
        with _full_precision(activation):
            heat = torch.relu(torch.einsum("bpk,bkhw->bphw", alpha, activation.to(alpha.dtype)))
        if squeeze:
            heat, alpha = heat[:, 0], alpha[:, 0]
        return CAMResult(y.detach(), heat, alpha, None)

    def embedding_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(y (B, d), E (B, d, h, w)): everything needed for heatmaps against any proxy."""
        if self._tail is not None:
            return self._maps_from_tail(images)
        size = images.shape[-2:]
        with _frozen(self.model):
            activation, y, vjp = self._vjp_from_target(images)
            act = self.as_map(activation, size)  # checked before any VJP
            m = self._jacobian_means(vjp, y, activation.numel(), lambda g: self.as_map(g, size).mean((-2, -1)))
        act = act.to(m.dtype)
        with _full_precision(act):
            return y.detach(), torch.einsum("bkhw,bkd->bdhw", act, m)

    def activations(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(A (B, K, h, w), y (B, d)) from one forward: the target layer's output as a map,
        and the embedding; recorded for autograd only where the caller's mode records."""
        activation, y = self._forward(images)
        return self.as_map(activation, images.shape[-2:]), y

    @contextmanager
    def target_graph(self, images: Tensor):
        """Forward with frozen parameters; yields (A as a leaf requiring grad, y), for
        gradients of any function of y with respect to A (``as_map`` lays them out).

        Nothing before the target layer is recorded (no input or parameter needs a
        gradient), hooks live only for the call, and parameter flags are restored even
        when the body raises."""
        with _frozen(self.model), torch.enable_grad():
            yield self._forward(images, leaf=True)

    def as_map(self, activation: Tensor, image_size) -> Tensor:
        """The target output (or its gradient) as a (B, K, h, w) map (see ``reshape``)."""
        shape = tuple(activation.shape)
        if callable(self.reshape):
            out = self.reshape(activation)
            if not isinstance(out, Tensor) or out.dim() != 4:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"reshape must return a (B, K, h, w) tensor, got {got} from {shape}")
            return out
        if self.reshape == "tokens":
            if activation.dim() != 3:
                raise ValueError(f"reshape='tokens' needs (B, N, C) tokens, got {shape}")
            prefix, gh, gw = token_grid(shape[1], *image_size)
            return activation[:, prefix:].unflatten(1, (gh, gw)).permute(0, 3, 1, 2)
        if self.reshape == "nhwc":
            if activation.dim() != 4:
                raise ValueError(f"reshape='nhwc' needs a (B, H, W, C) activation, got {shape}")
            return activation.permute(0, 3, 1, 2)
        if activation.dim() == 3:
            raise ValueError(f"target activation is {shape}, not (B, K, h, w): for (B, N, C) transformer "
                             "tokens pass reshape='tokens' (or a callable returning (B, K, h, w))")
        if activation.dim() != 4:
            raise ValueError(f"target activation must be (B, K, h, w), got {shape}")
        return activation

    # -- internals ----------------------------------------------------------------------

    def _find_tail(self, name: str | None) -> Tail | None:
        """The model after the target when it factors through the target's global
        average pool (see embcam.tail); TorchScript models keep their own rule."""
        if isinstance(self.model, torch.jit.ScriptModule):
            return _script_tail(self.model)
        if self.reshape not in ("nchw", "nhwc"):
            return None
        return analyse_tail(self.model, name, self.reshape)

    def _target(self) -> nn.Module:
        """The hooked target layer (every strategy but split mode's, which hooks nothing)."""
        assert self._layer is not None, "split mode hooks no layer"
        return self._layer

    def _found_tail(self) -> Tail:
        """The tail the embedding-map strategy found (the only strategy that looks for one)."""
        assert self._tail is not None, "only the embedding-map strategy has a tail"
        return self._tail

    def _maps_from_tail(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """E from one plain forward and M = W^T / Z (affine tail) or J_g(v)^T / Z."""
        with torch.inference_mode():
            activation, y = self._forward(images)
        act = self.as_map(activation, images.shape[-2:])
        act = act.to(_heat_dtype(act))
        z = act.shape[-2] * act.shape[-1]
        with torch.no_grad(), _full_precision(act):
            if self._found_tail().affine:
                maps = torch.einsum("bkhw,kd->bdhw", act, self._affine_matrix(act) / z)
            else:
                m = self._pooled_jacobian(act.mean((-2, -1))) / z
                maps = torch.einsum("bkhw,bkd->bdhw", act, m)
        return y.clone(), maps  # y cloned: a plain tensor, usable outside inference mode

    def _forward(self, images: Tensor, leaf: bool = False) -> tuple[Tensor, Tensor]:
        """(target activation, y). ``leaf``: the activation is a leaf that requires
        grad and y is recorded from it (nothing before it is recorded)."""
        x = images.detach()
        if self._split:
            with torch.no_grad() if leaf else nullcontext():
                features = self.model.forward_features(x)
            if leaf:
                features = features.detach().requires_grad_(True)
            return features, _checked_embeddings(self.model.forward_head(features))
        captured: list[Tensor] = []

        def hook(module, inputs, output):
            _check_target_output(output)
            if not leaf:
                captured.append(output)
                return None
            captured.append(output.detach().requires_grad_(True))
            return captured[-1].clone()  # a non-leaf, so later in-place ops stay legal

        handle = self._target().register_forward_hook(hook)
        try:
            y = self.model(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(f"target layer ran {len(captured)} times in one forward; pick a layer that runs once")
        return captured[0], _checked_embeddings(y)

    def _vjp_from_target(self, images: Tensor) -> tuple[Tensor, Tensor, Callable]:
        """(A, y, vjp) from one forward, with vjp(v) = (v^T dy/dA,) for v shaped like y.

        torch.func rather than autograd's is_grads_batched: vmapped over a chunk of
        cotangents, its backward runs each layer once for the whole chunk, where
        is_grads_batched ran the convolution backward once per cotangent (3-4x slower,
        BENCHMARKS.md §3). Without a split, y is a function of a zero delta added to
        the target's output, so the one forward records the graph from the target on."""
        x = images.detach()
        if self._split:
            with torch.no_grad():
                activation = self.model.forward_features(x)
            y, vjp = torch.func.vjp(self.model.forward_head, activation)
            return activation, _checked_embeddings(y), vjp
        key = (tuple(x.shape), x.device)
        if key not in self._target_shapes:
            self._target_shapes[key] = self._target_shape(x)
        captured: list[Tensor] = []

        def through_target(delta: Tensor) -> Tensor:
            def hook(module, inputs, output):
                if captured:
                    raise ValueError("target layer ran more than once in one forward; pick a layer that runs once")
                if not isinstance(output, Tensor) or output.shape != delta.shape:
                    raise ValueError("target layer output changed shape between two forwards of the same input shape")
                captured.append(output)
                return output + delta.to(output.dtype)

            handle = self._target().register_forward_hook(hook)
            try:
                return self.model(x)
            finally:
                handle.remove()

        delta = torch.zeros(self._target_shapes[key], dtype=_heat_dtype(x), device=x.device)
        y, vjp = torch.func.vjp(through_target, delta)
        if not captured:
            raise ValueError("target layer ran 0 times in one forward; pick a layer that runs once")
        return captured[0], _checked_embeddings(y), vjp

    def _target_shape(self, x: Tensor) -> torch.Size:
        """The target output's shape for input ``x``, from a forward stopped at the target."""
        shapes: list[torch.Size] = []

        def hook(module, inputs, output):
            _check_target_output(output)
            shapes.append(output.shape)
            raise _TargetReached

        handle = self._target().register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(x)
        except _TargetReached:
            pass
        finally:
            handle.remove()
        if not shapes:
            raise ValueError("target layer ran 0 times in one forward; pick a layer that runs once")
        return shapes[0]

    def _channel_weights(self, activation: Tensor, y: Tensor, proxies: Tensor, image_size) -> Tensor:
        """alpha (B, P, K): one backward from L = sum_b y_b . p_b per proxy column."""
        columns = []
        for j in range(proxies.shape[1]):
            score = (y * proxies[:, j].to(y.dtype)).sum()
            (grad,) = torch.autograd.grad(score, activation, retain_graph=j + 1 < proxies.shape[1])
            columns.append(self.as_map(grad, image_size).mean((-2, -1)))
        return torch.stack(columns, 1).to(_heat_dtype(activation))

    def _jacobian_means(self, vjp: Callable, y: Tensor, numel: int, pool: Callable[[Tensor], Tensor]) -> Tensor:
        """(B, K, d): ``pool(dy_m/dA)`` for every embedding unit m, from ``vjp`` vmapped
        over chunks of units so that chunk x numel (A's elements) stays under chunk_elements."""
        batch, d = y.shape
        chunk = max(1, min(d, self.chunk_elements // max(1, numel)))
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        batched = torch.func.vmap(vjp)
        parts = []
        with warnings.catch_warnings():
            # Ops without a batching rule (CPU flash attention's backward) run once per
            # cotangent: slower, still exact, and nothing a user can act on.
            warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
            for start in range(0, d, chunk):
                units = eye[start:start + chunk]  # (c, d)
                (grads,) = batched(units[:, None, :].expand(-1, batch, -1))  # (c, B, ...)
                parts.append(pool(grads.flatten(0, 1)).unflatten(0, (len(units), batch)))
        return torch.cat(parts, 0).permute(1, 2, 0).to(_heat_dtype(y))

    def _pooled_jacobian(self, pooled: Tensor) -> Tensor:
        """J_g(v_b)^T (B, K, d) of the tail g at each image's pooled vector v_b."""
        head = self._found_tail().head
        dtype = next(head.parameters(), pooled).dtype  # the head's own dtype
        with _frozen(self.model):  # torch.func.vjp records even under no_grad
            y, vjp = torch.func.vjp(head, pooled.detach().to(dtype))
            return self._jacobian_means(vjp, _checked_embeddings(y), pooled.numel(), lambda g: g).to(pooled.dtype)

    def _affine_matrix(self, act: Tensor) -> Tensor:
        """W^T (K, d) of the affine tail, read off as g(I) - g(0); cached, and read
        again when a parameter of g changes in place (an optimiser step, load_state_dict)."""
        head, k = self._found_tail().head, act.shape[1]
        key = (act.device, act.dtype, k)
        versions = tuple(t._version for t in (*head.parameters(), *head.buffers()))
        cached = self._head_matrix.get(key)
        if cached is None or cached[0] != versions:
            dtype = next(head.parameters(), act).dtype  # the head's own dtype
            probe = torch.cat([torch.eye(k), torch.zeros(1, k)]).to(act.device, dtype)
            out = head(probe)
            cached = (versions, (out[:k] - out[k:]).to(act.dtype))
            self._head_matrix[key] = cached
        return cached[1]


class _TargetReached(Exception):
    """Stops a forward at the target layer (only its output's shape is wanted)."""


def _resolve_reshape(model: nn.Module, reshape: Reshape | None) -> Reshape:
    if reshape is None:
        reshape = getattr(model, "embcam_reshape", None) or "nchw"
    if not callable(reshape) and reshape not in RESHAPES:
        raise ValueError(f"unknown reshape {reshape!r}: use 'tokens' ((B, N, C) transformer tokens), 'nhwc' "
                         "((B, H, W, C), Swin), 'nchw' (none) or a callable returning (B, K, h, w)")
    return reshape


def _script_tail(model: nn.Module) -> Tail | None:
    """A TorchScript EmbeddingNet (fx cannot trace it): closed form when its pool is
    embcam's GlobalAvgPool and its head an affine stack of modules."""
    pool, head = getattr(model, "pool", None), getattr(model, "head", None)
    if _type_name(pool) == "GlobalAvgPool" and head is not None and _is_affine(head):
        return Tail(head, affine=True)
    return None


def _check_target_output(output) -> None:
    if not isinstance(output, Tensor):
        raise ValueError(f"target layer output is {type(output).__name__}, not a tensor; "
                         "pick a layer that returns one tensor")


def _checked_embeddings(y) -> Tensor:
    if not isinstance(y, Tensor) or y.dim() != 2:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"model output must be (B, d) embeddings, got {got}")
    return y


def _proxy_batch(proxies: Tensor | str, y: Tensor) -> tuple[Tensor, bool]:
    """Proxies as (B, P, d), and whether the caller gave one proxy per image."""
    batch, d = y.shape
    if isinstance(proxies, str):
        if proxies != "self":
            raise ValueError(f"proxies must be a tensor or 'self', got {proxies!r}")
        return normalise(y)[:, None, :], True
    p = torch.as_tensor(proxies, device=y.device)
    if p.shape[-1] != d:
        raise ValueError(f"proxy dimension {p.shape[-1]} does not match the embedding dimension {d}")
    if p.dim() == 1:
        return p.expand(batch, d)[:, None, :], True
    if p.dim() in (2, 3) and p.shape[0] == batch:
        return (p[:, None, :], True) if p.dim() == 2 else (p, False)
    raise ValueError(f"proxies must be (d,), (B, d) or (B, P, d) with B={batch}, d={d}; got {tuple(p.shape)}")


@contextmanager
def _frozen(model: nn.Module):
    """Parameters without requires_grad for the body (no parameter gradient is ever
    formed); their flags restored afterwards, even when the body raises."""
    params = list(model.parameters())
    flags = [q.requires_grad for q in params]
    try:
        for q in params:
            q.requires_grad_(False)
        yield
    finally:
        for q, flag in zip(params, flags):
            q.requires_grad_(flag)


def _full_precision(t: Tensor):
    """Autocast off: the CAM arithmetic stays in float32 even when the forward is bf16."""
    return torch.autocast(t.device.type, enabled=False)


def _heat_dtype(t: Tensor) -> torch.dtype:
    """Heatmap arithmetic in float32 at least (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _type_name(module) -> str:
    return getattr(module, "original_name", type(module).__name__)  # ScriptModules keep original_name


def _is_affine(module) -> bool:
    if _type_name(module) not in _AFFINE_HEAD_TYPES:
        return False
    return all(_is_affine(child) for child in module.children())
