"""The pairs pass on Ray: pair explanations from a run's stored E maps, a Ray task per
chunk of pair blocks (docs/design.md §2).

The map store (every stored image's id, status and embedding; the maps stay in their
pieces) is opened once, by a task, and handed to every chunk task through the object
store: the driver never holds it. Each task sweeps the map pieces its pairs need once and
commits its blocks as ``RUN/pairs`` pieces, so a killed run redoes only the chunks in
flight.
"""
from __future__ import annotations

import pyarrow as pa

from ..data.maps import MapStore
from ..data.runstate import PAIRS, RunFolder, pending_blocks
from ..pairs.explain import chunk_rows_for, chunk_table, pair_chunks, write_pair_chunk

# pair heatmaps one task holds at once, and chunks per CPU at least, so that every CPU works
# and the last chunks are short
PAIRS_TASK_BYTES = 128 << 20
CHUNKS_PER_CPU = 4


def open_store(run: RunFolder) -> MapStore:
    return MapStore(run)


def grid_of(store: MapStore) -> tuple[int, int, int] | None:
    return store.grid


def pairs_on_ray(run: RunFolder, pairs: pa.Table, block_rows: int, progress=None) -> int:
    """Explain every pair block of ``pairs`` that no ``RUN/pairs`` piece covers yet, a task
    per chunk of blocks, at most two chunks per CPU in flight; returns the rows computed.
    ``progress(rows)`` is called as each chunk is committed."""
    import ray

    todo = pending_blocks(run.pieces(PAIRS), pairs.num_rows, block_rows)
    if not todo:
        return 0
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    store = ray.remote(open_store).remote(run)
    budget = chunk_rows_for(ray.get(ray.remote(grid_of).remote(store)), PAIRS_TASK_BYTES, block_rows)
    pending_rows = sum(stop - start for start, stop in todo)
    share = -(-pending_rows // (CHUNKS_PER_CPU * cpus))  # rows per chunk for CHUNKS_PER_CPU chunks per CPU
    chunks = pair_chunks(todo, min(budget, max(block_rows, share)))
    explain = ray.remote(write_pair_chunk)
    in_flight: list = []
    for chunk in chunks:
        if len(in_flight) >= 2 * cpus:
            in_flight = _wait_one(ray, in_flight, progress)
        in_flight.append(explain.remote(run, chunk_table(pairs, chunk), chunk, store))
    while in_flight:
        in_flight = _wait_one(ray, in_flight, progress)
    return pending_rows


def _wait_one(ray, refs: list, progress) -> list:
    (done,), rest = ray.wait(refs, num_returns=1)
    rows = ray.get(done)
    if progress is not None:
        progress(rows)
    return rest
