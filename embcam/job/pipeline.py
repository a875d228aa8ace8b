"""The explain job on Ray Data: manifest -> images -> embeddings -> (class proxies) ->
heatmaps -> metrics -> ``results/part-<start>-<stop>.parquet`` + ``summary.json``.

The per-batch work lives in ``embcam.job.stages`` and ``embcam.job.tasks``, the run folder's
rules (commits, resume, markers) in ``embcam.data.runstate`` and the run's life (lease, begin,
finish) in ``embcam.job.lifecycle`` (no Ray in any), the Ray Data passes in
``embcam.job.passes``; this module checks the run on the driver, chooses its plan and
runs its passes. The manifest is validated in a stream and copied into the run folder;
every stage works on manifest row ranges read back from that copy, so the driver holds
no per-row state. CPU tasks fetch and decode, a fixed pool of model actors (one per GPU, or one on a
CPU-only machine) embeds and explains, and CPU tasks compute metrics and commit each
batch's rows as a piece named by its rows. A re-run of the same command computes only
the rows no piece covers.

User code reaches the workers through Ray's runtime environment (``embcam.job.user_code``);
what the console shows is ``embcam.job.console``'s.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__, faults
from ..architectures import source_suggestion
from ..cam import RESHAPES, EmbeddingCAM, embedding_map_path
from ..data.fetch import ReadLimits
from ..data.locations import default_image_root, has_scheme, redact
from ..data.manifest import ManifestError, scan_manifest, suggest_column
from ..data.maps import MAPS_DTYPES
from ..data.runstate import (
    ATTEMPTS,
    MAPS,
    PARTIALS,
    PROXIES,
    RESULTS,
    STATE,
    SUMMARY,
    ManifestCopy,
    RunFolder,
    covered,
    file_sha256,
    piece_name,
)
from ..inference import check_compilable
from ..models import load_checked
from ..pairs.explain import (
    check_known,
    pair_counts,
    pair_image_ids,
    pairs_sha256,
    read_pairs,
)
from ..proxies import load_proxy_bank, proxy_table
from . import user_code
from .console import on_terminal, quiet_ray
from .lifecycle import RunLifecycle, build_summary
from .model_stage import PRECISIONS, ModelConfig, resolved_target
from .passes import Passes
from .plans import choose_plan
from .progress import Progress

PROXY_MODES = ("self", "mean", "onehot", "bank")
JOB_STRATEGIES = ("auto", "stored-maps", "streaming", "two-pass", "embedding-map")


@dataclass
class ExplainConfig:
    manifest: str
    out: str
    model: str | None = None
    checkpoint: str | None = None
    target_layer: str | None = None
    reshape: str | None = None          # "tokens" | "nhwc" (None: the model's own)
    proxy: str = "self"
    proxies: str | None = None          # a proxy bank (Parquet): implies proxy="bank"
    proxy_split: str | None = None
    strategy: str = "auto"
    image_root: str | None = None
    image_size: int | None = None
    batch_size: int = 32
    block_rows: int | None = None       # manifest rows per unit of work (default: from the manifest size)
    num_gpus: int | None = None
    top_k_channels: int | None = None
    keep_maps: bool = False             # also store each image's E map (RUN/maps/), for reexplain
    maps_dtype: str = "float16"         # of the stored maps: float16 | float32
    pairs: str | None = None            # explain these (query_id, match_id) pairs; only their images run
    compile: bool = False               # torch.compile each worker's backbone (start-up, then faster)
    precision: str | None = None        # the forward's autocast: fp32 | bf16 | fp16 (None: bf16 on a GPU
                                        # that has it, else fp32)
    full_decode: bool = False           # decode every JPEG at full size (no DCT-domain reduction)
    max_pixels: int = ReadLimits.max_pixels
    max_bytes: int = ReadLimits.max_bytes
    read_timeout: float = ReadLimits.read_timeout
    allowed_prefixes: list[str] | None = None  # confine uris to the image root and these
    py_modules: list[str] | None = None  # user code for every worker: package folders or .py files
    working_dir: str | None = None       # a folder every worker runs in, on its Python path
    address: str | None = None
    overwrite: bool = False
    allow_partial_checkpoint: bool = False  # run with a checkpoint that leaves model tensors unloaded

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
        if self.maps_dtype not in MAPS_DTYPES:
            raise ValueError(f"--maps-dtype must be one of {MAPS_DTYPES}, got {self.maps_dtype!r}")
        if self.reshape is not None and self.reshape not in RESHAPES:
            raise ValueError(f"--reshape must be one of {RESHAPES}, got {self.reshape!r}")
        for path in self.py_modules or []:
            if not (os.path.isdir(path) or (path.endswith(".py") and os.path.isfile(path))):
                raise ValueError(f"--py-modules {path}: not a package folder or a .py file")
        if self.checkpoint is not None and not has_scheme(self.checkpoint) and not os.path.isfile(self.checkpoint):
            raise ValueError(f"--checkpoint {self.checkpoint}: no such file")
        if self.working_dir is not None and not os.path.isdir(self.working_dir):
            raise ValueError(f"--working-dir {self.working_dir}: not a folder")
        for name in ("batch_size", "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.block_rows is not None and self.block_rows < 1:
            raise ValueError("--block-rows must be >= 1")
        if self.read_timeout <= 0:
            raise ValueError("--read-timeout must be > 0")
        if self.top_k_channels is not None and self.top_k_channels < 1:
            raise ValueError("--top-k-channels must be >= 1")
        if self.top_k_channels and self.proxy == "mean" and self.strategy in ("embedding-map", "stored-maps"):
            raise ValueError(f"--top-k-channels needs the channel weights, which the {self.strategy} plan "
                             "never forms: use --strategy streaming, two-pass or auto")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")

    def limits(self, image_root: str) -> ReadLimits:
        prefixes = None if self.allowed_prefixes is None else (image_root, *self.allowed_prefixes)
        return ReadLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                          read_timeout=self.read_timeout, allowed_prefixes=prefixes)


def run_explain(cfg: ExplainConfig, progress: bool = True, log=None, verbose: bool = False) -> dict:
    """Run the job to completion, resuming what ``cfg.out`` already holds; returns the
    summary written to ``OUT/summary.json``. ``log`` gets one-line notes (default: stderr).

    ``progress``: Ray Data's progress bars where stdout and stderr are terminals, else a line
    every few seconds through ``log`` (rows done / total, images/s). Unless ``verbose``, Ray's
    INFO lines and the known-false warnings of ``console.RayNoise`` stay off the console for the
    call, and so do the lines Ray's C++ core writes to stderr (Ray's log files keep them all);
    ``verbose`` leaves Ray's console output as Ray makes it."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    with quiet_ray(not verbose, log):
        return _run_explain(cfg, progress, log, verbose)


def _run_explain(cfg: ExplainConfig, progress: bool, log, verbose: bool) -> dict:
    started = time.time()
    cfg.check()
    if cfg.working_dir:  # the workers run in their copy of it: no path may depend on the cwd
        cfg = user_code.with_absolute_paths(cfg)
    runtime_env = {**user_code.runtime_env(cfg), **faults.runtime_env()}
    pairs = read_pairs(cfg.pairs) if cfg.pairs else None
    scan = _scanned_manifest(cfg, pairs)      # fails fast, before any model work
    bank = load_proxy_bank(cfg.proxies) if cfg.proxy == "bank" else None
    with user_code.importable(cfg.py_modules, cfg.working_dir):
        net, preprocessing, spec, fit = _driver_model(cfg)  # bad model or partial checkpoint: fail now
    if fit is not None and fit.partial:  # only with --allow-partial-checkpoint
        log(f"embcam explain: {fit.warning()}")
    identity = _identity(cfg, scan, spec, preprocessing.size, pairs)
    with RunLifecycle(cfg.out, identity, cfg.overwrite) as life:  # busy, or another configuration's: refused now
        if life.state == "complete":
            summary = life.run.read_json(SUMMARY)
            log(f"embcam explain: {redact(cfg.out)} already holds this run, complete "
                f"({summary['counts']['results']} rows): nothing to do")
            return dict(summary, already_complete=True)
        with user_code.importable(cfg.py_modules, cfg.working_dir):
            shape = output_shape(net, cfg, preprocessing.size)
        del net
        return _explain(cfg, life, scan, spec, fit, preprocessing.size, shape, bank, pairs, runtime_env,
                        progress, log, verbose, started)


def _explain(cfg, life, scan, spec, fit, image_size, shape, bank, pairs, runtime_env, progress, log, verbose, started):
    """The run, from Ray's start to the summary, with the lease on ``--out`` held."""
    import ray

    run = life.run
    image_root = cfg.image_root or default_image_root(cfg.manifest)
    if not ray.is_initialized():
        ray.init(address=cfg.address, runtime_env=runtime_env or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True,
                 logging_level=logging.INFO if verbose else logging.WARNING)
    bars = progress and (verbose or on_terminal())   # verbose: Ray's own choice, as before
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bars
    ctx.print_on_execution_start = progress and verbose
    ctx.raise_original_map_exception = True  # a worker's RunWriteError reaches the lifecycle as itself
    gpus = _gpus(cfg.num_gpus)
    if life.note:
        log(f"embcam explain: {redact(life.note)}")
    life.prepare()                                    # from here on --out changes
    if life.state == "resume":
        _drop_unmarked_maps(run)

    facts = {}
    if life.state == "fresh":
        block_rows = cfg.block_rows or max(cfg.batch_size, min(8 * cfg.batch_size, -(-scan.rows // 8)))
        store = ray.cluster_resources().get("object_store_memory", 0)
        plan, reason = choose_plan(cfg, scan.rows, shape, image_size, store)
        device, precision = _device_and_precision(cfg.precision, gpus)
        _copy_manifest(cfg, run, block_rows, pairs)
        facts = {"config": asdict(cfg), "plan": plan, "plan_reason": reason, "device": device,
                 "precision": precision, "rows": scan.rows, "block_rows": block_rows}
    saved = life.record(facts)
    plan, block_rows = saved["plan"], saved["block_rows"]
    resumed = covered(run.pieces(RESULTS), scan.rows)
    if life.state == "resume":
        log(f"embcam explain: resuming {redact(cfg.out)}: {resumed} of {scan.rows} rows already done "
            f"({plan} plan)")

    job = Passes(cfg, run, ManifestCopy(run, block_rows), scan.rows,
               ModelConfig(spec, cfg.checkpoint, cfg.target_layer, image_size,
                           cfg.batch_size if cfg.compile else None, cfg.reshape, saved["precision"],
                           cfg.allow_partial_checkpoint),
               shape, cfg.limits(image_root), image_root, gpus, life.attempt,
               Progress(log if progress and not bars else None))
    # the workers get the proxies as the run's proxies.parquet, read where they are used
    proxies = job.proxy_file() if plan != "one-pass" and run.exists(PROXIES) else None
    if plan == "one-pass":
        if bank is not None:  # the bank explained against, kept with the run
            run.write_table(proxy_table(bank), PROXIES)
            proxies = job.proxy_file()
        job.explain_pass(cfg.proxy, proxies, "autograd" if cfg.strategy == "two-pass" else None)
    elif plan == "embedding-map" and proxies is None:
        job.kept_maps_pass()
    elif plan == "embedding-map":  # mean proxies persisted by an earlier attempt: only heatmaps are left
        job.explain_pass("mean", proxies)
    elif plan == "stored-maps":
        job.stored_maps_pass2(proxies if proxies is not None else job.mean_proxies_pass(store_maps=True))
        if not cfg.keep_maps and pairs is None:  # written for pass 2 only
            run.delete(MAPS)
    else:  # streaming, two-pass: pass 2 explains again from the images
        proxies = proxies if proxies is not None else job.mean_proxies_pass(store_maps=False)
        job.explain_pass("mean", proxies, "autograd" if plan == "two-pass" else None, what="pass 2 of 2, heatmaps")

    if pairs is not None:
        job.pairs_pass(pairs)
        if not cfg.keep_maps:  # written for the pairs only
            run.delete(MAPS)
    if job.markers is not run:  # node-local markers (the run's own go with life.finish)
        job.markers.delete(STATE, ATTEMPTS)
    return life.finish(build_summary(
        run, scan.rows, time.time() - started, resumed, {"pairs": pair_counts(run)} if cfg.pairs else None,
        config=asdict(cfg), model=spec, plan=saved["plan"], plan_reason=saved["plan_reason"], passes=job.timed_passes(),
        precision=saved["precision"], identity=saved["identity"], run_id=saved["run_id"],
        devices={"gpus": gpus, "model": saved["device"]}, checkpoint=fit.to_json() if fit is not None else None))


def _driver_model(cfg: ExplainConfig):
    """The model, built once on the driver so that a bad spec or checkpoint fails before
    any work; user code this process cannot find fails in one line that says how to ship it."""
    missing = user_code.missing_user_module(cfg.model)
    if missing:
        raise ValueError(f"--model {cfg.model}: no module named {missing!r} here{source_suggestion(cfg.model)}; "
                         "for your own code: ship it with --py-modules PATH or --working-dir DIR, or install it "
                         "on every node")
    return load_checked(cfg.model, cfg.checkpoint, cfg.image_size, cfg.allow_partial_checkpoint)


# --- driver-side checks and bookkeeping ---------------------------------------------------


def output_shape(net, cfg: ExplainConfig, size: int) -> dict:
    """``dims``: (d, h, w) of the embedding and heatmap, from one probe image (a model or
    layer the job cannot explain fails here, before any work); ``path``: the path the
    embedding-map strategy takes on this model (``embcam.cam``)."""
    import torch

    if cfg.compile:
        check_compilable(net, resolved_target(net, cfg.target_layer), cfg.batch_size)
    probe = EmbeddingCAM(net, cfg.target_layer, reshape=cfg.reshape)(torch.zeros(1, 3, size, size))
    return {"dims": (probe.embeddings.shape[-1],) + tuple(probe.heatmaps.shape[1:]),
            "path": embedding_map_path(net, cfg.target_layer, cfg.reshape)}


def _scanned_manifest(cfg: ExplainConfig, pairs: pa.Table | None = None):
    """The manifest validated in a stream (``scan_manifest``), with the checks this run's
    options add; with pairs, every id they name must be in it. ``rows`` are the rows the
    run explains: with pairs, only the images they name."""
    stats = {"labelled": 0, "splits": set(), "found": []}
    wanted = pair_image_ids(pairs) if pairs is not None else None

    def look(table: pa.Table) -> None:
        if wanted is not None:
            table = table.filter(pc.is_in(table.column("image_id"), value_set=wanted))
            stats["found"].append(table.column("image_id").combine_chunks())
        stats["labelled"] += table.num_rows - table.column("label").null_count
        if len(stats["splits"]) < 1000:
            stats["splits"].update(table.column("split").drop_null().unique().to_pylist())

    scan = scan_manifest(cfg.manifest, look)
    if wanted is not None:
        check_known(pairs, pa.concat_arrays(stats["found"]) if stats["found"] else pa.array([], pa.string()))
        scan = replace(scan, rows=len(wanted))
    if cfg.proxy in ("mean", "onehot", "bank") and stats["labelled"] == 0:
        hint = suggest_column("label", scan.columns) if "label" not in scan.columns else None
        raise ManifestError(f"column 'label': --proxy {cfg.proxy} needs a label per image, "
                            "and the manifest has none" + (f"; {hint}" if hint else ""))
    if cfg.proxy_split and cfg.proxy_split not in stats["splits"]:
        raise ManifestError(f"column 'split': no row has split {cfg.proxy_split!r} "
                            f"(found: {', '.join(sorted(map(str, stats['splits'])))})")
    return scan


def _copy_manifest(cfg: ExplainConfig, run: RunFolder, block_rows: int, pairs: pa.Table | None = None) -> None:
    """The validated manifest into the run folder; with pairs, only the rows they name."""
    copy = ManifestCopy(run, block_rows)
    if pairs is None:
        scan_manifest(cfg.manifest, copy.write)
    else:
        wanted = pair_image_ids(pairs)
        scan_manifest(cfg.manifest, lambda t: copy.write(t.filter(pc.is_in(t.column("image_id"), value_set=wanted))))
    copy.close()


def _identity(cfg: ExplainConfig, scan, spec: str, image_size: int, pairs: pa.Table | None = None) -> dict:
    """What makes two runs the same run: resuming one with another is refused. Where user
    code comes from (--py-modules, --working-dir) is not part of it: the spec names the code."""
    return {
        "manifest": {"path": cfg.manifest, "rows": scan.rows, "image_ids_sha256": scan.ids_sha256},
        "model": {"spec": spec, "checkpoint_sha256": file_sha256(cfg.checkpoint)},
        "proxy": cfg.proxy, "proxy_split": cfg.proxy_split,
        "proxy_bank_sha256": file_sha256(cfg.proxies) if cfg.proxy == "bank" else None,
        "strategy": cfg.strategy, "target_layer": cfg.target_layer, "reshape": cfg.reshape, "image_size": image_size,
        "top_k_channels": cfg.top_k_channels, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
        "keep_maps": cfg.keep_maps, "maps_dtype": cfg.maps_dtype if cfg.keep_maps or cfg.proxy == "mean" else None,
        "precision": cfg.precision, "full_decode": cfg.full_decode,
        "pairs_sha256": pairs_sha256(pairs) if pairs is not None else None,
        "embcam": __version__,
    }


def _drop_unmarked_maps(run: RunFolder) -> None:
    """On resume: maps of a batch that died before the piece that marks them done are
    redone. The stored-maps plan's pass 1 marks them with its partials piece, any other
    with results."""
    marking = (STATE, PARTIALS) if run.identity["plan"] == "stored-maps" else (RESULTS,)
    committed = set(run.pieces(*marking))
    for start, stop in run.pieces(MAPS):
        if (start, stop) not in committed:
            run.delete(MAPS, piece_name(start, stop))


def _device_and_precision(requested: str | None, gpus: int) -> tuple[str, str]:
    """The model actors' device (``cpu`` or the GPU's name) and the forward's precision:
    the one asked for, else bf16 on a GPU that has it and fp32 elsewhere."""
    if gpus == 0:
        return "cpu", requested or "fp32"
    import ray

    @ray.remote(num_gpus=1)
    def gpu_facts():
        import torch

        return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported()

    name, bf16 = ray.get(gpu_facts.remote())
    return f"cuda ({name})", requested or ("bf16" if bf16 else "fp32")


def _gpus(requested: int | None) -> int:
    import ray

    resources = ray.cluster_resources()
    found = int(resources.get("GPU", 0))
    if requested is None:
        return found
    if requested < 0 or requested > found:
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", "memory"))
        raise ValueError(f"--num-gpus {requested}: the cluster has {found} GPU(s) ({shown})")
    return requested
