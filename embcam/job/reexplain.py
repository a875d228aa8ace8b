"""``embcam reexplain RUN --out NEW (--proxies BANK.parquet | --pairs PAIRS.parquet)``:
explain a finished run again from its stored E maps (``explain --keep-maps``), with no
model: heatmaps against another proxy bank are ReLU(E . p) and the same metrics as the
job's; pairs are ``embcam.pairs.explain``. CPU only, one process, piece by piece.

NEW is a run folder like the job's: results pieces named as RUN's (new ones with
``--proxies``, RUN's own otherwise), ``pairs/`` with ``--pairs``, a copy of RUN's
manifest copy, ``proxies.parquet``, ``summary.json`` and ``_SUCCESS`` last. A re-run with
the same options resumes: pieces already written are skipped. No Ray here.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..data.fetch import ReadLimits
from ..data.locations import has_scheme
from ..data.maps import MapStore, read_maps_piece
from ..data.runstate import (
    DONE,
    MANIFEST,
    MAPS,
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
from ..pairs.explain import check_known, pair_counts, pairs_sha256, read_pairs, write_pairs
from ..proxies import load_proxy_bank, proxy_table
from ..results import image_root_of, run_config
from .lifecycle import RunLifecycle, build_summary
from .stages import compute_metrics, heatmaps_from_kept_maps, load_masks, manifest_batch, to_results

RESULT_INPUTS = ("status", "error", "width", "height", "orientation")


def reexplain(source: str, out: str, proxies: str | None = None, pairs: str | None = None,
              overwrite: bool = False, log=None) -> dict:
    """Explain run ``source`` again into ``out``; returns the summary written there."""
    started = time.time()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if not proxies and not pairs:
        raise ValueError("nothing to do: give --proxies BANK.parquet, --pairs PAIRS.parquet or both")
    run, new = RunFolder(source), RunFolder(out)
    if os.path.abspath(source) == os.path.abspath(out):
        raise ValueError("--out must be another folder than the run explained again")
    if not run.is_complete():
        raise ValueError(f"{source} is not a finished explain run (no {DONE}): finish it first")
    if not run.pieces(MAPS):
        raise ValueError(f"{source} keeps no E maps: explain it with --keep-maps to explain it again")
    bank = load_proxy_bank(proxies) if proxies else None
    table = read_pairs(pairs) if pairs else None
    store = MapStore(run)
    if bank is not None:
        _check_width(bank, store, source)
    if table is not None:
        check_known(table, store.ids, f"run {source}")
    identity = {"source": source if has_scheme(source) else os.path.abspath(source),
                "source_identity": (run.identity or {}).get("identity"),
                "proxy_bank_sha256": file_sha256(proxies),
                "pairs_sha256": pairs_sha256(table) if table is not None else None, "embcam": __version__}
    with RunLifecycle(out, identity, overwrite) as life:
        if life.state == "complete":
            log(f"embcam reexplain: {out} already holds this run, complete: nothing to do")
            return dict(new.read_json(SUMMARY), already_complete=True)
        life.prepare()
        if life.state == "fresh":  # the source's manifest copy, which the pieces' rows index
            for info in run.listing(STATE, MANIFEST):
                new.fs.create_dir(new.join(STATE, MANIFEST), recursive=True)
                new.fs.copy_file(info.path, new.join(STATE, MANIFEST, info.base_name))
        source_state = run.identity or {}
        saved = life.record({"config": run_config(source), "rows": source_state.get("rows"),
                             "block_rows": source_state.get("block_rows")})
        rows = saved["rows"]
        resumed = covered(new.pieces(RESULTS), rows)
        _explain_again(run, new, bank, table, store, log)
        config = saved["config"]
        return life.finish(build_summary(
            new, rows, time.time() - started, resumed, {"pairs": pair_counts(new)} if table is not None else None,
            config=dict(config, out=out, proxy="bank" if bank else config.get("proxy"), proxies=proxies,
                        pairs=pairs, top_k_channels=None if bank else config.get("top_k_channels"),
                        image_root=image_root_of(source), manifest=config.get("manifest"), keep_maps=False),
            model=(run.read_json(SUMMARY) or {}).get("model"), reexplained_from=source, plan="reexplain",
            plan_reason="from the stored E maps, no model", identity=identity, run_id=saved["run_id"]))


def _explain_again(run: RunFolder, new: RunFolder, bank: dict | None, table: pa.Table | None, store: MapStore,
                   log) -> None:
    """Every results piece of ``run`` that ``new`` lacks: explained against the bank, or
    copied; then the pairs."""
    pieces = run.pieces(RESULTS)
    todo = [p for p in pieces if p not in set(new.pieces(RESULTS))]
    if todo:
        what = "heatmaps against the bank" if bank else "results, copied"
        log(f"embcam reexplain: {what}: {len(todo)} of {len(pieces)} pieces to do")
    if bank is not None:
        copy = ManifestCopy(run, run.identity["block_rows"])
        limits, root = ReadLimits(), image_root_of(run.out)
        for n, (start, stop) in enumerate(todo, 1):
            piece = _explained_piece(run, copy, start, stop, bank, root, limits)
            new.write_table(piece, RESULTS, piece_name(start, stop))
            _every(log, n, len(todo))
        new.write_table(proxy_table(bank), PROXIES)
    else:
        for start, stop in todo:
            _copy(run, new, RESULTS, piece_name(start, stop))
        if run.exists(PROXIES):
            _copy(run, new, PROXIES)
    if table is not None:
        log(f"embcam reexplain: pairs: {table.num_rows} rows")
        write_pairs(new, table, store)


def _copy(run: RunFolder, new: RunFolder, *parts: str) -> None:
    """A file of ``run`` into ``new``, committed whole like everything a run writes."""
    with run.fs.open_input_stream(run.join(*parts)) as f:
        new.write_bytes(f.read(), *parts)


def _check_width(bank: dict, store: MapStore, source: str) -> None:
    widths = {len(v) for v in bank.values()} - {store.grid[0] if store.grid else None}
    if store.grid and widths:
        raise ValueError(f"the proxy bank's vectors have {sorted(widths)[0]} values, the embeddings of "
                         f"run {source} have {store.grid[0]}")


def _explained_piece(run: RunFolder, copy: ManifestCopy, start: int, stop: int, bank: dict,
                     image_root: str | None, limits: ReadLimits) -> pa.Table:
    """One piece's rows explained against the bank: manifest rows + the run's decode
    results + the stored maps -> heatmaps, metrics, result rows."""
    rows = copy.read(start, stop)
    batch = manifest_batch(rows)  # status and error: the run's, below
    name = piece_name(start, stop)
    done = pq.read_table(run.join(RESULTS, name), filesystem=run.fs, columns=["image_id", *RESULT_INPUTS])
    maps = read_maps_piece(run.join(MAPS, name), run.fs)
    ids = list(batch["image_id"])
    if done.column("image_id").to_pylist() != ids or list(maps["image_id"]) != ids:
        raise RuntimeError(f"run {run.out}: piece {start}-{stop} of results, maps and manifest disagree")
    for column in RESULT_INPUTS:
        values = done.column(column).to_numpy(zero_copy_only=False)
        text = column in ("status", "error")
        batch[column] = np.array(values, dtype=object) if text else np.nan_to_num(values).astype(np.int32)
    n = rows.num_rows
    batch["embedding"] = maps["embedding"] if maps["embedding"] is not None else np.zeros((n, 1), np.float32)
    batch["maps"] = maps["maps"] if maps["maps"] is not None else np.zeros((n, 1, 1, 1), np.float32)
    batch["mask_png"] = load_masks(batch, image_root, limits)
    return to_results(compute_metrics(heatmaps_from_kept_maps(batch, "bank", bank)))


def _every(log, n: int, total: int) -> None:
    if n == total or n % 50 == 0:
        log(f"embcam reexplain: {n}/{total} pieces")




def main(argv: list[str] | None = None) -> int:
    from ..arguments import BAD_INPUT, OneLineParser, error_line

    parser = OneLineParser(prog="embcam reexplain", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN", help="a finished explain run with stored maps (--keep-maps)")
    parser.add_argument("--out", required=True, help="the new run folder")
    parser.add_argument("--proxies", metavar="BANK.parquet", help="a proxy bank (label, proxy): new heatmaps "
                        "and metrics for every image, against its label's proxy")
    parser.add_argument("--pairs", metavar="PAIRS.parquet", help="pairs to explain (query_id, match_id)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in --out")
    args = parser.parse_args(argv)
    try:
        summary = reexplain(args.run, args.out, args.proxies, args.pairs, args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"embcam reexplain: error: {error_line(exc)}", file=sys.stderr)
        return BAD_INPUT
    c = summary["counts"]
    line = (f"embcam reexplain: {c['results']} rows ({c['ok']} ok, {c['error']} error) "
            f"in {summary['wall_seconds']:.1f} s")
    if "pairs" in c:
        line += f"; pairs: {c['pairs']['rows']} ({c['pairs']['ok']} ok, {c['pairs']['error']} error)"
    print(line + f" -> {args.out}")
    return 0
