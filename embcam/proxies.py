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
import pyarrow.compute as pc
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
    return proxy_rows(labels, vectors, [int(counts[k]) if counts else 0 for k in labels])


PROXIES_SCHEMA = pa.schema([("label", pa.string()), ("proxy", pa.list_(pa.float32())), ("count", pa.int64())])


def proxy_rows(labels, vectors: np.ndarray, counts) -> pa.Table:
    """A proxies table (``PROXIES_SCHEMA``) from labels, (n, d) vectors and counts."""
    vectors = np.asarray(vectors, np.float32)
    offsets = pa.array(np.arange(len(labels) + 1, dtype=np.int64) * vectors.shape[1], pa.int32())
    return pa.table({
        "label": pa.array(labels, pa.string()),
        "proxy": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel(), pa.float32())),
        "count": pa.array(np.asarray(counts, np.int64), pa.int64()),
    }, schema=PROXIES_SCHEMA)


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


class ProxyFile:
    """label -> proxy vector (float32) from a proxies Parquet file (``label``, ``proxy``),
    read once, on first use, in the process that uses it. The job hands its workers this,
    the file's location, rather than the vectors, so that what ships to each worker does not
    grow with the number of classes. ``get`` answers as ``dict.get`` does."""

    def __init__(self, path: str, filesystem=None):
        self.path, self.filesystem = path, filesystem
        self._read: tuple[np.ndarray, np.ndarray] | None = None

    def __reduce__(self):
        return ProxyFile, (self.path, self.filesystem)  # the location only, never what was read

    def get(self, label: str, default=None) -> np.ndarray | None:
        if self._read is None:
            self._read = _read_proxies(self.path, self.filesystem)
        labels, vectors = self._read
        i = int(np.searchsorted(labels, label))
        return vectors[i] if i < len(labels) and labels[i] == label else default


_LAST_READ: dict = {}
"""The proxies file this process read last, by (path, size, modification time): a job's CPU
tasks each receive a ProxyFile of their own, and a worker process runs many of them."""


def _read_proxies(path: str, filesystem) -> tuple[np.ndarray, np.ndarray]:
    """A proxies file's labels, sorted (for a binary search per label), and their vectors."""
    import pyarrow.fs as pafs

    fs, where = (filesystem, path) if filesystem is not None else pafs.FileSystem.from_uri(str(path))
    info = fs.get_file_info(where)
    key = (path, info.size, info.mtime_ns)
    if key not in _LAST_READ:
        table = pq.read_table(where, columns=["label", "proxy"], filesystem=fs)
        labels = table.column("label").to_numpy(zero_copy_only=False).astype(str)
        values = pc.list_flatten(table.column("proxy")).to_numpy()
        vectors = values.reshape(len(labels), -1 if len(labels) else 0).astype(np.float32, copy=False)
        order = np.argsort(labels, kind="stable")
        _LAST_READ.clear()
        _LAST_READ[key] = labels[order], vectors[order]
    return _LAST_READ[key]

