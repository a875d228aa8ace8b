"""``embcam reexplain RUN --out NEW (--proxies BANK.parquet | --pairs PAIRS.parquet)``:
explain a finished run again from its stored E maps (``explain --keep-maps``), with no
model: heatmaps against another proxy bank are ReLU(E . p) and the same metrics as the
job's; pairs are ``embcam.pairs``. CPU only, one process, piece by piece.

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

from . import __version__
from .fetch import ReadLimits
from .locations import has_scheme
from .maps import MapStore, read_maps_piece
from .pairs import check_known, pair_counts, pairs_sha256, read_pairs, write_pairs
from .proxies import load_proxy_bank, proxy_table
from .results import image_root_of, run_config, summarise
from .runstate import (
    DONE,
    IDENTITY,
    MANIFEST,
    MAPS,
    PROXIES,
    RESULTS,
    STATE,
    SUMMARY,
    ManifestCopy,
    RunFolder,
    RunMismatch,
    file_sha256,
    identity_differences,
    piece_name,
)
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
        check_known(table, pa.array(list(store.index), pa.string()), f"run {source}")
    identity = {"source": source if has_scheme(source) else os.path.abspath(source),
                "source_identity": (run.identity or {}).get("identity"),
                "proxy_bank_sha256": file_sha256(proxies),
                "pairs_sha256": pairs_sha256(table) if table is not None else None, "embcam": __version__}
    _start(new, identity, overwrite, out)
    config = run_config(source)

    pieces = run.pieces(RESULTS)
    todo = [p for p in pieces if p not in set(new.pieces(RESULTS))]
    if todo:
        what = "heatmaps against the bank" if bank else "results, copied"
        log(f"embcam reexplain: {what}: {len(todo)} of {len(pieces)} pieces to do")
    if bank is not None:
        copy = ManifestCopy(run, run.identity["block_rows"])
        limits, root = ReadLimits(), image_root_of(source)
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

    counts, metrics = summarise(new)
    if table is not None:
        counts["pairs"] = pair_counts(new)
    wall = time.time() - started
    summary = {
        "config": dict(config, out=out, proxy="bank" if bank else config.get("proxy"), proxies=proxies,
                       pairs=pairs, top_k_channels=None if bank else config.get("top_k_channels"),
                       image_root=image_root_of(source), manifest=config.get("manifest"), keep_maps=False),
        "model": (run.read_json(SUMMARY) or {}).get("model"),
        "reexplained_from": source, "plan": "reexplain", "plan_reason": "from the stored E maps, no model",
        "identity": identity, "counts": {"manifest": counts["results"], **counts, "resumed": 0},
        "metrics": metrics, "wall_seconds": round(wall, 3),
        "images_per_second": round(counts["results"] / wall, 3) if wall > 0 else None,
    }
    new.write_json(summary, SUMMARY)
    new.write_bytes(b"", DONE)
    return summary


def _copy(run: RunFolder, new: RunFolder, *parts: str) -> None:
    """A file of ``run`` into ``new``, committed whole like everything a run writes."""
    with run.fs.open_input_stream(run.join(*parts)) as f:
        new.write_bytes(f.read(), *parts)


def _check_width(bank: dict, store: MapStore, source: str) -> None:
    widths = {len(v) for v in bank.values()} - {store.grid[0] if store.grid else None}
    if store.grid and widths:
        raise ValueError(f"the proxy bank's vectors have {sorted(widths)[0]} values, the embeddings of "
                         f"run {source} have {store.grid[0]}")


def _start(new: RunFolder, identity: dict, overwrite: bool, out: str) -> None:
    """A fresh NEW (its manifest copy and run.json written), or the same reexplain resumed."""
    saved = new.identity
    if saved is not None and not overwrite:
        differences = identity_differences(saved["identity"], identity)
        if differences:
            raise RunMismatch(f"{out} holds another run (" + "; ".join(differences) + "): use the same "
                              "options to resume it, a new --out, or --overwrite")
        new.delete(DONE)
        new.delete(SUMMARY)
        return
    if saved is None and new.listing(RESULTS) and not overwrite:
        raise FileExistsError(f"{out} holds results embcam cannot resume: choose a new --out or pass --overwrite")
    new.clear()
    source = RunFolder(identity["source"])
    for info in source.listing(STATE, MANIFEST):
        new.fs.create_dir(new.join(STATE, MANIFEST), recursive=True)
        new.fs.copy_file(info.path, new.join(STATE, MANIFEST, info.base_name))
    state = source.identity or {}
    new.write_json({"identity": identity, "config": run_config(identity["source"]), "rows": state.get("rows"),
                    "block_rows": state.get("block_rows")}, STATE, IDENTITY)


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
    from .cli import BAD_INPUT, OneLineParser, error_line

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
