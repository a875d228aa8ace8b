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
  ReLU(E . p) with no further network pass. When the target layer feeds global
  average pooling and an affine head, M = W^T / Z (paper eq. 17) and no backward
  pass runs at all; otherwise M comes from batched vector-Jacobian products, d of
  them per image, chunked so memory stays bounded.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import default_target_layer, get_layer

STRATEGIES = ("autograd", "embedding-map")
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


def normalise(y: Tensor, eps: float = 1e-12) -> Tensor:
    """y / |y| along the last axis (a zero vector stays zero)."""
    return y / y.norm(dim=-1, keepdim=True).clamp_min(eps)


class EmbeddingCAM:
    """Heatmaps for an embedding network with respect to proxy vectors.

    ``target_layer``: a dotted module name, or None for the model's default (the
    ``forward_features`` output of models that split into ``forward_features`` /
    ``forward_head``, e.g. embcam's ``EmbeddingNet`` and its TorchScript export).
    ``top_k_channels``: keep only the k channels with the largest alpha (autograd).
    ``chunk_elements``: memory bound for the batched VJPs of the embedding-map path.
    The model is put in eval mode: batch statistics would make one image's map
    depend on the rest of the batch.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, strategy: str = "autograd",
                 top_k_channels: int | None = None, chunk_elements: int = 1 << 25):
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
        name = default_target_layer(model) if target_layer is None else target_layer
        # Split mode: the target is the forward_features output; no hooks needed
        # (this is also how TorchScript models, which ignore Python hooks, are explained).
        self._split = name is None or (name == "backbone" and hasattr(model, "forward_head"))
        self._layer = None if self._split else get_layer(model, name)
        if isinstance(model, torch.jit.ScriptModule) and not self._split:
            raise ValueError("TorchScript models are explained at their forward_features output; "
                             "leave target_layer unset")
        self._head_matrix: dict[tuple, Tensor] = {}

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
        with self._graph_from_target(images) as (activation, y):
            p, squeeze = _proxy_batch(proxies, y.detach())
            alpha = self._channel_weights(activation, y, p)
        activation = activation.detach()
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
        if self._closed_form():
            with torch.inference_mode():
                activation = self.model.forward_features(images)
                y = self.model.forward_head(activation)
                w_t = self._affine_head_matrix(activation)  # (K, d)
                z = activation.shape[-2] * activation.shape[-1]
                act = activation.to(_heat_dtype(activation))
                with _full_precision(act):
                    maps = torch.einsum("bkhw,kd->bdhw", act, w_t.to(act.dtype)) / z
            return y.clone(), maps.clone()  # clones: plain tensors, usable outside inference mode
        with self._graph_from_target(images) as (activation, y):
            m = self._jacobian_means(activation, y)  # (B, K, d)
        act = activation.detach().to(m.dtype)
        with _full_precision(act):
            return y.detach(), torch.einsum("bkhw,bkd->bdhw", act, m)

    # -- internals ----------------------------------------------------------------------

    @contextmanager
    def _graph_from_target(self, images: Tensor):
        """Forward with frozen parameters; yields (A as a leaf requiring grad, y).

        Nothing before the target layer is recorded (no input or parameter needs a
        gradient), hooks live only for the call, and parameter flags are restored even
        when the body raises."""
        params = list(self.model.parameters())
        flags = [q.requires_grad for q in params]
        captured: list[Tensor] = []
        handle = None
        try:
            for q in params:
                q.requires_grad_(False)
            with torch.enable_grad():
                x = images.detach()
                if self._split:
                    with torch.no_grad():
                        features = self.model.forward_features(x)
                    activation = features.detach().requires_grad_(True)
                    y = self.model.forward_head(activation)
                else:
                    def hook(module, inputs, output):
                        if not isinstance(output, Tensor):
                            raise TypeError(f"target layer output is {type(output).__name__}, not a tensor")
                        leaf = output.detach().requires_grad_(True)
                        captured.append(leaf)
                        return leaf.clone()  # a non-leaf, so later in-place ops stay legal
                    handle = self._layer.register_forward_hook(hook)
                    y = self.model(x)
                    handle.remove()
                    handle = None
                    if len(captured) != 1:
                        raise RuntimeError(f"target layer ran {len(captured)} times in one forward; "
                                           "pick a layer that runs once")
                    activation = captured[0]
                if y.dim() != 2:
                    raise ValueError(f"model output must be (B, d) embeddings, got shape {tuple(y.shape)}")
                if activation.dim() != 4:
                    raise ValueError(f"target activation must be (B, K, h, w), got {tuple(activation.shape)}")
                yield activation, y
        finally:
            if handle is not None:
                handle.remove()
            for q, flag in zip(params, flags):
                q.requires_grad_(flag)

    def _channel_weights(self, activation: Tensor, y: Tensor, proxies: Tensor) -> Tensor:
        """alpha (B, P, K): one backward from L = sum_b y_b . p_b per proxy column."""
        columns = []
        for j in range(proxies.shape[1]):
            score = (y * proxies[:, j].to(y.dtype)).sum()
            (grad,) = torch.autograd.grad(score, activation, retain_graph=j + 1 < proxies.shape[1])
            columns.append(grad.mean((-2, -1)))
        return torch.stack(columns, 1).to(_heat_dtype(activation))

    def _jacobian_means(self, activation: Tensor, y: Tensor) -> Tensor:
        """M (B, K, d): spatial means of dy_m/dA for every embedding unit m, by batched
        VJPs in chunks of units so that chunk x B x K x h x w stays under chunk_elements."""
        batch, d = y.shape
        chunk = max(1, min(d, self.chunk_elements // max(1, activation.numel())))
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        parts = []
        for start in range(0, d, chunk):
            units = eye[start:start + chunk]  # (c, d)
            grad_outputs = units[:, None, :].expand(-1, batch, -1)
            (grads,) = torch.autograd.grad(y, activation, grad_outputs, retain_graph=True,
                                           is_grads_batched=True)  # (c, B, K, h, w)
            parts.append(grads.mean((-2, -1)))
        return torch.cat(parts, 0).permute(1, 2, 0).to(_heat_dtype(activation))

    def _closed_form(self) -> bool:
        """True when y = affine(global-average-pool(A)): M = W^T / Z, no backward."""
        if not self._split:
            return False
        pool, head = getattr(self.model, "pool", None), getattr(self.model, "head", None)
        return _type_name(pool) == "GlobalAvgPool" and head is not None and _is_affine(head)

    def _affine_head_matrix(self, activation: Tensor) -> Tensor:
        """W^T (K, d) of the affine head, read off as head(I) - head(0); cached."""
        key = (activation.device, activation.dtype, activation.shape[1])
        if key not in self._head_matrix:
            k = activation.shape[1]
            weight = next(self.model.head.parameters(), activation)  # the head's own dtype
            probe = torch.cat([torch.eye(k), torch.zeros(1, k)]).to(activation.device, weight.dtype)
            with _full_precision(activation):
                out = self.model.head(probe)
            self._head_matrix[key] = (out[:k] - out[k:]).to(_heat_dtype(activation)).clone()
        return self._head_matrix[key]


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
