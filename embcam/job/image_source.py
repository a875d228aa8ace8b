"""The explain job's images as a Ray Data datasource: one read task per pending range of
manifest rows, which reads those rows from the run's manifest copy and fetches, decodes
and resizes their images (``tasks.read_and_load``).

A read, not a map over range ids, so that Ray Data keeps decoding apart from the model
actor: it never fuses a read into an operator that batches its input (``batch_size``).
Mapped, the decode was fused into the actor wherever both asked for one CPU (a CPU-only
machine): one actor task then decoded ``batch_size`` ranges in turn before its first model
batch, so decode never overlapped the model and progress came in one lump per task.
``summary.json`` ``passes.*.ray_operators`` shows the operators each pass ran. A column
with no value in a range is typed as text (``schemas.typed_nulls``).
"""
from __future__ import annotations

from functools import partial

import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from ..data.schemas import typed_nulls
from . import tasks


class ManifestImages(Datasource):
    """``ranges`` (n × 2 row numbers, start and stop); ``load`` are the other arguments of
    ``tasks.read_and_load`` after the range."""

    def __init__(self, ranges: np.ndarray, *load):
        super().__init__()
        self.ranges, self.load = ranges, load

    def estimate_inmemory_data_size(self) -> None:
        return None  # images of unknown sizes until decoded

    def get_read_tasks(self, parallelism: int, *args, **kwargs) -> list[ReadTask]:
        # one task per range whatever the parallelism asked for: a range is a unit of
        # commit and of worker-death accounting (extra arguments: newer Ray versions)
        return [ReadTask(partial(_read, int(start), int(stop), self.load),
                         BlockMetadata(num_rows=int(stop - start), size_bytes=None, input_files=None, exec_stats=None))
                for start, stop in self.ranges]


def _read(start: int, stop: int, load: tuple) -> list:
    return [typed_nulls(BlockAccessor.batch_to_block(tasks.read_and_load(start, stop, *load)))]
