"""Pass 1's reduce, on Ray: the partial-sum pieces of a mean-proxy run become its class
proxies without the driver ever holding them all (docs/design.md §2)."""
from __future__ import annotations

from ..data.runstate import PARTIALS, STATE, RunFolder
from . import tasks

# pieces summed by one task, and partial-sum values (float64) per bucket at most, counting
# every row of a piece as a class of its own (256 MB)
REDUCE_GROUP_PIECES = 64
REDUCE_BUCKET_VALUES = 32 << 20


def reduce_on_ray(run: RunFolder, block_rows: int, dim: int):
    """The proxies of pass 1's pieces in ``run``, made on Ray, as tables of disjoint classes
    handed over one at a time: a task per group of pieces sums them per class and splits the
    sums into buckets by label, then a task per bucket makes its classes' proxies. The caller
    writes each table as it comes, so its memory does not grow with the number of classes."""
    import ray

    paths = run.piece_paths(STATE, PARTIALS)
    groups = [paths[i:i + REDUCE_GROUP_PIECES] for i in range(0, len(paths), REDUCE_GROUP_PIECES)]
    buckets = max(1, -(-len(paths) * block_rows * dim // REDUCE_BUCKET_VALUES))  # a piece row per class at most
    split = ray.remote(tasks.partials_by_bucket).options(num_returns=buckets)
    parts = [split.remote(group, run.fs, buckets) for group in groups]
    parts = [[p] for p in parts] if buckets == 1 else parts  # one return value: one ref, not a list
    make = ray.remote(tasks.proxies_of_bucket)
    pending = [make.remote(*(p[b] for p in parts)) for b in range(buckets)]
    del parts
    while pending:
        yield ray.get(pending.pop(0))
