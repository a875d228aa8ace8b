"""The ``embcam`` command: explain, demo, report, train, manifest makers."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .arguments import BAD_INPUT, OneLineParser, config_from, error_line
from .checkpoints import CheckpointLoad
from .data.locations import join_location, redact

DEMO_MODEL = Path(__file__).parent / "assets" / "demo_model.pt"
DEMO_CLASSES = range(50, 60)  # ten of the evaluation classes the demo model never saw
DELEGATED = {"report": "embcam.report", "train": "embcam.training", "make-pairs": "embcam.pairs.make",
             "chen-baseline": "embcam.evaluation.chen", "sanity": "embcam.evaluation.sanity",
             "reexplain": "embcam.job.reexplain"}  # commands with their own parsers
def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    """The explain job's options (shared by ``embcam explain`` and jobs/explain.py)."""
    p.add_argument("--manifest", required=True,
                   help="Parquet manifest: a file, a directory of files or a glob; local or s3://, gs://")
    p.add_argument("--out", required=True, help="output folder (local or URI): results/, proxies.parquet, summary.json")
    p.add_argument("--model", help="model spec, e.g. torchvision:resnet50+linear:128 (default: the checkpoint's)")
    p.add_argument("--checkpoint",
                   help="weights (torch.load with weights_only=True); embcam checkpoints carry their spec. "
                        "They must fit the model exactly: a tensor the file lacks or has with another shape "
                        "is an error that names it")
    p.add_argument("--allow-partial-checkpoint", action="store_true",
                   help="run even when --checkpoint leaves some of the model's tensors unloaded (they keep "
                        "their random init): said at the start, in the summary and in summary.json")
    p.add_argument("--target-layer",
                   help="dotted module name to explain (default: the backbone output, layer4 of a ResNet)")
    p.add_argument("--reshape", choices=["tokens", "nhwc", "nchw"],
                   help="how the target layer's output becomes a (K, h, w) map: tokens = a transformer's "
                        "token sequence laid out on its patch grid, nhwc = channels last, nchw = as it is "
                        "(default: the model's own, see `embcam models`)")
    p.add_argument("--py-modules", action="append", metavar="PATH",
                   help="your model code for every Ray worker: a package folder or a .py file, imported by "
                        "its name (repeatable; sent through Ray's runtime_env, like the folder below)")
    p.add_argument("--working-dir", metavar="DIR",
                   help="a folder every Ray worker runs in, on its Python path (Ray's runtime_env "
                        "working_dir; .gitignore and .rayignore are honoured, 512 MiB at most)")
    proxy = p.add_mutually_exclusive_group()
    proxy.add_argument("--proxy", default="self", choices=["self", "mean", "onehot"],
                       help="self: each image's own embedding; mean: its class's normalised mean proxy "
                            "(map-reduce over the manifest); onehot: Grad-CAM on a classifier's logit <label>")
    proxy.add_argument("--proxies", metavar="BANK.parquet", help="explain against a proxy bank (label, proxy)")
    p.add_argument("--proxy-split", metavar="S", help="with --proxy mean: build proxies from rows of split S only")
    p.add_argument("--strategy", default="auto", choices=["auto", "stored-maps", "streaming", "two-pass",
                                                          "embedding-map"],
                   help="the plan for --proxy mean. stored-maps = pass 1 embeds and stores each image's E map "
                        "in OUT/maps/ (--maps-dtype), pass 2 makes heatmaps from them with no image or model; "
                        "streaming = pass 1 embeds, pass 2 decodes and explains every image again; two-pass = "
                        "streaming with the paper's autograd computation in pass 2; embedding-map = one model "
                        "pass keeping every E map in the object store until the reduce (small runs); auto "
                        "(default) chooses from the model and the costs, and summary.json says why. Other "
                        "proxies: two-pass = autograd; anything else = the cheapest exact computation")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="the model's forward under autocast (default: bf16 on a GPU that supports it, else "
                        "fp32); the CAM arithmetic and every stored value stay float32 (README: what it costs)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every JPEG at full size: by default one at least twice the model input on both "
                        "sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (about 2x faster, pixels "
                        "within about 1/255, see BENCHMARKS.md); boxes, masks and sizes are always the full image's")
    p.add_argument("--image-root", help="folder or URI prefix for relative uris (default: the manifest's folder)")
    p.add_argument("--allowed-prefix", action="append", metavar="PREFIX",
                   help="read images only under --image-root and this folder or URI prefix (repeatable); "
                        "any other uri becomes an error row")
    p.add_argument("--confine-uris", action="store_true",
                   help="read images only under --image-root (and --allowed-prefix)")
    p.add_argument("--max-pixels", type=int, default=100_000_000,
                   help="refuse images above this many pixels, from the header, before decoding (default 100 MP)")
    p.add_argument("--max-bytes", type=int, default=256 << 20, help="refuse files above this size (default 256 MiB)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds per attempt at reading a remote image; 3 retries with backoff (default 30)")
    p.add_argument("--block-rows", type=int, help="manifest rows per unit of work and of resume (default: "
                   "from the manifest size, 1-8 batches)")
    p.add_argument("--image-size", type=int,
                   help="model input size S (images resized to SxS, no crop); default: the model's")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--num-gpus", type=int,
                   help="GPU actors, one model each (default: every GPU in the cluster; 0 = CPU)")
    p.add_argument("--top-k-channels", type=int, metavar="K",
                   help="also compute heatmaps from the K channels with the largest weights (paper: 50)")
    p.add_argument("--keep-maps", action="store_true",
                   help="also store each image's embedding map E in OUT/maps/ (d x h x w values per image), so "
                        "that `embcam reexplain` can explain the run again against other proxies or pairs, "
                        "with no model")
    p.add_argument("--maps-dtype", choices=["float16", "float32"], default="float16",
                   help="precision of the stored maps (default float16: half the bytes; heatmaps from them "
                        "then differ from the model's by float16 rounding, see BENCHMARKS.md)")
    p.add_argument("--pairs", metavar="PAIRS.parquet",
                   help="explain pairs of images (query_id, match_id: image_ids of the manifest): why the "
                        "model calls them similar. Only the images the pairs name are explained, each once; "
                        "OUT/pairs/ gets one row per pair (see `embcam make-pairs`)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model worker's backbone for --batch-size: start-up per worker "
                        "(19 s for a ResNet-50 on 2 CPU cores), then 1.07-1.4x the images/s on CPU "
                        "(BENCHMARKS.md); for long jobs")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what embcam wrote in --out before (results, proxies, summary, run state) "
                        "and start afresh; without it a re-run resumes the same run")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (Ray Data's bars on a terminal, else a line every few seconds)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own console output too (its INFO lines, "
                   "every warning)")


def explain_config(args: argparse.Namespace):
    from .job.pipeline import ExplainConfig

    return config_from(
        ExplainConfig, args, proxy="bank" if args.proxies else args.proxy,
        allowed_prefixes=(args.allowed_prefix or []) if args.confine_uris or args.allowed_prefix else None,
        address=args.address or os.environ.get("RAY_ADDRESS"))


def run_explain_command(args: argparse.Namespace) -> int:
    from .job.pipeline import run_explain

    cfg = explain_config(args)
    try:
        summary = run_explain(cfg, progress=not args.no_progress, verbose=args.verbose)
    except KeyboardInterrupt:
        from .job.lifecycle import resume_advice

        print(f"embcam explain: interrupted; {_progress_note(cfg.out)} {resume_advice(cfg.overwrite).capitalize()}.",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def _progress_note(out: str) -> str:
    from .data.runstate import RESULTS, RunFolder, covered

    run = RunFolder(out)
    saved = run.identity
    if saved is None:
        return "nothing was committed."
    return f"{covered(run.pieces(RESULTS), saved['rows'])} of {saved['rows']} rows are committed in {redact(out)}."


def format_summary(summary: dict) -> str:
    c, m = summary["counts"], summary["metrics"]

    def f(v):
        return "  n/a" if v is None else f"{v:.3f}"

    out = summary["config"]["out"]
    results = redact(join_location(out, "results"))
    k = summary["config"]["top_k_channels"]
    fit = summary.get("checkpoint")
    top = (lambda key: f"  {f(m[key + '_topk'])}") if k else (lambda key: "")
    lines = [
        f"embcam explain: {c['results']} rows ({c['ok']} ok, {c['error']} error, {c['degenerate']} degenerate) "
        f"in {summary['wall_seconds']:.1f} s = {summary['images_per_second']:.1f} images/s "
        f"[{summary['model']}, proxy {summary['config']['proxy']}, {summary['plan']} plan]"
        + (f"; {c['resumed']} rows carried over from an earlier attempt" if c.get("resumed") else ""),
        *([f"embcam explain: {CheckpointLoad.from_json(fit).warning()}"] if fit and fit.get("partial") else []),
        "",
        *(["                 uniform  EmbeddingCAM" + (f"  top-{k} channels" if k else ""),
           f"  ratio (box)     {f(m['uniform_bbox'])}  {f(m['ratio_bbox'])}      " + top("ratio_bbox"),
           f"  ratio (mask)    {f(m['uniform_mask'])}  {f(m['ratio_mask'])}      " + top("ratio_mask"),
           f"  loc. acc. @0.2           {f(m['loc_correct'])}   (IoU >= 0.5, mean IoU {f(m['iou'])})"]
          if m.get("uniform_bbox") is not None or m.get("uniform_mask") is not None else
          [f"  mean cosine to the proxy {f(m.get('cosine'))}"
           + (f" (lowest label: {redact(str(low['label']))}, {f(low['cosine'])})"
              if (low := m.get("lowest_label_cosine")) else "")
           + "; no boxes or masks, so no localisation figures"]),
        *([f"  {c['error']} error rows, e.g. {redact(m['error_example'])!r}; list them: python -c \"import pandas "
           f"as pd; d = pd.read_parquet('{results}'); print(d[d.status == 'error'][['image_id', 'error']])\""]
          if c["error"] and m.get("error_example") else []),
        "",
        *([f"pairs: {c['pairs']['rows']} ({c['pairs']['ok']} ok, {c['pairs']['error']} error) in "
           f"{redact(join_location(out, 'pairs'))}"] if c.get("pairs") else []),
        f"results: {results}   summary: {redact(join_location(out, 'summary.json'))}",
        f"open them: python -c \"import pandas as pd; print(pd.read_parquet('{results}'))\"",
    ]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from .datasets.synthetic import generate_dataset
    from .job.pipeline import ExplainConfig, run_explain

    out = Path(args.out)
    print(f"embcam demo: generating {len(DEMO_CLASSES)} unseen classes x {args.per_class} annotated images "
          f"in {out / 'data'} ...", flush=True)
    manifest = generate_dataset(out / "data", num_classes=100, images_per_class=args.per_class,
                                classes=DEMO_CLASSES, seed=0)
    print(f"explaining them with the bundled demo model ({DEMO_MODEL.name}) against class mean proxies "
          "on local Ray ...", flush=True)
    summary = run_explain(ExplainConfig(manifest=str(manifest), out=str(out / "run"), checkpoint=str(DEMO_MODEL),
                                        proxy="mean", batch_size=32, overwrite=True,
                                        address=os.environ.get("RAY_ADDRESS")),
                          progress=not args.no_progress, verbose=args.verbose)
    print(format_summary(summary))
    from .report import where, write_report

    print("writing the report (Table 1, overlays, the catalog pages) ...", flush=True)
    write_report([str(out / "run")], str(out / "report"))
    print(where(str(out / "report"), 1).replace("embcam report", "embcam demo"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``embcam`` command. Expected errors (bad arguments, specs, files: ValueError and
    OSError, embcam's own error classes among them) end in one line on stderr and exit
    status 2; anything else is a bug and keeps its traceback."""
    parser = OneLineParser(prog="embcam", description="EmbeddingCAM heatmaps for embedding networks, at catalog scale")
    parser.add_argument("--version", action="version", version=f"embcam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands: OneLineParser too

    explain = sub.add_parser("explain", help="run the explain job on a manifest")
    add_explain_arguments(explain)
    explain.set_defaults(run=run_explain_command)

    demo = sub.add_parser("demo", help="generate a small annotated dataset and explain it with the bundled model")
    demo.add_argument("--out", default="demo_out", help="where the demo data and results go (default demo_out)")
    demo.add_argument("--per-class", type=int, default=30, help="images per class (10 classes; default 30)")
    demo.add_argument("--no-progress", action="store_true", help="no progress display")
    demo.add_argument("--verbose", action="store_true", help="show Ray's own console output too")
    demo.set_defaults(run=run_demo)

    # listed for --help; they parse their own options (see DELEGATED below)
    sub.add_parser("report", help="catalog report (per label, outliers, histograms; Table 1 where annotated) "
                   "from one or more results folders", add_help=False)
    sub.add_parser("train", help="train an embedding model on a manifest", add_help=False)
    sub.add_parser("make-pairs", help="write a pairs file for explain --pairs: nearest neighbours within a run's "
                   "embeddings, or random same-label pairs", add_help=False)
    sub.add_parser("reexplain", help="new heatmaps and metrics from a run's stored E maps (--keep-maps): "
                   "another proxy bank, or pairs; no model, CPU only", add_help=False)
    sub.add_parser("chen-baseline", help="the Chen et al. (WACV 2020) baseline as a run folder, for Table 1",
                   add_help=False)
    sub.add_parser("sanity", help="model-randomisation and deletion checks of a run's heatmaps", add_help=False)

    make = sub.add_parser("make-manifest", help="write a manifest: synthetic | cub | folders")
    kinds = make.add_subparsers(dest="kind", required=True, metavar="KIND")
    synthetic = kinds.add_parser("synthetic", help="generate an annotated dataset (boxes, masks, train/eval "
                                 "splits) and its manifest, OUT_DIR/manifest.parquet")
    synthetic.add_argument("out_dir", metavar="OUT_DIR", help="folder for the images and the manifest")
    synthetic.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    synthetic.add_argument("--per-class", type=int, default=30, help="images per class (default 30)")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    cub = kinds.add_parser("cub", help="a manifest of CUB-200-2011: boxes, masks where segmentations/ is "
                           "found, classes 1-100 split train and 101-200 eval")
    cub.add_argument("root", metavar="CUB_200_2011", help="the dataset's folder (images.txt, images/, ...)")
    folders = kinds.add_parser("folders", help="a manifest of a folder-per-class catalog: each sub-folder of "
                               "ROOT is a label, every image below it a row")
    folders.add_argument("root", metavar="ROOT", help="the folder holding one folder per class")
    for maker in (cub, folders):
        maker.add_argument("--out", required=True, metavar="MANIFEST.parquet", help="the manifest to write")
    make.set_defaults(run=make_manifest)

    models = sub.add_parser("models", help="list the model specs: default target layer, input size, embedding width")
    models.add_argument("pattern", nargs="?", default="",
                        help="only specs containing this; timm:<name> shows that timm model's defaults")
    models.set_defaults(run=list_models)

    show = sub.add_parser("show", help="one image of a run: write its heatmap overlay, print its numbers")
    show.add_argument("run_dir", metavar="RUN", help="run folder (embcam explain --out)")
    show.add_argument("image_id", metavar="IMAGE_ID")
    show.add_argument("--out", help="image file to write (default: <image_id>.png here)")
    show.add_argument("--image-root", help="where the images are now, if not where the run read them")
    show.set_defaults(run=show_image)

    if argv is None:
        argv = sys.argv[1:]
    prog = f"embcam {argv[0]}" if argv and argv[0] in sub.choices else "embcam"
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(DELEGATED[argv[0]], argv[1:])
        args = parser.parse_args(argv)
        return args.run(args)
    except (ValueError, OSError) as exc:  # bad input: a clear message, not a traceback
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    rc = importlib.import_module(module).main(argv)
    return rc if isinstance(rc, int) else 0


def show_image(args: argparse.Namespace) -> int:
    from .data.schemas import OK
    from .results import describe, overlay, overlay_file_name, read_row, write_image

    row = read_row(args.run_dir, args.image_id, image_root=args.image_root)
    print(describe(row))
    if row["status"] == OK:
        out = args.out or overlay_file_name(args.image_id)
        write_image(out, overlay(row))
        print(f"overlay: {out}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    from .architectures import format_table
    from .models import load_checked

    print(format_table(args.pattern))
    demo = load_checked(None, DEMO_MODEL)
    print(f"the demo model ({DEMO_MODEL.name}, `embcam demo`): {demo.spec} at size {demo.preprocessing.size}, "
          "from its checkpoint")
    return 0


def make_manifest(args: argparse.Namespace) -> int:
    from . import datasets

    if args.kind == "synthetic":
        path = datasets.generate_dataset(args.out_dir, num_classes=args.classes,
                                         images_per_class=args.per_class, seed=args.seed)
        print(json.dumps({"manifest": str(path), **datasets.summary(path)}, indent=2, default=str))
        return 0
    maker = datasets.cub_manifest if args.kind == "cub" else datasets.folder_manifest
    print(maker(args.root, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
