"""``embcam sanity RUN``: model-randomisation, deletion and insertion checks of an explain run's heatmaps.

Reads the run's config (``summary.json``), loads its model (``embcam.models.load_model``:
spec, checkpoint, image size and preprocessing), samples ``--images`` of its ok rows
(sorted by image_id, then ``numpy.random.default_rng(seed).choice``), loads them as the
job did (``embcam.job.stages.load_images``), takes the proxies the run used (``self``; the
class proxies of ``proxies.parquet`` by each row's ``proxy_label``; onehot) and runs the
checks of :mod:`embcam.evaluation.saliency_checks` in this process (no Ray). Writes
``RUN/sanity/sanity.json``, ``cascade.png``, ``deletion.png`` and ``insertion.png`` (or
into ``--out``), through pyarrow.fs: RUN may be a URI, as for ``embcam explain --out``.
Definitions, the verdict and the choices: docs/design.md §7, "Sanity and faithfulness checks".
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pyarrow.compute as pc
import torch

from ..arguments import OneLineParser, error_line
from ..data.locations import join_location, redact
from ..data.runstate import PROXIES, SANITY, RunFolder
from ..data.schemas import OK
from ..inference import prepare_for_inference
from ..job.model_stage import resolved_target
from ..job.stages import load_images
from ..models import load_model
from ..proxies import load_proxy_bank
from ..report.plot import draw_cascade, draw_curves, plot_png
from ..report.runs import read_summary
from ..results import as_the_job_meant, image_root_of, open_results, read_limits_of, read_rows
from .saliency_checks import FILLS, cam_explainer, cascade, deletion, insertion

THRESHOLD = 0.5  # the verdict: mean rho below this once the head and the last block are random
RANDOM_ORDERS = 3
METHOD_NAMES = {"heatmap": "EmbeddingCAM", "random": f"random order (mean of {RANDOM_ORDERS})",
                "uniform": "uniform map"}
CRITERION = (f"pass when the mean Spearman rho between the trained model's heatmaps and those of the model "
             f"with its head and last block randomised (cascade step 2) is below {THRESHOLD:g}")


def check_run(run: str, out: str | None = None, *, images: int = 64, seed: int = 0, steps: int = 16,
              fill: str = "blur", image_root: str | None = None, log=None) -> dict:
    """Run the checks on ``run`` and write sanity.json and the plots; returns the JSON dict."""
    if images < 1 or steps < 1:
        raise ValueError(f"--images and --steps must be >= 1, got {images} and {steps}")
    if fill not in FILLS:
        raise ValueError(f"--fill must be one of {FILLS}, got {fill!r}")
    log = log or (lambda message: print(f"embcam sanity: {message}", file=sys.stderr, flush=True))
    started = time.perf_counter()
    config = read_summary(run).get("config", {})
    proxy_mode = config.get("proxy") or "self"
    checkpoint = config.get("checkpoint")
    model, preprocess, spec = load_model(config.get("model"),
                                         checkpoint and as_the_job_meant(run, config, str(checkpoint)),
                                         config.get("image_size"), bool(config.get("allow_partial_checkpoint")))
    ids, unreadable, pixels, rows = _sample(run, config, images, seed, preprocess.size, image_root)
    log(f"{len(ids)} images of {redact(run)} loaded ({unreadable} unreadable left out); model {spec}, "
        f"proxy {proxy_mode}")
    x = preprocess(torch.from_numpy(pixels))
    proxies = _proxies(run, proxy_mode, rows, ids, model, x)
    explain = cam_explainer(config.get("target_layer"), config.get("reshape"))

    result = cascade(model, x, "self" if proxy_mode == "self" else proxies, explain, seed=seed,
                     progress=lambda k, n, block: log(f"randomisation step {k}/{n}: {block}"))
    if any(rows[i].get("heatmap") is None for i in ids):
        raise ValueError(f"run {run}: its ok rows carry no heatmap to check")
    stored = np.stack([np.asarray(rows[i]["heatmap"], np.float64).reshape(rows[i]["heatmap_height"],
                                                                          rows[i]["heatmap_width"]) for i in ids])
    if stored.shape != result["trained"].shape:
        raise ValueError(f"run {run}: stored heatmaps are {stored.shape[1:]}, the model gives "
                         f"{result['trained'].shape[1:]}: the config does not rebuild the run's model")
    difference = float(np.abs(stored - result["trained"]).max())
    scale = float(np.abs(stored).max())
    if difference > 1e-3 * max(scale, 1e-12):
        log(f"warning: heatmaps recomputed here differ from the run's by up to {difference:.3g} "
            f"(largest stored value {scale:.3g}); is the checkpoint the one the run used?")

    # the job's own prepared model (BatchNorm folded, channels_last): the same embeddings to ~1e-6, faster
    prepared = prepare_for_inference(model, resolved_target(model, config.get("target_layer")))

    def curves_of(kind: str, check) -> dict:  # the same fills, orders and uniform map for both
        return check(prepared, preprocess, pixels, stored, proxies, steps=steps, fill=fill, seed=seed,
                     random_orders=RANDOM_ORDERS,
                     progress=lambda k, n: log(f"{kind}: image {k}/{n}") if k % 16 == 0 or k == n else None)

    curves, revealed = curves_of("deletion", deletion), curves_of("insertion", insertion)
    report = {
        "run": redact(run), "run_id": (RunFolder(run).identity or {}).get("run_id"),  # the report shows this run's only
        "model": spec, "target_layer": config.get("target_layer"), "proxy": proxy_mode,
        "images": len(ids), "unreadable": unreadable, "seed": seed,
        "randomisation": _randomisation(result, proxy_mode),
        "deletion": _deletion(curves, fill, steps),
        "insertion": _insertion(revealed, fill, steps),
        "stored_heatmaps": {"max_abs_difference": difference, "max_value": scale,
                            "note": "the run's stored heatmaps against those recomputed here by the trained "
                                    "model; the deletion and insertion checks use the stored ones"},
        "per_image": {"image_id": ids, "rho": _listed(result["rho"]),
                      "auc": {m: _listed(v) for m, v in curves["auc"].items()},
                      "insertion_auc": {m: _listed(v) for m, v in revealed["auc"].items()}},
        "files": {"cascade": "cascade.png", "deletion": "deletion.png", "insertion": "insertion.png"},
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    location = out or join_location(run, SANITY)
    folder = RunFolder(location)  # local or remote, as the run
    r = report["randomisation"]
    folder.write_bytes(plot_png(draw_cascade([s["randomised"] for s in r["steps"]], [s["mean"] for s in r["steps"]],
                                             [s["std"] for s in r["steps"]], THRESHOLD)), "cascade.png")
    d = report["deletion"]
    folder.write_bytes(plot_png(draw_curves(
        [{"name": METHOD_NAMES[m], "x": v["fractions"], "y": v["curve_mean"]} for m, v in d["methods"].items()],
        f"deletion ({fill} fill): mean cosine of the embedding to its proxy", "fraction of the image removed")),
        "deletion.png")
    d = report["insertion"]
    folder.write_bytes(plot_png(draw_curves(
        [{"name": METHOD_NAMES[m], "x": v["fractions"], "y": v["curve_mean"]} for m, v in d["methods"].items()],
        f"insertion (from the {fill} fill): mean cosine of the embedding to its proxy",
        "fraction of the image revealed")), "insertion.png")
    folder.write_bytes((json.dumps(report, indent=2, allow_nan=False) + "\n").encode(), "sanity.json")
    report["folder"] = redact(location)
    return report


def _sample(run: str, config: dict, count: int, seed: int, size: int, image_root: str | None):
    """(ids, unreadable, pixels (N, S, S, 3) uint8, rows by id) of up to ``count`` ok rows."""
    table = open_results(run, columns=["image_id", "status"], filter=pc.field("status") == OK).to_table()
    ok = sorted(table.column("image_id").to_pylist())
    if not ok:
        raise ValueError(f"run {run}: no row with status ok to check")
    picked = sorted(ok[i] for i in np.random.default_rng(seed).choice(len(ok), min(count, len(ok)), replace=False))
    root = image_root or image_root_of(run)
    rows = read_rows(run, picked, columns=["image_id", "proxy_label", "heatmap", "heatmap_height",
                                           "heatmap_width"], image_root=root)
    located = [i for i in picked if rows[i].get("uri") is not None]
    limits = read_limits_of(config, root)
    batch = load_images({"image_id": np.array(located, dtype=object),
                         "uri": np.array([rows[i]["uri"] for i in located], dtype=object)}, None, size, limits)
    good = np.flatnonzero(batch["status"] == OK)
    if not len(good):
        first = batch["error"][0] if len(located) else "no image is in the run's manifest"
        raise ValueError(f"run {run}: none of the {len(picked)} sampled images could be read (first: {first})")
    ids = [located[i] for i in good]
    return ids, len(picked) - len(ids), batch["image"][good], rows


def _proxies(run: str, mode: str, rows: dict, ids: list[str], model, x) -> torch.Tensor:
    """(N, d): each image's proxy as the run took it (self: the trained model's own embedding)."""
    if mode == "self":
        with torch.inference_mode():
            return model(x).float()
    labels = [rows[i].get("proxy_label") for i in ids]
    missing = [i for i, label in zip(ids, labels) if label is None]
    if missing:
        raise ValueError(f"run {run}: rows {missing[:5]} have no proxy_label (proxy {mode})")
    if mode == "onehot":
        with torch.inference_mode():
            d = model(x[:1]).shape[-1]
        return torch.nn.functional.one_hot(torch.tensor([int(label) for label in labels]), d).float()
    folder = RunFolder(run)
    bank = load_proxy_bank(folder.join(PROXIES), filesystem=folder.fs)
    unknown = sorted({label for label in labels if label not in bank})
    if unknown:
        raise ValueError(f"run {run}: proxies.parquet has no proxy for label(s) {unknown[:5]}")
    return torch.from_numpy(np.stack([bank[label] for label in labels]))


def _stats(values) -> dict:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(len(values))}


def _listed(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.ravel(values)] if np.ndim(values) == 1 \
        else [_listed(row) for row in values]


def _randomisation(result: dict, proxy_mode: str) -> dict:
    steps = [{"randomised": block, **_stats(rho), "constant_maps": int(c)}
             for block, rho, c in zip(result["blocks"], result["rho"], result["constant"])]
    at = min(1, len(steps) - 1)
    value = steps[at]["mean"]
    return {
        "explained_against": ("each randomised model's own normalised embedding (the self proxy)"
                              if proxy_mode == "self" else f"the run's {proxy_mode} proxy of each image, unchanged"),
        "steps": steps, "trained_constant": result["trained_constant"],
        "criterion": CRITERION, "threshold": THRESHOLD,
        "verdict_step": " + ".join(s["randomised"] for s in steps[:at + 1]), "verdict_value": value,
        "final_value": steps[-1]["mean"],
        "verdict": "pass" if value is not None and value < THRESHOLD else "fail",
    }


def _curve_summary(curves: dict, fill: str, steps: int) -> dict:
    auc = curves["auc"]
    methods = {m: {"name": METHOD_NAMES[m], "auc": _stats(auc[m]),
                   "fractions": curves["fractions"][m].tolist(),
                   "curve_mean": curves["curves"][m].mean(0).tolist()} for m in auc}
    return {"fill": fill, "steps": steps, "random_orders": RANDOM_ORDERS, "methods": methods}


def _deletion(curves: dict, fill: str, steps: int) -> dict:
    auc = curves["auc"]
    return {**_curve_summary(curves, fill, steps),
            "heatmap_below_random": float(np.mean(auc["heatmap"] < auc["random"])),
            "heatmap_below_uniform": float(np.mean(auc["heatmap"] < auc["uniform"]))}


def _insertion(curves: dict, fill: str, steps: int) -> dict:
    auc = curves["auc"]  # higher is better: the heatmap's order should bring the embedding back first
    return {**_curve_summary(curves, fill, steps),
            "heatmap_above_random": float(np.mean(auc["heatmap"] > auc["random"])),
            "heatmap_above_uniform": float(np.mean(auc["heatmap"] > auc["uniform"]))}


def format_report(report: dict) -> str:
    """The console summary of a :func:`check_run` result."""
    r, d = report["randomisation"], report["deletion"]

    def cell(s):
        return "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"

    lines = [f"embcam sanity: {report['images']} images of {report['run']} (proxy {report['proxy']}, "
             f"model {report['model']}) in {report['wall_seconds']:.1f} s", "",
             "model randomisation, cumulative from the output (Spearman rho with the trained map):"]
    lines += [f"  {s['randomised'][:40]:<40} {cell(s)}" for s in r["steps"]]
    lines += [f"  verdict: {r['verdict'].upper()} ({r['criterion']})", "",
              f"deletion ({d['fill']} fill, {d['steps']} steps; area under the cosine to the proxy, "
              "lower = more faithful):"]
    lines += [f"  {v['name']:<32} {cell(v['auc'])}" for v in d["methods"].values()]
    lines += [f"  EmbeddingCAM below random on {d['heatmap_below_random']:.0%} of the images, "
              f"below uniform on {d['heatmap_below_uniform']:.0%}", ""]
    i = report["insertion"]
    lines += [f"insertion (from the {i['fill']} fill, {i['steps']} steps; area under the cosine to the proxy, "
              "higher = more faithful):"]
    lines += [f"  {v['name']:<32} {cell(v['auc'])}" for v in i["methods"].values()]
    lines += [f"  EmbeddingCAM above random on {i['heatmap_above_random']:.0%} of the images, "
              f"above uniform on {i['heatmap_above_uniform']:.0%}", "",
              f"written: {report['folder']}/sanity.json, cascade.png, deletion.png, insertion.png"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``embcam sanity RUN [--images N] [--seed S] [--steps K] [--fill blur|mean] [--out DIR]``."""
    parser = OneLineParser(
        prog="embcam sanity",
        description="Sanity and faithfulness checks of a run's heatmaps, in this process: model randomisation "
                    "(Adebayo et al. 2018: rank correlation with the trained model's maps as the model's blocks are "
                    "re-initialised from the output down), deletion and insertion (Petsiuk et al. 2018: cosine of "
                    "the embedding to its proxy as the hottest pixels are removed, or revealed from the filled "
                    "image, against random orders and the uniform map). Writes RUN/sanity/sanity.json, "
                    "cascade.png, deletion.png, insertion.png.")
    parser.add_argument("run", metavar="RUN", help="a finished run folder (embcam explain --out RUN)")
    parser.add_argument("--images", type=int, default=64, metavar="N", help="ok images sampled (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample, the randomisation and the "
                        "random orders (default 0)")
    parser.add_argument("--steps", type=int, default=16, metavar="K",
                        help="deletion and insertion steps (default 16)")
    parser.add_argument("--fill", choices=FILLS, default="blur",
                        help="what deleted pixels become (and what insertion starts from): a blurred copy of "
                             "the image or its mean colour")
    parser.add_argument("--out", metavar="DIR", help="where sanity.json and the plots go (default RUN/sanity)")
    parser.add_argument("--image-root", help="where the images are now, if not where the run read them")
    args = parser.parse_args(argv)
    try:
        report = check_run(args.run, args.out, images=args.images, seed=args.seed, steps=args.steps,
                           fill=args.fill, image_root=args.image_root)
    except (ValueError, OSError) as exc:
        print(f"embcam sanity: error: {error_line(exc)}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
