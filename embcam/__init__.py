"""embcam: EmbeddingCAM heatmaps for embedding networks, at catalog scale.

    from embcam import EmbeddingCAM, load_model
    model, preprocess, spec = load_model("torchvision:resnet50+linear:128")
    model = prepare_for_inference(model)        # optional: BatchNorm folded, channels_last
    out = EmbeddingCAM(model)(images, "self")   # out.embeddings (B, d), out.heatmaps (B, h, w)

Only the job's Ray wiring (``embcam.job``: pipeline, passes, reduce, pairs_pass, image_source,
console, user_code) imports Ray. The names below are imported when first used, so that
reading results (``embcam.results``, ``embcam show``, ``embcam report``) does not import torch.
"""
import importlib

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (dynamic version), embcam --version says it

_HOMES = {
    "cam": ("CAMResult", "EmbeddingCAM", "heatmaps_from_maps", "normalise"),
    "inference": ("prepare_for_inference",),
    "models": ("Preprocessing", "build_model", "load_model", "save_checkpoint"),
    "proxies": ("MeanProxyAccumulator", "load_proxy_bank", "onehot", "save_proxy_bank"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'embcam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
