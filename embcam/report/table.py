"""Table 1 numbers: per-run means, then mean ± population std across the runs of a method.

See the protocol in the ``embcam.report`` package docstring.
"""

from __future__ import annotations

import numpy as np

from embcam.data.schemas import OK
from embcam.metrics import DEFAULT_THRESHOLD, LOC_IOU, THRESHOLDS
from embcam.report.runs import RATIO_COLUMNS, check_distinct, method_key, read_results, read_summary
from embcam.wsol import BOX_THRESHOLDS, IOU_THRESHOLDS
from embcam.wsol_run import evaluate_run

REGIONS = {"bbox": "BBox", "mask": "Mask"}
METHOD_NAMES = {
    "self": "EmbeddingCAM (self proxy)", "mean": "EmbeddingCAM (mean proxy)",
    "onehot": "Grad-CAM (onehot proxy)", "bank": "EmbeddingCAM (bank proxy)",
    "chen": "Chen et al. 2020 (transferred weights, top-k only)",
    "centre": "Centre baseline (a centred Gaussian map, no model)",
}
STD_NOTE = ("mean ± std across the runs of a method (independently trained models); std is "
            "the population std (ddof = 0) of the per-run means, 0 for a single run")
WSOL_PROTOCOL = (
    "Choe et al. (CVPR 2020), as clovaai/wsolevaluation with multi-contour and multi-IoU evaluation, on the "
    "heatmap column (all channels; a top-k-only method: its top-k map): the raw map upsampled bilinearly to "
    "the metrics grid (the image's size, at most 512 px a side) and min-max normalised; tau = 0, 0.01, ..., "
    "0.99, foreground H >= tau. MaxBoxAccV2: the box of every contour (cv2.findContours RETR_TREE) at each "
    "tau; an image is correct at (tau, delta) when any box has IoU >= delta with its ground-truth box; per "
    "delta in {0.3, 0.5, 0.7} the best accuracy over tau, then their mean. Images: status ok with a box; a "
    "degenerate (constant) map counts as incorrect at every tau. PxAP: precision and recall of the mask "
    "pixels summed over the images with a mask, at each tau (and tau = 1), area sum_k P_k (R_k - R_k+1); "
    "a degenerate map counts as H = 0. Per run, then mean ± std across runs.")


def table1(runs: list[str], *, split: str | None = None, wsol: bool = True) -> dict:
    """Table 1 of the paper over result directories ``runs`` (see the module docstring).

    ``split``: keep only result rows whose ``split`` equals it. Returns a JSON-ready dict:
    ``protocol``, ``split``, ``top_k`` (the k shared by every method, or None),
    ``methods`` (one per proxy mode, in order of first appearance, each with ``rows``
    {bbox, mask} x {uniform, all, topk}, ``accuracy``, ``sweep`` and ``wsol``
    (MaxBoxAccV2, its per-IoU accuracies and best thresholds, PxAP), every value a stat
    {mean, std, n_runs, per_run, n_images}) and ``runs`` (per-run counts and values).
    ``wsol=False`` leaves MaxBoxAccV2 and PxAP out (``wsol_run.evaluate_run``: the job's counters
    summed, or, for results files without them, every heatmap and mask read again).
    """
    return evaluate(runs, split, wsol=wsol)[0]


def evaluate(runs: list[str], split: str | None, allow_partial: bool = False,
             wsol: bool = True) -> tuple[dict, dict]:
    """(table dict, {run: ok image ids}) for ``table1`` and ``write_report``."""
    check_distinct(runs)
    per_run, ok_ids = [], {}
    for run in runs:
        summary = read_summary(run, allow_partial)
        cols = read_results(run, split)
        entry = _run_entry(run, summary, cols)
        entry["wsol"], entry["wsol_skipped"] = None, None if wsol else "not requested"
        if wsol:
            try:
                entry["wsol"] = evaluate_run(run, split)
            except FileNotFoundError as e:  # no manifest: no boxes or masks to measure against
                entry["wsol_skipped"] = str(e)
        per_run.append(entry)
        ok_ids[run] = cols["image_id"][cols["status"] == OK]

    methods: dict[str, dict] = {}
    for entry in per_run:
        methods.setdefault(entry["method"], {"key": entry["method"], "runs": []})
        methods[entry["method"]]["runs"].append(entry)
    out_methods = [_method_entry(m["key"], m["runs"]) for m in methods.values()]
    ks = {m["top_k"] for m in out_methods if m["rows"]["bbox"]["topk"]["n_runs"]
          or m["rows"]["mask"]["topk"]["n_runs"]}
    table = {
        "protocol": {
            "images": "status ok and non-degenerate heatmap; rows where the metric is null "
                      "(no box, no mask, no top-k map) are skipped and counted",
            "std": STD_NOTE, "ddof": 0, "loc_iou": LOC_IOU,
            "threshold": DEFAULT_THRESHOLD, "thresholds": list(THRESHOLDS),
            "best_over_t": "per run the maximum accuracy over the thresholds (ties to the "
                           "smallest t), then mean ± std across runs",
            "wsol": WSOL_PROTOCOL if wsol else None,
            "wsol_iou_thresholds": list(IOU_THRESHOLDS), "wsol_thresholds": list(BOX_THRESHOLDS),
        },
        "split": split,
        "top_k": ks.pop() if len(ks) == 1 else None,
        "methods": out_methods,
        "runs": per_run,
    }
    return table, ok_ids


def _run_entry(run: str, summary: dict, cols: dict) -> dict:
    """Counts and per-run values of one run."""
    config = summary.get("config", {})
    ok = cols["status"] == OK
    degenerate = ok & cols["degenerate"]
    evaluated = ok & ~degenerate

    def mean_of(values: np.ndarray, valid: np.ndarray) -> dict:
        sel = evaluated & valid
        n = int(sel.sum())
        return {"value": float(np.mean(values[sel])) if n else None, "n": n,
                "skipped_null": int((evaluated & ~valid).sum())}

    values = {name: mean_of(cols[name], cols[name + "?"]) for name in RATIO_COLUMNS.values()}
    values["accuracy"] = mean_of(cols["loc_correct"], cols["loc_correct?"])
    sweep_valid = cols["iou_sweep?"]
    sweep = [mean_of(cols["iou_sweep"][:, i] >= LOC_IOU, sweep_valid)
             for i in range(len(THRESHOLDS))]
    accs = [s["value"] for s in sweep]
    best = None
    if accs[0] is not None:
        i = int(np.argmax(accs))  # first maximum: the smallest t
        best = {"value": accs[i], "threshold": THRESHOLDS[i], "n": sweep[i]["n"]}
    return {
        "run": run,
        "method": method_key(run, config),
        "unfinished": summary.get("unfinished"),
        "model": config.get("model") or summary.get("model"),
        "checkpoint": config.get("checkpoint"),
        "top_k": config.get("top_k_channels"),
        "top_k_only": bool(config.get("top_k_only")),  # its heatmap is a top-k map (embcam chen-baseline)
        "counts": {"images": int(len(ok)), "ok": int(ok.sum()),
                   "error": int((~ok).sum()), "degenerate": int(degenerate.sum()),
                   "evaluated": int(evaluated.sum())},
        "values": values,
        "sweep": sweep,
        "sweep_best": best,
    }


def _across(per_run: list[dict]) -> dict:
    """mean ± population std over the runs that have a value."""
    used = [r for r in per_run if r["value"] is not None]
    vals = np.array([r["value"] for r in used], dtype=np.float64)
    return {"mean": float(vals.mean()) if len(vals) else None,
            "std": float(vals.std(ddof=0)) if len(vals) else None,
            "n_runs": len(vals), "per_run": [float(v) for v in vals],
            "n_images": [r["n"] for r in used]}


def _method_entry(key: str, runs: list[dict]) -> dict:
    ks = sorted({r["top_k"] for r in runs if r["top_k"] is not None})
    if len(ks) > 1:
        raise ValueError(f"method {key!r}: runs use different top_k_channels {ks} "
                         f"({', '.join(r['run'] for r in runs)}); report them separately")
    top_k_only = all(r["top_k_only"] for r in runs)
    rows = {region: {col: _across([] if top_k_only and col == "all" else [r["values"][name] for r in runs])
                     for (reg, col), name in RATIO_COLUMNS.items() if reg == region}
            for region in REGIONS}
    sweep = [_across([r["sweep"][i] for r in runs]) for i in range(len(THRESHOLDS))]
    return {
        "key": key,
        "name": METHOD_NAMES.get(key, f"EmbeddingCAM (proxy {key})"),
        "runs": [r["run"] for r in runs],
        "n_runs": len(runs),
        "top_k": ks[0] if ks else None,
        "top_k_only": top_k_only,
        "rows": rows,
        "accuracy": _across([r["values"]["accuracy"] for r in runs]),
        "sweep": {"thresholds": list(THRESHOLDS), "accuracy": sweep,
                  "best": _across([r["sweep_best"] or {"value": None, "n": 0} for r in runs]),
                  "best_threshold": [r["sweep_best"]["threshold"] for r in runs
                                     if r["sweep_best"]]},
        "wsol": _wsol_entry(runs),
    }


def _wsol_entry(runs: list[dict]) -> dict | None:
    """MaxBoxAccV2 (and its per-delta accuracies with each run's best tau) and PxAP across runs."""
    results = [r["wsol"] for r in runs if r.get("wsol") is not None]
    if not results:
        return None
    boxes = [w["maxboxacc_v2"] for w in results]
    pixels = [w["pxap"] for w in results]
    per_iou = []
    for j, delta in enumerate(IOU_THRESHOLDS):
        measured = [b for b in boxes if b["value"] is not None]
        per_iou.append({"iou": delta,
                        "accuracy": _across([{"value": b["per_iou"][j]["accuracy"], "n": b["images"]}
                                             for b in measured]),
                        "best_threshold": [b["per_iou"][j]["threshold"] for b in measured]})
    return {
        "maxboxacc_v2": _across([{"value": b["value"], "n": b["images"]} for b in boxes]),
        "per_iou": per_iou,
        "pxap": _across([{"value": p["value"], "n": p["images"]} for p in pixels]),
        "degenerate": [b["degenerate"] for b in boxes],
        "masks_unreadable": sum(p["masks_unreadable"] for p in pixels),
    }
