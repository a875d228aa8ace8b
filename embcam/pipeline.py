"""The explain job on Ray Data (DESIGN §3): manifest -> images -> embeddings -> class
proxies (map-reduce) -> heatmaps -> metrics -> results/*.parquet + summary.json.

The per-batch work lives in ``embcam.stages`` (no Ray); this module only wires it:
CPU tasks decode, a fixed pool of model actors (one per GPU, or one on a CPU-only
machine) embeds and explains, CPU tasks compute metrics, Ray writes Parquet.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import __version__
from .inference import check_compilable
from .manifest import ManifestError, default_image_root, has_scheme, read_manifest
from .metrics import THRESHOLDS
from .models import load_model
from .proxies import MeanProxyAccumulator, load_proxy_bank, save_proxy_bank
from .stages import (INTERNAL_COLUMNS, ExplainModel, ModelConfig, compute_metrics,
                     heatmaps_from_kept_maps, load_images, partial_sums, to_results)

PROXY_MODES = ("self", "mean", "onehot", "bank")
JOB_STRATEGIES = ("auto", "two-pass", "embedding-map")


@dataclass
class ExplainConfig:
    manifest: str
    out: str
    model: str | None = None
    checkpoint: str | None = None
    target_layer: str | None = None
    proxy: str = "self"
    proxies: str | None = None          # a proxy bank (Parquet): implies proxy="bank"
    proxy_split: str | None = None
    strategy: str = "auto"
    image_root: str | None = None
    image_size: int | None = None
    batch_size: int = 32
    num_gpus: int | None = None
    top_k_channels: int | None = None
    compile: bool = False              # torch.compile each worker's backbone (start-up, then faster)
    address: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        if self.proxies:
            self.proxy = "bank"
        if self.proxy not in PROXY_MODES:
            raise ValueError(f"--proxy must be one of {PROXY_MODES}, got {self.proxy!r}")
        if self.proxy == "bank" and not self.proxies:
            raise ValueError("proxy mode 'bank' needs --proxies BANK.parquet")
        if self.strategy not in JOB_STRATEGIES:
            raise ValueError(f"--strategy must be one of {JOB_STRATEGIES}, got {self.strategy!r}")
        if self.proxy_split and self.proxy != "mean":
            raise ValueError("--proxy-split only applies to --proxy mean")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.top_k_channels is not None and self.top_k_channels < 1:
            raise ValueError("--top-k-channels must be >= 1")
        if self.top_k_channels and self.proxy == "mean" and self.strategy == "embedding-map":
            raise ValueError("--top-k-channels needs the channel weights, which the embedding-map "
                             "strategy never forms: use --strategy two-pass (or auto)")

    def plan(self) -> str:
        """How heatmaps are made: 'one-pass' (proxy known up front), 'two-pass' or
        'embedding-map' (mean proxies, which need a dataset-wide reduce first)."""
        if self.proxy != "mean":
            return "one-pass"
        if self.strategy == "auto":
            return "two-pass" if self.top_k_channels else "embedding-map"
        return self.strategy


def run_explain(cfg: ExplainConfig, progress: bool = True) -> dict:
    """Run the whole job; returns the summary written to ``OUT/summary.json``."""
    import ray

    started = time.time()
    cfg.check()
    table = _validated_manifest(cfg)                  # fails fast, before any model work
    bank = load_proxy_bank(cfg.proxies) if cfg.proxy == "bank" else None
    net, preprocessing, spec = load_model(cfg.model, cfg.checkpoint, cfg.image_size)  # bad model: fail now
    if cfg.compile:
        check_compilable(net, cfg.target_layer, cfg.batch_size)
    del net
    image_root = cfg.image_root or default_image_root(cfg.manifest)
    out_fs, out_path = _prepare_out(cfg)

    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if cfg.num_gpus is None else cfg.num_gpus
    model_cfg = ModelConfig(spec, cfg.checkpoint, cfg.target_layer, preprocessing.size,
                            cfg.batch_size if cfg.compile else None)
    actor = _actor_options(gpus, cfg.batch_size)
    rows_per_block = max(cfg.batch_size, min(4 * cfg.batch_size, -(-table.num_rows // 8)))

    def loaded():
        # Blocks cut on the driver: a manifest read as one block would run on one worker.
        blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
        return (ray.data.from_arrow(blocks)
                .map_batches(load_images, fn_args=(image_root, preprocessing.size),
                             batch_size=rows_per_block, num_cpus=1, batch_format="numpy"))

    def model_stage(ds, proxy_mode, proxies, output, strategy="embedding-map", top_k=None):
        kwargs = dict(model=model_cfg, proxy_mode=proxy_mode, proxies=proxies, strategy=strategy,
                      top_k_channels=top_k, output=output, split=cfg.proxy_split)
        return ds.map_batches(ExplainModel, fn_constructor_kwargs=kwargs, batch_format="numpy", **actor)

    plan = cfg.plan()
    proxies, counts = bank, None
    if plan == "two-pass":
        partials = model_stage(loaded(), "mean", None, "partials")
        proxies, counts = _reduce(partials, cfg)
        explained = model_stage(loaded(), "mean", proxies, "heatmaps", "autograd", cfg.top_k_channels)
    elif plan == "embedding-map":
        kept = model_stage(loaded(), "mean", None, "maps").materialize()  # E maps: no second model pass
        partials = kept.map_batches(_partials_from_embeddings, fn_kwargs={"split": cfg.proxy_split},
                                    batch_format="numpy")
        proxies, counts = _reduce(partials, cfg)
        explained = kept.map_batches(heatmaps_from_kept_maps, fn_args=("mean", proxies),
                                     batch_format="numpy")
    else:
        strategy = "autograd" if cfg.strategy == "two-pass" else "embedding-map"  # the paper's path on request
        explained = model_stage(loaded(), cfg.proxy, bank, "heatmaps", strategy, cfg.top_k_channels)

    results = (explained.map_batches(compute_metrics, batch_format="numpy", num_cpus=1)
               .map_batches(_results_table, batch_format="numpy"))
    results.write_parquet(_join(out_path, "results"), filesystem=out_fs)
    if proxies is not None:
        save_proxy_bank(_join(out_path, "proxies.parquet"), proxies, counts, filesystem=out_fs)

    summary = _summary(cfg, spec, plan, gpus, table.num_rows, out_fs, out_path, time.time() - started)
    with out_fs.open_output_stream(_join(out_path, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _validated_manifest(cfg: ExplainConfig) -> pa.Table:
    table = read_manifest(cfg.manifest)
    needs_label = cfg.proxy in ("mean", "onehot", "bank")
    if needs_label and table.column("label").null_count == table.num_rows:
        raise ManifestError(f"column 'label': --proxy {cfg.proxy} needs a label per image, "
                            "and the manifest has none")
    if cfg.proxy_split:
        splits = set(table.column("split").drop_null().to_pylist())
        if cfg.proxy_split not in splits:
            raise ManifestError(f"column 'split': no row has split {cfg.proxy_split!r} "
                                f"(found: {', '.join(sorted(map(str, splits)))})")
    return table


def _actor_options(gpus: int, batch_size: int) -> dict:
    """One model per GPU; on a CPU-only machine one actor (its torch uses every core of
    its node, see ExplainModel) while decode and metrics tasks take the other CPU slots.
    Asking for a GPU where there is none would wait forever, hence the count from the
    cluster's resources."""
    if gpus > 0:
        return dict(compute=_pool(gpus), num_gpus=1, num_cpus=1, batch_size=batch_size)
    return dict(compute=_pool(1), num_cpus=1, batch_size=batch_size)


def _pool(size: int):
    import ray
    return ray.data.ActorPoolStrategy(size=size)


def _partials_from_embeddings(batch: dict, split: str | None) -> dict:
    return partial_sums(batch, np.asarray(batch["embedding"]), split)


def _reduce(partials, cfg: ExplainConfig) -> tuple[dict, dict]:
    """Combine per-batch partial sums on the driver: one row per (batch, class), never
    the embeddings themselves."""
    acc = MeanProxyAccumulator()
    for batch in partials.iter_batches(batch_format="numpy", batch_size=4096):
        for label, total, count in zip(batch["label"], batch["sum"], batch["count"]):
            acc.add_partial(str(label), total, int(count))
    if not acc.sums:
        where = f" in split {cfg.proxy_split!r}" if cfg.proxy_split else ""
        raise RuntimeError(f"no labelled image{where} could be embedded: no mean proxy to explain against")
    return acc.finalize(), dict(acc.counts)


def _results_table(batch: dict) -> pa.Table:
    return to_results({k: v for k, v in batch.items() if k not in INTERNAL_COLUMNS})


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _prepare_out(cfg: ExplainConfig) -> tuple[pafs.FileSystem, str]:
    """The output folder; an existing results folder is kept unless --overwrite."""
    fs, path = pafs.FileSystem.from_uri(cfg.out) if has_scheme(cfg.out) else (
        pafs.LocalFileSystem(), os.path.abspath(cfg.out))
    results = _join(path, "results")
    if fs.get_file_info(results).type != pafs.FileType.NotFound:
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out} already holds results: choose a new --out or pass --overwrite")
        fs.delete_dir(results)
    fs.create_dir(path, recursive=True)
    return fs, path  # a path on fs: every write below goes through fs


def _summary(cfg, spec, plan, gpus, manifest_rows, fs, out_path, wall) -> dict:
    """Counts and mean metrics, read back from what was written."""
    import ray
    import torch

    columns = ["status", "degenerate", "ratio_bbox", "ratio_mask", "uniform_bbox", "uniform_mask",
               "iou", "loc_correct", "iou_sweep", "ratio_bbox_topk", "ratio_mask_topk"]
    t = pq.read_table(_join(out_path, "results"), filesystem=fs, columns=columns).to_pandas()
    ok = t[t.status == "ok"]
    if len(t) != manifest_rows:
        raise RuntimeError(f"results hold {len(t)} rows for {manifest_rows} manifest rows")
    means = {c: _mean(ok[c]) for c in columns[2:] if c != "iou_sweep"}
    sweep = [v for v in ok["iou_sweep"] if v is not None]
    means["loc_accuracy_sweep"] = ({str(t_): float(np.mean([s[j] >= 0.5 for s in sweep]))
                                    for j, t_ in enumerate(THRESHOLDS)} if sweep else None)
    return {
        "config": asdict(cfg),
        "model": spec,
        "plan": plan,
        "counts": {"manifest": manifest_rows, "results": int(len(t)), "ok": int(len(ok)),
                   "error": int((t.status == "error").sum()), "degenerate": int(ok.degenerate.fillna(False).sum())},
        "metrics": means,
        "wall_seconds": round(wall, 3),
        "images_per_second": round(manifest_rows / wall, 3) if wall > 0 else None,
        "devices": {"gpus": gpus},
        "versions": {"embcam": __version__, "torch": torch.__version__, "ray": ray.__version__,
                     "pyarrow": pa.__version__, "python": platform.python_version()},
    }


def _mean(series) -> float | None:
    values = series.dropna().astype(float)
    return float(values.mean()) if len(values) else None
