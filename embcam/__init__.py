"""embcam: EmbeddingCAM heatmaps for embedding networks, at catalog scale.

    from embcam import EmbeddingCAM, load_model
    model, preprocess, spec = load_model("torchvision:resnet50+linear:128")
    model = prepare_for_inference(model)        # optional: BatchNorm folded, channels_last
    out = EmbeddingCAM(model)(images, "self")   # out.embeddings (B, d), out.heatmaps (B, h, w)

The core (this package minus ``embcam.pipeline``) never imports Ray.
"""
__version__ = "0.2.0"  # the one place: pyproject.toml reads it (dynamic version), embcam --version says it

from .cam import CAMResult, EmbeddingCAM, heatmaps_from_maps, normalise
from .inference import prepare_for_inference
from .models import Preprocessing, build_model, load_model, save_checkpoint
from .proxies import MeanProxyAccumulator, load_proxy_bank, onehot, save_proxy_bank

__all__ = [
    "CAMResult", "EmbeddingCAM", "heatmaps_from_maps", "normalise", "prepare_for_inference",
    "Preprocessing", "build_model", "load_model", "save_checkpoint",
    "MeanProxyAccumulator", "load_proxy_bank", "onehot", "save_proxy_bank",
]
