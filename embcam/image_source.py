"""The explain job's images as a Ray Data datasource: one read task per pending range of
manifest rows, which reads those rows from the run's manifest copy and fetches, decodes
and resizes their images (``tasks.read_and_load``).

A read, not a map over range ids, so that Ray Data keeps decoding apart from the model
actor: it never fuses a read into an operator that batches its input (``batch_size``).
Mapped, the decode was fused into the actor wherever both asked for one CPU (a CPU-only
machine): one actor task then decoded ``batch_size`` ranges in turn before its first model
batch, so decode never overlapped the model and progress came in one lump per task.
``summary.json`` ``passes.*.ray_operators`` shows the operators each pass ran.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

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
    block = BlockAccessor.batch_to_block(tasks.read_and_load(start, stop, *load))
    # A column with no value in this range (no error, no label, no mask) comes out of Arrow
    # untyped, and Ray Data hands an untyped column to the next stage as float NaN: a label
    # NaN, or an error column that no longer concatenates with another block's strings. So
    # such a column gets its type: every column that can be all None here is text (a missing
    # mask's bytes are b"", never None).
    for i, field in enumerate(block.schema):
        if pa.types.is_null(field.type):
            block = block.set_column(i, field.name, pa.nulls(len(block), pa.string()))
    return [block]
