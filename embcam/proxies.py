"""Proxy vectors: class representatives in embedding space (paper §3.2.1).

- ``self``: the image's own normalised embedding (computed inside EmbeddingCAM).
- ``mean``: p_c = normalise(mean_j normalise(y_j)) over the images j of class c,
  accumulated in a stream: :class:`MeanProxyAccumulator` adds batches, merges with
  accumulators from other workers (float64 sums, so any split gives the same
  result), and finalises to label -> vector.
- ``onehot``: e_c on a classifier's logits, which turns EmbeddingCAM into Grad-CAM.
- a proxy bank: label -> vector in Parquet (``label``, ``proxy``, ``count``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def onehot(indices, num_classes: int, dtype=None):
    """(B, num_classes) one-hot proxies for class ``indices`` (a torch tensor, float32 unless
    ``dtype`` says otherwise)."""
    import torch  # only here: the job's CPU tasks use this module and never load torch

    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}), got {idx.tolist()}")
    return torch.nn.functional.one_hot(idx, num_classes).to(dtype or torch.float32)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here)
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


class MeanProxyAccumulator:
    """Streaming per-class sums of normalised embeddings (float64) and counts."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, embeddings, labels: Iterable) -> "MeanProxyAccumulator":
        """Add (N, d) unnormalised embeddings with their N labels (None labels skipped)."""
        y = _as_numpy(embeddings)
        labels = list(labels)
        if y.ndim != 2 or len(labels) != y.shape[0]:
            raise ValueError(f"need (N, d) embeddings and N labels; got {y.shape} and {len(labels)} labels")
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(norms)):
            raise ValueError("an embedding is zero or not finite: it has no direction to average")
        y_hat = y / norms
        keys = np.asarray([str(v) if v is not None else "" for v in labels])
        valid = np.asarray([v is not None for v in labels])
        for label in np.unique(keys[valid]):
            rows = valid & (keys == label)
            self._add_sum(str(label), y_hat[rows].sum(0), int(rows.sum()))
        return self

    def add_partial(self, label: str, total, count: int) -> "MeanProxyAccumulator":
        """Add a partial sum of normalised embeddings computed elsewhere."""
        self._add_sum(str(label), _as_numpy(total), int(count))
        return self

    def merge(self, other: "MeanProxyAccumulator") -> "MeanProxyAccumulator":
        for label, total in other.sums.items():
            self._add_sum(label, total, other.counts[label])
        return self

    def _add_sum(self, label: str, total: np.ndarray, count: int) -> None:
        if label in self.sums:
            if self.sums[label].shape != total.shape:
                raise ValueError(f"class {label!r}: embedding dimension {total.shape} vs {self.sums[label].shape}")
            self.sums[label] = self.sums[label] + total
            self.counts[label] += count
        else:
            self.sums[label] = total.astype(np.float64).copy()
            self.counts[label] = count

    def partials(self) -> list[dict]:
        """Rows (label, sum as float64 list, count): what a map task emits."""
        return [{"label": k, "sum": self.sums[k].tolist(), "count": self.counts[k]} for k in sorted(self.sums)]

    def finalize(self) -> dict[str, np.ndarray]:
        """label -> normalise(mean of normalised embeddings), float32."""
        out = {}
        for label in sorted(self.sums):
            mean = self.sums[label] / self.counts[label]
            norm = np.linalg.norm(mean)
            if norm == 0:
                raise ValueError(f"class {label!r}: normalised embeddings cancel out, the mean proxy is undefined")
            out[label] = (mean / norm).astype(np.float32)
        return out


def proxy_table(proxies: Mapping[str, np.ndarray], counts: Mapping[str, int] | None = None) -> pa.Table:
    labels = sorted(proxies)
    vectors = np.stack([np.asarray(proxies[k], np.float32) for k in labels]) if labels else np.zeros((0, 0), np.float32)
    offsets = pa.array(np.arange(len(labels) + 1, dtype=np.int64) * vectors.shape[1], pa.int32())
    return pa.table({
        "label": pa.array(labels, pa.string()),
        "proxy": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel(), pa.float32())),
        "count": pa.array([int(counts[k]) if counts else 0 for k in labels], pa.int64()),
    })


def save_proxy_bank(path, proxies: Mapping[str, np.ndarray], counts: Mapping[str, int] | None = None,
                    filesystem=None) -> None:
    """Write label -> vector (+ count) to Parquet."""
    pq.write_table(proxy_table(proxies, counts), path, filesystem=filesystem)


def load_proxy_bank(path, filesystem=None) -> dict[str, np.ndarray]:
    """Read a proxy bank (columns ``label``, ``proxy``); checks labels and dimensions."""
    table = pq.read_table(path, filesystem=filesystem)
    for column in ("label", "proxy"):
        if column not in table.column_names:
            raise ValueError(f"proxy bank {path}: missing column {column!r} (has {table.column_names})")
    labels = table.column("label").to_pylist()
    vectors = table.column("proxy").to_pylist()
    bad = [i for i, (k, v) in enumerate(zip(labels, vectors)) if k is None or v is None]
    if bad:
        raise ValueError(f"proxy bank {path}: null label or proxy in rows {bad[:5]}")
    dupes = sorted(k for k, n in Counter(labels).items() if n > 1)
    if dupes:
        raise ValueError(f"proxy bank {path}: duplicate labels {dupes[:5]}")
    dims = {len(v) for v in vectors}
    if len(dims) > 1:
        raise ValueError(f"proxy bank {path}: proxies of different dimensions {sorted(dims)}")
    return {str(k): np.asarray(v, dtype=np.float32) for k, v in zip(labels, vectors)}
