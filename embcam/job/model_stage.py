"""The explain job's model stage, without Ray: a pool of ``ExplainModel`` workers, one
model each, turns batches of decoded images into embeddings, heatmaps or E maps. The
CPU stages around it (decode, metrics, results rows) are ``embcam.job.stages``, which never
imports torch, so the job's CPU tasks start without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..cam import EmbeddingCAM, normalise
from ..data.schemas import OK
from ..faults import fault_point
from ..inference import prepare_for_inference
from ..models import default_target_layer, load_model
from ..proxies import ProxyFile
from .attempts import Attempts
from .stages import assign_proxies, fail_rows, reason, with_writable_status

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """What every model worker needs to rebuild the same model."""

    spec: str | None = None
    checkpoint: str | None = None
    target_layer: str | None = None
    image_size: int | None = None
    compile_batch_size: int | None = None  # torch.compile the backbone for this batch size
    reshape: str | None = None             # "tokens" | "nhwc": how the target's output becomes (B, K, h, w)
    precision: str = "fp32"                # the forward's autocast dtype (PRECISIONS); the CAM stays float32
    allow_partial_checkpoint: bool = False  # the driver found the checkpoint partial and was told to go on


def resolved_target(model, target_layer: str | None) -> str | None:
    """The layer explained: the one named, else the model's default (None: its split point)."""
    return target_layer if target_layer is not None else default_target_layer(model)


class ExplainModel:
    """One model per worker: embeddings and heatmaps for a batch of loaded images.

    ``proxy_mode``: self | onehot | bank | mean (the bank/mean vectors in ``proxies``).
    ``strategy``: the CAM strategy (``embcam.cam.cheapest_strategy`` picks it per pass).
    ``output``: "heatmaps" (heatmaps now), "maps" (embeddings and embedding maps E, for
    proxies computed later) or "embeddings" (embeddings only: the mean-proxy pass 1 of the
    streaming plans). ``keep_maps``: heatmaps and the E maps too (to be stored;
    ``embcam.data.maps``). The forward runs under autocast at the model config's precision;
    the CAM arithmetic and every returned value stay float32.
    """

    def __init__(self, model: ModelConfig, proxy_mode: str, proxies: dict | ProxyFile | None = None,
                 strategy: str = "embedding-map", top_k_channels: int | None = None,
                 output: str = "heatmaps", device: str | None = None, num_threads: int | None = None,
                 run=None, keep_maps: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":  # Ray sets OMP_NUM_THREADS=1 in workers; the CPU model wants the cores
            torch.set_num_threads(num_threads or usable_cpus())
        elif model.precision == "fp32":  # TF32 matmuls and convolutions (Ampere and newer; ignored before)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast_dtype = PRECISIONS[model.precision]
        net, self.preprocess, _ = load_model(model.spec, model.checkpoint, model.image_size,
                                              model.allow_partial_checkpoint)
        # BatchNorm folded, channels_last: 1.2-2x faster, same maps to ~1e-6 (BENCHMARKS.md).
        # The target is resolved first: a BatchNorm after a default target layer must stay unfolded.
        self.model = prepare_for_inference(net, resolved_target(net, model.target_layer),
                                           compile_batch_size=model.compile_batch_size).to(self.device)
        self.proxy_mode, self.output, self.keep_maps = proxy_mode, output, keep_maps
        self.cam = EmbeddingCAM(self.model, model.target_layer, strategy, reshape=model.reshape)
        # the E maps to return: the heatmaps' own when the strategy forms them, else one more computation
        self.cam_maps = self.cam if strategy == "embedding-map" or not (output == "maps" or keep_maps) else (
            EmbeddingCAM(self.model, model.target_layer, "embedding-map", reshape=model.reshape))
        self.cam_topk = (EmbeddingCAM(self.model, model.target_layer, "autograd", top_k_channels, reshape=model.reshape)
                         if top_k_channels else None)
        self.proxies = proxies  # label -> vector: a dict, or a ProxyFile read here on first use
        # A probe (which also compiles): the output shapes, so every batch has every column.
        size = self.preprocess.size
        with self._autocast():
            probe = self.cam(torch.zeros(1, 3, size, size, device=self.device))
        self.num_outputs, self.map_shape = probe.embeddings.shape[-1], tuple(probe.heatmaps.shape[1:])
        self.attempts = Attempts(run, "model") if run is not None else None  # rows that kill the worker

    def __call__(self, batch: dict) -> dict:
        return self.attempts(batch, self._call) if self.attempts else self._call(batch)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype != torch.float32)

    def _call(self, batch: dict) -> dict:
        ok = np.flatnonzero(batch["status"] == OK)
        fault_point("model" if self.output == "heatmaps" else "embed", batch["image_id"][ok])  # pass 2 or 1
        n = len(batch["status"])
        out = with_writable_status({k: v for k, v in batch.items() if k != "image"})
        out["embedding"] = np.zeros((n, self.num_outputs), np.float32)
        if self.output == "maps" or self.keep_maps:
            out["maps"] = np.zeros((n, self.num_outputs) + self.map_shape, np.float32)
        if self.output == "heatmaps":
            out["proxy_kind"] = np.array([self.proxy_mode] * n, dtype=object)
            out["proxy_label"] = np.array([None] * n, dtype=object)
            out["heatmap"] = np.zeros((n,) + self.map_shape, np.float32)
            out["score"] = np.zeros(n, np.float32)
            out["cosine"] = np.zeros(n, np.float32)
            if self.cam_topk is not None:
                out["heatmap_topk"] = np.zeros((n,) + self.map_shape, np.float32)
        if len(ok):
            with self._autocast():
                self._split_on_error(lambda rows: self._explain(batch, out, rows), out, ok)
        return out

    def _split_on_error(self, fn, out: dict, ok) -> None:
        """``fn(ok)``; when it raises (say, CUDA out of memory), each half again, down to
        single rows, which then fail with the reason: one bad batch never fails its neighbours."""
        try:
            fn(ok)
        except Exception as exc:  # noqa: BLE001 - the rows fail, the job goes on
            if len(ok) == 1:
                fail_rows(out, ok, reason("model", exc))
                return
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._split_on_error(fn, out, ok[:len(ok) // 2])
            self._split_on_error(fn, out, ok[len(ok) // 2:])

    def _images(self, batch: dict, rows) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["image"][rows]))
        if self.device.type == "cuda":  # pinned: the copy to the GPU runs without a staging copy, asynchronously
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return self.preprocess(pixels)

    def _explain(self, batch: dict, out: dict, ok) -> None:
        x = self._images(batch, ok)
        if self.output == "embeddings":
            with torch.inference_mode():
                out["embedding"][ok] = self.model(x).float().cpu().numpy()
            return
        if self.output == "maps":
            y, maps = self.cam_maps.embedding_maps(x)
            out["embedding"][ok] = y.float().cpu().numpy()
            out["maps"][ok] = maps.float().cpu().numpy()
            return
        proxies, rows = self._row_proxies(batch, out, ok)
        if self.proxy_mode == "self":
            result = self.cam(x, "self")
            proxies = normalise(result.embeddings.float())
        else:
            keep = np.isin(ok, rows)
            x, ok = x[torch.from_numpy(keep).to(self.device)], ok[keep]
            if not len(ok):
                return
            result = self.cam(x, proxies)
        y = result.embeddings.float()
        p = proxies.to(y)
        out["embedding"][ok] = y.cpu().numpy()
        out["heatmap"][ok] = result.heatmaps.float().cpu().numpy()
        out["score"][ok] = (y * p).sum(-1).cpu().numpy()
        out["cosine"][ok] = (normalise(y) * normalise(p)).sum(-1).cpu().numpy()
        if self.keep_maps:
            maps = result.maps if result.maps is not None else self.cam_maps.embedding_maps(x)[1]
            out["maps"][ok] = maps.float().cpu().numpy()
        if self.cam_topk is not None:
            top = self.cam_topk(x, "self" if self.proxy_mode == "self" else p)
            out["heatmap_topk"][ok] = top.heatmaps.float().cpu().numpy()

    def _row_proxies(self, batch: dict, out: dict, ok):
        """One proxy per OK row (B, d) and the rows that have one; rows without fail."""
        if self.proxy_mode == "self":
            return None, ok
        rows, vectors = assign_proxies(batch, out, ok, self._proxy_for, self.proxy_mode)
        return (torch.stack(vectors).to(self.device) if vectors else None), np.array(rows, dtype=int)

    def _proxy_for(self, label) -> torch.Tensor | None:
        if label is None:
            return None
        if self.proxy_mode == "onehot":
            if not str(label).isdigit() or int(label) >= self.num_outputs:
                return None
            return torch.nn.functional.one_hot(torch.tensor(int(label)), self.num_outputs).float()
        vector = self.proxies.get(str(label)) if self.proxies is not None else None
        return None if vector is None else torch.as_tensor(vector, dtype=torch.float32)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS has one (taskset, a
    container's cpuset), which os.cpu_count() ignores; more threads than that only wait."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
