"""The Ray Data passes of one explain run (``Passes``), over the row ranges not yet
committed: images read and decoded by CPU tasks, a fixed pool of model actors, CPU tasks
that compute metrics and commit each batch's rows; pass 1 and its reduce for mean proxies,
pass 2 in each plan, and the pairs. ``embcam.job.pipeline`` decides which run, and wires
them from the driver.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile

import numpy as np
import pyarrow as pa

from .. import faults
from ..cam import cheapest_strategy
from ..data.runstate import MAPS, PAIRS, PARTIALS, PROXIES, RESULTS, STATE, RunFolder, pending_blocks
from ..data.schemas import typed_nulls
from ..pairs.explain import PAIR_BLOCK_ROWS
from ..proxies import PROXIES_SCHEMA, ProxyFile
from . import tasks
from .model_stage import ExplainModel
from .pairs_pass import pairs_on_ray
from .plans import queue_bytes
from .reduce import reduce_on_ray
from .stages import heatmaps_from_kept_maps


class Passes:
    """The Ray Data passes of one run, over the row ranges not yet committed."""

    def __init__(self, cfg, run, copy, rows, model_cfg, shape, limits, image_root, gpus, attempt, progress):
        self.cfg, self.run, self.copy, self.rows, self.model_cfg = cfg, run, copy, rows, model_cfg
        self.shape, self.limits, self.image_root, self.progress = shape, limits, image_root, progress
        self.actor = _actor_options(gpus, cfg.batch_size)
        # E maps are stored when kept, and for the pairs (which read them back) in full precision
        self.maps_dtype = cfg.maps_dtype if cfg.keep_maps else "float32" if cfg.pairs else None
        # the model stage's worker-death markers: on each node's own disk (see embcam.job.attempts),
        # in a folder of this attempt's own, which no later attempt reads
        self.markers = run if run.local else RunFolder(os.path.join(
            tempfile.gettempdir(), "embcam-attempts", hashlib.sha256(run.out.encode()).hexdigest()[:16], attempt))
        self.passes: dict[str, dict] = {}  # what each model pass computed, and how (for the summary)
        self.queue_bytes = queue_bytes(copy.block_rows, model_cfg.image_size, shape["dims"],
                                       _cluster_cpus(), gpus)

    def loaded(self, pending: list[tuple[int, int]], bounded: bool = True):
        """The images of the pending row ranges, one read task per range; ``bounded``: the
        pass may fill ``queue_bytes`` of the object store (a streaming pass)."""
        import ray

        from .image_source import ManifestImages

        ranges = np.asarray(pending, np.int64).reshape(-1, 2)
        source = ManifestImages(ranges, self.copy, self.run, self.image_root, self.model_cfg.image_size,
                                self.limits, not self.cfg.full_decode)
        if not bounded:
            return ray.data.read_datasource(source, override_num_blocks=len(ranges), num_cpus=1)
        # the dataset keeps a copy of the context it was made in: the budget is this pass's only
        ctx = ray.data.DataContext.get_current()
        unbounded = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = unbounded.copy(object_store_memory=self.queue_bytes)
        try:
            return ray.data.read_datasource(source, override_num_blocks=len(ranges), num_cpus=1)
        finally:
            ctx.execution_options.resource_limits = unbounded

    def model(self, ds, what: str, proxy_mode, proxies, output, strategy=None, top_k=None):
        """``ds`` through the model actors; ``strategy`` None: the cheapest exact one for this
        output (``cheapest_strategy``), recorded with the CAM path under ``what``."""
        keep_maps = self.maps_dtype is not None and output == "heatmaps"
        if output == "embeddings":
            self.passes[what] = {"output": output, "cam": None}
        else:
            path = self.shape["path"]
            strategy = strategy or cheapest_strategy(path, 1, self.shape["dims"][0], output == "maps" or keep_maps)
            self.passes[what] = {"output": output, "strategy": strategy,
                                 "cam_path": path if strategy == "embedding-map" else "autograd"}
        budget = ds.context.execution_options.resource_limits.object_store_memory  # as the dataset runs it
        self.passes[what]["object_store_budget_bytes"] = int(budget) if math.isfinite(budget) else None
        kwargs = dict(model=self.model_cfg, proxy_mode=proxy_mode, proxies=proxies, top_k_channels=top_k,
                      strategy=strategy or "embedding-map", output=output, run=self.markers, keep_maps=keep_maps)
        return ds.map_batches(ExplainModel, fn_constructor_kwargs=kwargs, batch_format="numpy", **self.actor)

    def commit(self, ds, fn, *args) -> None:
        """Run ``ds`` to the end through ``fn``, which commits each batch's rows as pieces
        and returns their count (progress on the way)."""
        self.drain(ds.map_batches(fn, fn_args=args, batch_format="numpy", num_cpus=1,
                                  batch_size=self.copy.block_rows))  # about one piece per block

    def drain(self, done) -> None:
        """Run ``done`` (batches of committed row counts) to the end, counting progress."""
        for batch in done.iter_batches(batch_size=None, batch_format="numpy"):
            self.progress.add(int(np.sum(batch["rows"])))
        # the operators Ray Data ran, fused ones joined by "->" (for the summary)
        self.passes.setdefault(self.progress.what, {})["ray_operators"] = _operators(done.get_stats_summary())

    def timed_passes(self) -> dict:
        """What each pass computed and how, with its rows, seconds and steady rate (Progress)."""
        return {what: {**self.passes.get(what, {}), **timing} for what, timing in self.progress.timings.items()}

    def pending(self, *folder: str) -> list[tuple[int, int]]:
        return pending_blocks(self.run.pieces(*folder), self.rows, self.copy.block_rows)

    def explain_pass(self, proxy_mode, proxies, strategy=None, what="heatmaps") -> None:
        todo = self.pending(RESULTS)
        if todo:
            with self.progress.step(what, _rows_in(todo)):
                explained = self.model(self.loaded(todo), what, proxy_mode, proxies, "heatmaps", strategy,
                                       self.cfg.top_k_channels)
                self.commit(explained, tasks.commit_results, self.run, self.maps_dtype)

    def mean_proxies_pass(self, store_maps: bool) -> ProxyFile:
        """Pass 1: embeddings (with ``store_maps``, their E maps too, into ``OUT/maps/``)
        and per-class partial sums, committed per run of manifest rows; then the reduce.
        ``proxies.parquet`` is written before any heatmap."""
        todo = self.pending(STATE, PARTIALS)
        if todo:
            what = "pass 1 of 2, embeddings and maps" if store_maps else "pass 1 of 2, embeddings"
            with self.progress.step(what, _rows_in(todo)):
                embedded = self.model(self.loaded(todo), what, "mean", None, "maps" if store_maps else "embeddings")
                dtype = (self.maps_dtype or self.cfg.maps_dtype) if store_maps else None
                self.commit(embedded, tasks.commit_pass1, self.run, self.cfg.proxy_split, dtype)
        faults.fault_point("reduce", ["*"])
        return self.reduce()

    def reduce(self) -> ProxyFile:
        """Pass 1's pieces into ``proxies.parquet`` (``reduce_on_ray``)."""
        return self._write_proxies(reduce_on_ray(self.run, self.copy.block_rows, self.shape["dims"][0]))

    def stored_maps_pass2(self, proxies: ProxyFile) -> None:
        """Pass 2 of the stored-maps plan: heatmaps ReLU(E . p) and metrics from the maps
        pass 1 stored, on CPU tasks; no image is decoded (masks are read, for the metrics)
        and no model runs."""
        import ray

        todo = self.pending(RESULTS)
        if not todo:
            return
        what = "pass 2 of 2, heatmaps from the stored maps"
        self.passes[what] = {"output": "heatmaps", "strategy": "embedding-map", "cam_path": "stored maps"}
        ranges = np.asarray(todo, np.int64).reshape(-1, 2)
        with self.progress.step(what, _rows_in(todo)):
            self.drain(ray.data.range(len(ranges), override_num_blocks=len(ranges))
                       .map_batches(tasks.heatmaps_from_stored_maps, batch_size=1, num_cpus=1, batch_format="numpy",
                                    fn_args=(self.copy, ranges, self.run, self.run.pieces(MAPS), self.shape["dims"],
                                             self.image_root, self.limits, proxies)))

    def kept_maps_pass(self) -> None:
        """One model pass keeping every image's E map until the reduce (small runs only)."""
        todo = self.pending(RESULTS)
        what = "embeddings and maps, kept for the class proxies"
        with self.progress.step(what, _rows_in(todo)):
            # the actor's blocks with typed columns: heatmaps_from_kept_maps passes them on (typed_nulls)
            kept = (self.model(self.loaded(todo, bounded=False), what, "mean", None, "maps")
                    .map_batches(typed_nulls, batch_size=None, batch_format="pyarrow").materialize())
            self.progress.add(_rows_in(todo))  # materialize() tells nothing on the way: all rows at once
        partials = kept.map_batches(tasks.partials_from_embeddings, fn_kwargs={"split": self.cfg.proxy_split},
                                    batch_format="numpy")
        table = pa.concat_tables([tasks.PARTIALS_SCHEMA.empty_table()] + [
            tasks.partials_table(b["label"], b["sum"], b["count"])
            for b in partials.iter_batches(batch_format="numpy", batch_size=4096)])
        proxies = self._write_proxies([tasks.proxies_of_bucket(table)])  # a small run: reduced here
        with self.progress.step("heatmaps from the kept maps", _rows_in(todo)):
            heatmaps = kept.map_batches(heatmaps_from_kept_maps, fn_args=("mean", proxies, self.maps_dtype is not None),
                                        batch_format="numpy")
            self.commit(heatmaps, tasks.commit_results, self.run, self.maps_dtype)

    def pairs_pass(self, pairs: pa.Table) -> None:
        """Pair explanations from the stored E maps, a Ray task per chunk of pair blocks
        (no model: two products per heatmap cell); blocks already committed are skipped."""
        todo = pending_blocks(self.run.pieces(PAIRS), pairs.num_rows, PAIR_BLOCK_ROWS)
        if todo:
            with self.progress.step("pairs, from the stored maps", _rows_in(todo)):
                pairs_on_ray(self.run, pairs, PAIR_BLOCK_ROWS, self.progress.add)

    def _write_proxies(self, tables) -> ProxyFile:
        """``tables`` (proxies of disjoint classes) into ``proxies.parquet``; none at all is
        refused before the file appears."""
        def not_empty(tables):
            rows = 0
            for table in tables:
                rows += table.num_rows
                yield table
            if not rows:
                where = f" in split {self.cfg.proxy_split!r}" if self.cfg.proxy_split else ""
                raise ValueError(f"no labelled image{where} could be embedded, so there is no mean proxy to explain "
                                 "against: are the images where the manifest's uris and --image-root say?")

        self.run.write_tables(PROXIES_SCHEMA, not_empty(tables), PROXIES)
        return self.proxy_file()

    def proxy_file(self) -> ProxyFile:
        return ProxyFile(self.run.join(PROXIES), self.run.fs)


def _operators(stats) -> list[str]:
    """The operator names of an executed dataset's stats summary, first operator first."""
    return [name for parent in stats.parents for name in _operators(parent)] + \
        [op.operator_name for op in stats.operators_stats]


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0)


def _actor_options(gpus: int, batch_size: int) -> dict:
    """One model per GPU, holding a CPU slot where the cluster still has one left for the
    decode and metrics tasks (on a 1-CPU machine the actor took the only slot, and the job
    waited forever at 0 rows). On a CPU-only Ray, one actor whose torch uses every core of
    its node (see ExplainModel). On one machine it holds no CPU slot: the tasks then take
    every slot, and so the cores its torch leaves while a streaming pass's object store
    budget holds it back (BENCHMARKS §5: a fifth more images/s at 100,000 images). On a
    CPU cluster it holds one, so that Ray places it on a node that has CPUs (a head
    without any would take a 0-CPU actor)."""
    import ray

    actors = max(gpus, 1)
    cpus = 1 if ray.cluster_resources().get("CPU", 0) >= actors + 1 else 0
    if gpus > 0:
        return dict(compute=ray.data.ActorPoolStrategy(size=gpus), num_gpus=1, num_cpus=cpus, batch_size=batch_size)
    if len([node for node in ray.nodes() if node["Alive"]]) == 1:
        cpus = 0
    return dict(compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus, batch_size=batch_size)


def _rows_in(ranges: list[tuple[int, int]]) -> int:
    return sum(stop - start for start, stop in ranges)
