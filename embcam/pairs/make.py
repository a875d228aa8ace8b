"""``embcam make-pairs``: a pairs file for ``embcam explain --pairs`` from a finished run's
embeddings, so pair explanations can be tried without a pairs file of one's own.

* Nearest neighbours (``--neighbours K``): each query's K most similar ok images of the run
  by cosine of the embeddings, itself excluded. Columns query_id, match_id, rank (1..K),
  neighbour_cosine (not ``cosine``: the pairs contract's own column, which explain computes
  and which a pairs file may not carry). Ties (equal cosines as computed) go to the smaller
  image_id. Cost: O(Q n d) time for Q queries among n images of d dimensions (every query
  against every image); memory: the n x d embeddings in float64 plus one block of queries
  x n similarities (float64, at most :data:`BLOCK_BYTES`) and its selection indices (as
  large again).
* Same label (``--same-label N``): N pairs drawn uniformly without replacement from all
  unordered pairs of distinct ok images with the same label (no self pair, no pair twice in
  either order). Columns query_id, match_id (query_id < match_id), label.

Only ok rows with an embedding count; rows whose embedding has zero norm or a non-finite
value are left out (no cosine is defined) and counted. The core functions take numpy arrays
and need no Ray.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embcam.arguments import BAD_INPUT, OneLineParser, error_line
from embcam.data.schemas import OK
from embcam.results import open_results, results_schema

BLOCK_BYTES = 128 << 20  # similarities held at once (one block of queries x all images, float64)
NEAR_TIE = 1e-9  # far above a float64 matrix product's rounding of unit-vector cosines


@dataclass
class Embeddings:
    """The ok rows of a run with a usable embedding, sorted by image_id."""

    ids: np.ndarray         # str objects, sorted, distinct
    labels: np.ndarray      # str objects or None
    vectors: np.ndarray     # (n, d) float32, as stored
    left_out: int           # ok rows dropped: zero-norm or non-finite embedding


def read_embeddings(run: str, split: str | None = None) -> Embeddings:
    """The embeddings of the ok rows of ``run`` (optionally of one ``split``)."""
    schema = results_schema(run)
    if "embedding" not in schema.names:
        raise ValueError(f"run {run}: results have no embedding column")
    if split is not None and "split" not in schema.names:
        raise ValueError(f"run {run}: results have no split column (asked for split {split!r})")
    where = pc.field("status") == OK
    if split is not None:
        where &= pc.field("split") == split
    columns = ["image_id", "embedding"] + (["label"] if "label" in schema.names else [])
    table = open_results(run, columns=columns, filter=where).to_table(columns=columns)
    table = table.filter(pc.is_valid(table.column("embedding")))
    where_text = f" of split {split!r}" if split is not None else ""
    if table.num_rows == 0:
        raise ValueError(f"run {run}: no ok row{where_text} has an embedding")
    ids = table.column("image_id").to_numpy(zero_copy_only=False).astype(object)
    if any(i is None for i in ids):
        raise ValueError(f"run {run}: results have a null image_id")
    unique, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"run {run}: image_id {unique[counts > 1][0]!r} appears more than once in results "
                         "(duplicate rows from a re-run?)")
    embedding = table.column("embedding").combine_chunks()
    lengths = pc.list_value_length(embedding).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any() or lengths[0] == 0:
        i = int(np.argmax(lengths != lengths[0])) if lengths[0] else 0
        raise ValueError(f"run {run}: embedding of image_id {ids[i]!r} has {lengths[i]} values, "
                         f"the first row's has {lengths[0]}")
    flat = pc.list_flatten(embedding)
    if flat.null_count:
        raise ValueError(f"run {run}: an embedding holds a null value")
    vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(ids), -1)
    labels = (table.column("label").to_numpy(zero_copy_only=False).astype(object)
              if "label" in table.column_names else np.full(len(ids), None, object))
    usable = np.isfinite(vectors).all(1) & (np.linalg.norm(vectors.astype(np.float64), axis=1) > 0)
    order = np.argsort(ids[usable].astype(str), kind="stable")
    return Embeddings(ids=ids[usable][order], labels=labels[usable][order], vectors=vectors[usable][order],
                      left_out=int((~usable).sum()))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm, in float64."""
    v = np.asarray(vectors, np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def block_size(n: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Queries per block so that a block's similarities (float64, x n) fit in ``block_bytes``."""
    return max(1, block_bytes // (8 * max(n, 1)))


def nearest_neighbours(vectors: np.ndarray, k: int, queries: np.ndarray | None = None,
                       block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of each query row by cosine, the query itself excluded.

    ``vectors``: (n, d), no zero or non-finite row. ``queries``: row indices (default all).
    Returns (indices (q, k) int64, cosines (q, k) float64), each query's neighbours by
    decreasing cosine, equal cosines by increasing row index. Blocks of ``block_rows``
    queries (default :func:`block_size`) are compared with all rows at once.
    """
    unit = unit_rows(vectors)
    n = len(unit)
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    if k >= n:
        raise ValueError(f"K = {k} neighbours need at least {k + 1} images; there are {n}")
    queries = np.arange(n) if queries is None else np.asarray(queries, np.int64)
    step = block_rows or block_size(n)
    if step < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    indices = np.empty((len(queries), k), np.int64)
    cosines = np.empty((len(queries), k), np.float64)
    for start in range(0, len(queries), step):
        rows = queries[start:start + step]
        sims = unit[rows] @ unit.T
        sims[np.arange(len(rows)), rows] = -np.inf  # never its own neighbour
        indices[start:start + len(rows)], cosines[start:start + len(rows)] = _top_k(unit, rows, sims, k)
    return indices, cosines


def pair_cosines(unit: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the row pairs (a, b) of ``unit``, each summed on its own: the same bits
    whatever else is computed with it (a matrix product's rounding depends on its shape)."""
    return (unit[a] * unit[b]).sum(-1)


def _top_k(unit: np.ndarray, rows: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query row the k most similar rows (ties: smallest index first), in that order.

    ``sims`` (the block's matrix product) only selects candidates: every row within
    :data:`NEAR_TIE` of the k-th is reconsidered with :func:`pair_cosines`, so neither the
    choice nor the values depend on the block size."""
    top = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]  # no negated copy of the block
    lowest = np.take_along_axis(sims, top, 1).min(1) - NEAR_TIE
    values = pair_cosines(unit, rows[:, None], top)
    for r in np.flatnonzero((sims >= lowest[:, None]).sum(1) > k):  # near ties at the k-th
        candidates = np.flatnonzero(sims[r] >= lowest[r])
        exact = pair_cosines(unit, rows[r], candidates)
        keep = np.lexsort((candidates, -exact))[:k]
        top[r], values[r] = candidates[keep], exact[keep]
    order = np.lexsort((top, -values), axis=1)
    return np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)


def sample_queries(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    """Row indices of the queries: all ``n``, or ``max_queries`` of them drawn without
    replacement with ``seed`` (sorted)."""
    if max_queries is None or max_queries >= n:
        return np.arange(n)
    if max_queries < 1:
        raise ValueError(f"--max-queries must be >= 1, got {max_queries}")
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))


def same_label_pairs(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` distinct unordered pairs (i, j), i < j, of rows with the same non-null
    label, drawn uniformly without replacement with ``seed``: an (count, 2) int64 array,
    ordered by label then j then i."""
    if count < 1:
        raise ValueError(f"N must be >= 1, got {count}")
    labels = np.asarray(labels, object)
    has = np.array([v is not None for v in labels], bool)
    names, inverse = np.unique(labels[has].astype(str), return_inverse=True)
    members = [np.flatnonzero(has)[inverse == g] for g in range(len(names))]
    sizes = np.array([len(m) for m in members], np.int64)
    per_label = sizes * (sizes - 1) // 2
    total = int(per_label.sum())
    if total == 0:
        raise ValueError("no label has two ok images with embeddings: no same-label pair exists")
    if count > total:
        raise ValueError(f"N = {count} same-label pairs asked for, but only {total} exist")
    picked = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    offsets = np.concatenate([[0], np.cumsum(per_label)])
    group = np.searchsorted(offsets, picked, side="right") - 1
    i, j = _triangle(picked - offsets[group])
    out = np.empty((count, 2), np.int64)
    for g in np.unique(group):
        at = group == g
        out[at, 0], out[at, 1] = members[g][i[at]], members[g][j[at]]
    return out


def _triangle(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair number p -> (i, j), 0 <= i < j, numbering the pairs by j then i: p = j(j-1)/2 + i."""
    p = np.asarray(p, np.int64)
    j = ((1 + np.sqrt(1 + 8 * p.astype(np.float64))) / 2).astype(np.int64)
    for _ in range(3):  # float rounding: nudge j into place
        j = np.where(j * (j - 1) // 2 > p, j - 1, j)
        j = np.where((j + 1) * j // 2 <= p, j + 1, j)
    return p - j * (j - 1) // 2, j


def neighbour_table(emb: Embeddings, k: int, max_queries: int | None = None, seed: int = 0,
                    block_rows: int | None = None) -> pa.Table:
    """query_id, match_id, rank, neighbour_cosine: the K nearest neighbours of each (sampled) query."""
    queries = sample_queries(len(emb.ids), max_queries, seed)
    indices, cosines = nearest_neighbours(emb.vectors, k, queries, block_rows)
    return pa.table({"query_id": pa.array(np.repeat(emb.ids[queries], k).astype(str), pa.string()),
                     "match_id": pa.array(emb.ids[indices.reshape(-1)].astype(str), pa.string()),
                     "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(queries))),
                     "neighbour_cosine": pa.array(cosines.reshape(-1), pa.float64())})


def same_label_table(emb: Embeddings, count: int, seed: int = 0) -> pa.Table:
    """query_id, match_id, label: ``count`` random same-label pairs."""
    pairs = same_label_pairs(emb.labels, count, seed)
    return pa.table({"query_id": pa.array(emb.ids[pairs[:, 0]].astype(str), pa.string()),
                     "match_id": pa.array(emb.ids[pairs[:, 1]].astype(str), pa.string()),
                     "label": pa.array(emb.labels[pairs[:, 0]].astype(str), pa.string())})


def make_pairs(run: str, *, neighbours: int | None = None, same_label: int | None = None,
               max_queries: int | None = None, seed: int = 0, split: str | None = None,
               block_rows: int | None = None) -> tuple[pa.Table, Embeddings]:
    """The pairs table of one mode (exactly one of ``neighbours`` and ``same_label``)."""
    if (neighbours is None) == (same_label is None):
        raise ValueError("give exactly one of --neighbours K and --same-label N")
    if neighbours is not None and neighbours < 1:
        raise ValueError(f"--neighbours must be >= 1, got {neighbours}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"--max-queries must be >= 1, got {max_queries}")
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"--block-rows must be >= 1, got {block_rows}")
    emb = read_embeddings(run, split)
    if neighbours is not None:
        return neighbour_table(emb, neighbours, max_queries, seed, block_rows), emb
    return same_label_table(emb, same_label, seed), emb


def write_pairs(table: pa.Table, out: str) -> None:
    """The pairs file (Parquet); a local folder is made first."""
    if "://" not in out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    pq.write_table(table, out)


def main(argv: list[str] | None = None) -> int:
    """``embcam make-pairs RUN --out PAIRS.parquet (--neighbours K | --same-label N)``."""
    parser = OneLineParser(
        prog="embcam make-pairs",
        description="Write a pairs file for `embcam explain --pairs` from a finished run's embeddings: "
                    "each ok image's K nearest neighbours by cosine (self excluded; O(Q n d) time for Q "
                    "queries among n images of d dimensions; memory 8 n d bytes plus twice "
                    f"{BLOCK_BYTES >> 20} MiB), or N random pairs of distinct ok images with the same label.")
    parser.add_argument("run", metavar="RUN", help="run folder of embcam explain (its results carry embeddings)")
    parser.add_argument("--out", required=True, help="pairs file to write (Parquet)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--neighbours", type=int, metavar="K",
                      help="each query's K nearest neighbours: columns query_id, match_id, rank, "
                           "neighbour_cosine")
    mode.add_argument("--same-label", type=int, metavar="N",
                      help="N random same-label pairs (no self pair, none twice): columns query_id, "
                           "match_id, label")
    parser.add_argument("--max-queries", type=int, metavar="Q",
                        help="with --neighbours: Q queries drawn at random (--seed) instead of every image")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    parser.add_argument("--split", help="only rows of this split (results column split)")
    parser.add_argument("--block-rows", type=int, metavar="B",
                        help=f"queries compared at once (default: as many as fit in {BLOCK_BYTES >> 20} MiB "
                             "of similarities)")
    args = parser.parse_args(argv)
    if args.max_queries is not None and args.neighbours is None:
        parser.error("--max-queries goes with --neighbours")
    try:
        table, emb = make_pairs(args.run, neighbours=args.neighbours, same_label=args.same_label,
                                max_queries=args.max_queries, seed=args.seed, split=args.split,
                                block_rows=args.block_rows)
        write_pairs(table, args.out)
    except (ValueError, OSError, pa.ArrowException) as e:
        print(f"embcam make-pairs: error: {error_line(e)}", file=sys.stderr)
        return BAD_INPUT
    what = (f"the {args.neighbours} nearest neighbours of {table.num_rows // args.neighbours} queries"
            if args.neighbours is not None else "random same-label pairs")
    left = f"; {emb.left_out} ok rows without a usable embedding left out" if emb.left_out else ""
    print(f"embcam make-pairs: {table.num_rows} pairs ({what} among {len(emb.ids)} images{left}) -> {args.out}")
    return 0
