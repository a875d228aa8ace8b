"""Which plan a run takes (``choose_plan``): one pass, or for mean proxies the cheapest of
E maps kept in the object store, E maps stored in --out, and two forward passes, from
estimated costs (docs/design.md §2). No Ray, no torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .pipeline import ExplainConfig

KEEP_MAPS_SHARE = 0.1  # keep every E map only while they take at most this share of the object store


def choose_plan(cfg: ExplainConfig, rows: int, shape: dict, image_size: int, store_bytes: float) -> tuple[str, str]:
    """The plan and why. One pass unless mean proxies; for those, from estimated costs:
    E maps in the object store while all of them fit in a small share of it; else E maps
    stored in --out (one decode and one forward per image) while an image's stored map is
    no larger than its decoded model input, which a second pass would decode and run
    through the model again; else two forward passes. On the "vjp" path forming E costs d
    backward passes per image, so two forwards (one backward each) are cheaper there."""
    if cfg.proxy != "mean":
        return "one-pass", f"proxy {cfg.proxy} is known before any image is explained"
    if cfg.strategy != "auto":
        return cfg.strategy, f"--strategy {cfg.strategy}"
    if cfg.top_k_channels:
        return "streaming", "--top-k-channels needs channel weights, which E maps do not give"
    d, h, w = shape["dims"]
    if shape["path"] == "vjp":
        return "streaming", (f"the model has no closed form for its E maps (vjp path: {d} backward passes per "
                             "image), so two forward passes with one backward are cheaper")
    need = rows * d * h * w * 4
    if need <= KEEP_MAPS_SHARE * store_bytes:
        return "embedding-map", (f"E maps need {need / 2**20:.0f} MiB, within {KEEP_MAPS_SHARE:.0%} of the "
                                 f"{store_bytes / 2**20:.0f} MiB object store: one model pass")
    stored = d * h * w * np.dtype(cfg.maps_dtype).itemsize
    decoded = 3 * image_size * image_size
    if stored <= decoded:
        return "stored-maps", (f"an E map ({d}x{h}x{w} {cfg.maps_dtype}, {stored / 1024:.1f} KiB) is smaller than "
                               f"the {image_size}x{image_size} image ({decoded / 1024:.0f} KiB) a second pass would "
                               "decode and run through the model again: one forward, maps stored in --out")
    return "streaming", (f"an E map ({d}x{h}x{w} {cfg.maps_dtype}, {stored / 1024:.0f} KiB) is larger than the "
                         f"{image_size}x{image_size} image ({decoded / 1024:.0f} KiB) a second pass decodes: "
                         "two forward passes, nothing stored")


# The object store a streaming pass may fill (Ray Data's resource limits): this many blocks
# per CPU working for it, the cluster's CPUs when the run starts, or this many per GPU actor
# when more (a cluster that starts with no worker node: cluster.yaml's GPU nodes have 8).
QUEUE_BLOCKS_PER_CPU = 8
CPUS_PER_GPU_ACTOR = 8


def queue_bytes(block_rows: int, image_size: int, dims: tuple[int, int, int], cpus: float, gpu_actors: int) -> int:
    """The object store budget of a streaming pass, so that what waits between its stages
    stays flat however many rows the run has (Ray Data's own bound is half the store): a
    block's row counted at its decoded image plus its E map in float32, more than any
    stage hands on."""
    d, h, w = dims
    row = 3 * image_size * image_size + 4 * d * h * w
    workers = max(int(cpus), CPUS_PER_GPU_ACTOR * gpu_actors, 1)
    return QUEUE_BLOCKS_PER_CPU * workers * block_rows * row
