"""MaxBoxAccV2 and PxAP of a whole run (``evaluate_run``): the counters the job stored with
each results file (``embcam.wsol.counters_metadata``) summed, and the files written without
them measured from their heatmaps in a stream, with the boxes and masks of the run's
manifest (docs/design.md §7, "WSOL metrics")."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embcam.boxes import BBOX_COLUMNS
from embcam.data.manifest import id_hashes
from embcam.data.schemas import OK, WSOL_COUNTERS_METADATA
from embcam.metrics import MAX_GRID_SIDE
from embcam.wsol import WsolAccumulator, stored_counters

RESULT_COLUMNS = ["image_id", "width", "height", "heatmap", "heatmap_height", "heatmap_width"]


class ManifestAnnotations:
    """The boxes and mask uris of a run's manifest (its copy in the run folder, else the
    manifest its config names), looked up by image_id: only annotated rows are kept, as
    an 8-byte id hash (sorted), the ids (to confirm a hash match), 4 float64 box values
    and the mask uri per row."""

    def __init__(self, run: str):
        import pyarrow.dataset as pads

        from embcam.results import manifest_files  # the run's manifest copy or its config's manifest

        fs, files = manifest_files(run)
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        names = set(dataset.schema.names)
        box_cols = [c for c in BBOX_COLUMNS if c in names]
        if len(box_cols) not in (0, 4):
            raise ValueError(f"manifest of run {run} has only some box columns ({', '.join(box_cols)})")
        columns = ["image_id", *box_cols, *(["mask_uri"] if "mask_uri" in names else [])]
        annotated = None
        if box_cols:
            annotated = pc.field("bbox_x0").is_valid()
        if "mask_uri" in names:
            has_mask = pc.field("mask_uri").is_valid()
            annotated = has_mask if annotated is None else annotated | has_mask
        hashes, ids, boxes, masks = [np.zeros(0, np.uint64)], [pa.array([], pa.string())], [np.zeros((0, 4))], []
        if annotated is not None:  # a batch at a time: no copy of the whole manifest, only what is kept
            for batch in dataset.to_batches(columns=columns, filter=annotated, batch_size=65536):
                hashes.append(id_hashes(batch.column("image_id")))
                ids.append(batch.column("image_id").cast(pa.string()))
                boxes.append(np.stack([batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                       for c in box_cols], 1) if box_cols else np.full((batch.num_rows, 4), np.nan))
                masks.append(batch.column("mask_uri").cast(pa.string()) if "mask_uri" in names
                             else pa.nulls(batch.num_rows, pa.string()))
        hashes = np.concatenate(hashes)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.ids = pa.chunked_array(ids).take(pa.array(order)).combine_chunks()
        self.boxes = np.concatenate(boxes)[order]
        self.mask_uris = (pa.chunked_array(masks, pa.string()).take(pa.array(order)).combine_chunks()
                          if masks else pa.nulls(0, pa.string()))

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, ids: pa.Array) -> np.ndarray:
        """Row of each id in this index, -1 where the manifest has no annotation for it."""
        hashes = id_hashes(ids)
        rows = np.searchsorted(self.hashes, hashes)
        rows[rows >= len(self.hashes)] = 0
        hit = (self.hashes[rows] == hashes) if len(self.hashes) else np.zeros(len(hashes), bool)
        if hit.any():  # confirm the id itself; a 64-bit hash collision searches its equal-hash run
            same = pc.equal(self.ids.take(pa.array(rows)), ids).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(hit & ~same):
                lo, hi = (np.searchsorted(self.hashes, hashes[i], side) for side in ("left", "right"))
                match = [r for r in range(lo, hi) if self.ids[r].as_py() == ids[i].as_py()]
                rows[i] = match[0] if match else -1
                same[i] = bool(match)
            hit &= same
        return np.where(hit, rows, -1)


def evaluate_run(run: str, split: str | None = None, *, image_root: str | None = None,
                 batch_rows: int = 1024, max_side: int = MAX_GRID_SIDE, use_counters: bool = True) -> dict:
    """MaxBoxAccV2 and PxAP of a run's ``heatmap`` column over its ok rows (of ``split``).

    Each results file's counters, stored by the job (:func:`counters_metadata`), are summed:
    a footer read per file. A file without them (written before results contract version
    3, or ``use_counters=False``) is measured here: read ``batch_rows`` rows at a time (the
    heatmaps only as a batch goes), with the boxes and mask uris from the run's manifest and
    each mask file read once (``image_root``: where the masks are now, default the run's
    image root); a mask that cannot be read now leaves its image out of PxAP (counted,
    first reason kept). Returns ``{"maxboxacc_v2", "pxap"}`` (:meth:`MaxBoxAccV2.result`,
    :meth:`PxAP.result` plus ``masks_unreadable`` and ``mask_error``), ``rows`` (ok rows
    counted), ``files`` ({"results": results files, "measured": those measured here}),
    ``max_side`` and ``seconds``."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from embcam.results import open_results

    started = time.perf_counter()
    wanted = pc.field("status") == OK
    if split is not None:
        wanted = wanted & (pc.field("split") == split)
    results = open_results(run, columns=[*RESULT_COLUMNS, "status", *([] if split is None else ["split"])])
    acc = WsolAccumulator(max_side)
    rows, measured = 0, []
    for path in results.files:  # the footer alone, not kept (a dataset fragment would cache it)
        metadata = pq.read_schema(path, filesystem=results.filesystem).metadata if use_counters else None
        stored = stored_counters((metadata or {}).get(WSOL_COUNTERS_METADATA), split, max_side)
        if stored is None:
            measured.append(path)
        else:
            rows += stored[0]
            acc.merge(stored[1])
    unreadable, first_error = 0, None
    if measured:
        files = pads.dataset(measured, filesystem=results.filesystem, format="parquet", schema=results.schema)
        counted, unreadable, first_error = _measure(run, files.filter(wanted), acc, image_root, batch_rows)
        rows += counted
    out = acc.result()
    out["pxap"].update(masks_unreadable=unreadable, mask_error=first_error)
    out.update(rows=rows, files={"results": len(results.files), "measured": len(measured)}, max_side=max_side,
               seconds=round(time.perf_counter() - started, 3))
    return out


def _measure(run: str, results, acc: WsolAccumulator, image_root: str | None,
             batch_rows: int) -> tuple[int, int, str | None]:
    """Add the ok rows of the ``results`` dataset to ``acc`` from their heatmaps (see
    :func:`evaluate_run`); returns (rows read, masks unreadable, the first one's reason)."""
    from embcam.data.fetch import read_bytes
    from embcam.data.images import decode_mask
    from embcam.data.locations import resolve_uri
    from embcam.results import image_root_of, read_limits_of, run_config

    annotations = ManifestAnnotations(run)
    root = image_root or image_root_of(run)
    limits = read_limits_of(run_config(run), root)
    rows, unreadable, first_error = 0, 0, None
    if len(annotations):
        for batch in results.to_batches(columns=RESULT_COLUMNS, batch_size=batch_rows):
            rows += batch.num_rows
            found = annotations.find(batch.column("image_id"))
            if not (found >= 0).any():
                continue
            heat = batch.column("heatmap")
            offsets = heat.offsets.to_numpy()
            values = heat.values.to_numpy(zero_copy_only=False)
            sizes = {c: batch.column(c).to_numpy(zero_copy_only=False)
                     for c in ("width", "height", "heatmap_height", "heatmap_width")}
            for i in np.flatnonzero(found >= 0):
                image_id = batch.column("image_id")[i].as_py()
                if not heat[i].is_valid:
                    raise ValueError(f"run {run}: ok row image_id {image_id!r} has no heatmap")
                h, w = int(sizes["heatmap_height"][i]), int(sizes["heatmap_width"][i])
                width, height = int(sizes["width"][i]), int(sizes["height"][i])
                raw = values[offsets[i]:offsets[i + 1]]
                if raw.size != h * w:
                    raise ValueError(f"run {run}: heatmap of image_id {image_id!r} has {raw.size} values, "
                                     f"heatmap_height x heatmap_width = {h} x {w}")
                r = found[i]
                box = None if np.isnan(annotations.boxes[r]).any() else annotations.boxes[r]
                mask = None
                uri = annotations.mask_uris[r].as_py()
                if uri is not None:
                    try:
                        mask = decode_mask(read_bytes(resolve_uri(uri, root), limits), limits.max_pixels)
                        if mask.shape != (height, width):
                            raise ValueError(f"mask {uri} is {mask.shape[1]}x{mask.shape[0]}, the image "
                                             f"{width}x{height}")
                    except (OSError, ValueError) as exc:
                        unreadable += 1
                        first_error = first_error or f"image_id {image_id!r}: {exc}"
                        mask = None
                acc.add(raw.reshape(h, w), width, height, box, mask)
    return rows, unreadable, first_error

