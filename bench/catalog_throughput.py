"""The real `embcam explain` end to end against a plain-inference loop, as a user would time it.

    .venv/bin/python bench/catalog_throughput.py --json bench/catalog_throughput.json

That is: ResNet-50+linear:128, ViT-B/16+linear:128 and ConvNeXt-T (identity head), built
without weights (nothing is downloaded), at their own 224 px input; self and mean proxies;
generated images of 200-300 px and of 700-900 px a side; 32 and 96 images a run; batch 16.
It runs 24 explain jobs; on 2 free CPU cores, about 20-25 minutes (an estimate from smoke
runs and the plain rates; about a third of it is the jobs' start-up, ~15-20 s each).
Smoke run: `--models embcam:small-resnet+linear:16 --image-size 48 --sides 48:64 --images 4 8
--batch-size 4 --classes 2`.

What is timed, for each model and image size:
- job: `python -m embcam.cli explain ... --no-progress` as a subprocess, from its start to
  its exit: Python and Ray start-up, the manifest check, the model load of the driver and
  of the worker, and every pass. Each run has its own local Ray, as a user's run has, with
  the default object store (see `--strategy` for why).
- plain: in this process, with every core: load the model (`embcam.models.load_model`, then
  `prepare_for_inference` as the job does, unless `--plain-model as-built`), then batch by
  batch read each file's bytes, decode (`decode_image_oriented`, EXIF orientation applied),
  `resize_square` to the model's input
  size, `preprocess` and `model(x)` under `torch.inference_mode()`. On CUDA the model and the
  batches are on the GPU, under autocast at `--plain-precision`. One untimed batch first, so
  both timed runs find torch warm (the job's runs are each a fresh process anyway). The job
  decodes large JPEGs at a reduced scale (`decode_resized`); a plain loop does not, so its
  decode costs more on the 700-900 px images; `--plain-decode reduced` gives the loop the
  job's decode, to tell that saving apart from the job's overhead.

Each is run at two sizes, n_small and n_large images (`--images`, default 32 96), and the
per-image time is the slope: per_image = (t_large - t_small) / (n_large - n_small); the fixed
cost (start-up; for the plain loop the model load) is fixed = t_small - n_small * per_image.
Images/s = 1 / per_image, so start-up does not hide in the rate. Reported: the job's and the
loop's images/s, their ratio (job / plain: 1.0 = the job costs nothing over inference), both
fixed costs, and for mean proxies mean/self = the mean run's per-image time over the self run's
(same model, same images). With `--repeats R` each time is the median of R runs.

The manifest is a catalog's: image_id, uri and label only (`--annotated` keeps the generated
boxes and masks, which the job then also decodes and scores). 8 classes, so mean proxies
have several images a class. Images are generated once per size range and reused.

`--strategy` (default `catalog`): the plan a mean-proxy run gets on a real catalog. The
job's `auto` keeps every image's E map in the object store while all of them fit a tenth of
it, and otherwise picks stored-maps or streaming from the model's costs. A catalog's maps
never fit (a million ResNet-50+linear:128 maps are 25 GB), but a bench run's always do: 96
of them are 2.4 MB, and the smallest object store Ray accepts, 75 MiB, has a tenth of
7.5 MiB, which holds 300 such maps (75 ViT-B/16 ones, 50 ConvNeXt-T ones). So a small store
cannot make `auto` plan as on a catalog at these run sizes, and a store that small would
also throttle the decoded-image blocks every run moves through it, which a catalog's machine
does not. `catalog` therefore keeps Ray's default store and asks the job's own rule
(`embcam.job.plans.choose_plan`, with the run's arguments parsed by the CLI's parser) what
`auto` picks for `--catalog-rows` images (default 1,000,000) and Ray's default store on this
machine (30% of its memory), and passes that plan as `--strategy` to the mean runs (self
runs get `auto`: one pass, nothing to choose). The JSON keeps that plan and its reason; each
run's summary.json plan is checked against it. `auto` and the job's other strategies are passed
to every run as they are, to compare plans; with `--object-store-mb M` each job's local Ray
gets a store of at most M MiB (M >= 75; Ray's RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES) and
`auto` decides against it.

`--extra-args="..."` goes verbatim to every explain run (e.g. "--precision bf16"); a
`--precision` there is also the plain loop's, unless `--plain-precision` is given (default:
fp32 on CPU, bf16 on CUDA). The JSON (`--json`) has the machine, the configuration, every
run's seconds and each job run's summary.json plan, plan_reason, counts and any cam,
precision, pass or device fields.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import embcam
from embcam.data.images import decode_image_oriented, decode_resized, resize_square
from embcam.datasets import generate_dataset
from embcam.inference import prepare_for_inference
from embcam.job.model_stage import PRECISIONS
from embcam.job.pipeline import JOB_STRATEGIES
from embcam.models import load_model

MODELS = ["torchvision:resnet50+linear:128", "torchvision:vit_b_16+linear:128", "torchvision:convnext_tiny+identity"]
CATALOG_COLUMNS = ["image_id", "uri", "label"]
PROXIES = ["self", "mean"]
RAY_STORE_SHARE = 0.3  # Ray's default object store: this share of the node's memory
SUMMARY_KEYS = re.compile(r"cam|precision|device|pass")  # summary.json fields reported when present


# --- data -----------------------------------------------------------------------------------


def make_manifests(folder: Path, sides: tuple[int, int], sizes: list[int], classes: int, seed: int,
                   annotated: bool) -> dict[int, Path]:
    """Generated images of ``sides`` px; one manifest per run size, each the first n rows of
    one order that takes a row of every class in turn (so each holds every class)."""
    per_class = -(-max(sizes) // classes)
    full = pq.read_table(generate_dataset(folder, num_classes=classes, images_per_class=per_class,
                                          min_side=sides[0], max_side=sides[1], seed=seed))
    if not annotated:
        full = full.select(CATALOG_COLUMNS)
    seen: dict[str, int] = {}
    index_in_class = []
    for label in full.column("label").to_pylist():
        index_in_class.append(seen.get(label, 0))
        seen[label] = index_in_class[-1] + 1
    order = sorted(range(full.num_rows), key=lambda i: (index_in_class[i], i))
    manifests = {}
    for n in sizes:
        manifests[n] = folder / f"manifest-{n}.parquet"
        pq.write_table(full.take(order[:n]), manifests[n])
    return manifests


# --- the plain loop -------------------------------------------------------------------------


def model_source(entry: str) -> tuple[str | None, str | None]:
    """(spec, checkpoint) of a --models entry: a spec, or checkpoint:<file>."""
    return (None, entry.split(":", 1)[1]) if entry.startswith("checkpoint:") else (entry, None)


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def decoded(data: bytes, size: int, decode: str) -> np.ndarray:
    if decode == "full":  # what a plain loop does
        return resize_square(decode_image_oriented(data)[0], size)
    return decode_resized(data, size)[0]  # what the job does: large JPEGs at 1/2-1/8 scale in the DCT domain


def plain_loop(entry: str, image_size: int | None, manifest: Path, batch_size: int, device: torch.device,
               precision: str, decode: str = "full", limit: int | None = None, prepared: bool = True
               ) -> tuple[float, float | None]:
    """Seconds to load the model and embed the manifest's images (the first ``limit``), and
    the steady seconds per image: after the first batch, as the job's steady rate is.
    ``prepared``: the model through ``prepare_for_inference`` (BatchNorm folded,
    channels_last), as the job runs it, so that the ratio is the job's overhead alone."""
    start = time.perf_counter()
    first = None  # (when, images) once the first batch is done
    spec, checkpoint = model_source(entry)
    model, preprocess, _ = load_model(spec, checkpoint, image_size)
    model = (prepare_for_inference(model) if prepared else model).to(device)
    uris = pq.read_table(manifest, columns=["uri"]).column("uri").to_pylist()[:limit]
    for i in range(0, len(uris), batch_size):
        pixels = np.stack([decoded((manifest.parent / uri).read_bytes(), preprocess.size, decode)
                           for uri in uris[i:i + batch_size]])
        with torch.inference_mode(), autocast(device, precision):
            y = model(preprocess(torch.from_numpy(pixels).to(device)))
        y.float().cpu()  # waits for the device
        first = first or (time.perf_counter(), len(pixels))
    end = time.perf_counter()
    steady = (end - first[0]) / (len(uris) - first[1]) if first and len(uris) > first[1] else None
    return end - start, steady


# --- the job --------------------------------------------------------------------------------


def _marked_pids(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _kill_marked(marker: str) -> None:
    """Every process the job started (its local Ray included) that outlived it."""
    for pid in _marked_pids(marker):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def job_argv(entry: str, manifest: Path, out: Path, proxy: str, strategy: str, args) -> list[str]:
    spec, checkpoint = model_source(entry)
    argv = [sys.executable, "-m", "embcam.cli", "explain", "--manifest", str(manifest), "--out", str(out),
            *(["--model", spec] if spec else ["--checkpoint", checkpoint]), "--proxy", proxy,
            "--strategy", strategy, "--batch-size", str(args.batch_size), "--no-progress"]
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    return argv + shlex.split(args.extra_args)


def catalog_plan(argv: list[str], rows: int, store_bytes: float) -> tuple[str, str]:
    """(plan, reason): what the job's ``auto`` picks for the run ``argv`` (``explain``'s
    arguments) on a catalog of ``rows`` images with an object store of ``store_bytes``, by the
    job's own rule."""
    from embcam.cli import add_explain_arguments, explain_config
    from embcam.job.pipeline import output_shape
    from embcam.job.plans import choose_plan

    parser = argparse.ArgumentParser()
    add_explain_arguments(parser)
    cfg = dataclasses.replace(explain_config(parser.parse_args(argv)), strategy="auto")
    net, preprocessing, _ = load_model(cfg.model, cfg.checkpoint, cfg.image_size)
    return choose_plan(cfg, rows, output_shape(net, cfg, preprocessing.size), preprocessing.size, store_bytes)


def job_strategy(entry: str, manifest: Path, proxy: str, args) -> dict:
    """The --strategy of this proxy's runs and, for `catalog`, the plan's reason."""
    if args.strategy != "catalog":
        return {"strategy": args.strategy}
    if proxy != "mean":
        return {"strategy": "auto"}
    argv = job_argv(entry, manifest, manifest.parent / "unused", proxy, "auto", args)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    store = (args.object_store_mb << 20) if args.object_store_mb else RAY_STORE_SHARE * memory
    plan, reason = catalog_plan(argv[argv.index("explain") + 1:], args.catalog_rows, store)
    return {"strategy": plan, "catalog_rows": args.catalog_rows, "catalog_plan_reason": reason}


def run_job(argv: list[str], out: Path, object_store_mb: int | None, timeout: float) -> dict:
    """Seconds of one `embcam explain` process, start to exit, and what its summary.json says."""
    marker = uuid.uuid4().hex
    ray_tmp = Path(f"/tmp/ecat-{marker[:8]}")  # short: Ray's socket paths must fit
    env = dict(os.environ, EMBCAM_BENCH_JOB=marker, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)  # its own local Ray, unless --address is in --extra-args
    if object_store_mb:
        env["RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"] = str(object_store_mb << 20)
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    finally:
        seconds = time.perf_counter() - start
        _kill_marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    kept = {k: summary[k] for k in ("plan", "plan_reason", "wall_seconds", "images_per_second", "counts")}
    kept.update({k: v for k, v in summary.items() if SUMMARY_KEYS.search(k)})
    return {"seconds": seconds, "summary": kept, "steady_per_image_s": steady_per_image(summary.get("passes", {}))}


def steady_per_image(passes: dict) -> float | None:
    """Seconds per image at the job's steady rates: the sum over its passes of 1 / rate (each
    pass's rate leaves out its start-up; embcam.job.progress)."""
    rates = [p.get("steady_images_per_second") for p in passes.values()]
    return sum(1 / r for r in rates) if rates and all(rates) else None


# --- figures --------------------------------------------------------------------------------


def fit(seconds: dict[int, list[float]]) -> dict:
    """Per-image time (the slope between the two run sizes) and fixed cost (the intercept)."""
    (n_small, t_small), (n_large, t_large) = sorted((n, statistics.median(t)) for n, t in seconds.items())
    per_image = (t_large - t_small) / (n_large - n_small)
    return {"seconds": {str(n): t for n, t in sorted(seconds.items())},
            "median_seconds": {str(n_small): t_small, str(n_large): t_large},
            "per_image_s": per_image, "fixed_s": t_small - n_small * per_image,
            "images_per_s": 1 / per_image if per_image > 0 else None}  # None: noise beat the slope


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def median(values: list) -> float | None:
    """The median, or None when any value is missing."""
    return statistics.median(values) if values and None not in values else None


def configuration(entry: str, sides: str, proxy: str, job: dict, plain: dict, self_job: dict | None) -> dict:
    plans = sorted({run["summary"]["plan"] for run in job["runs"]})
    return {"configuration": f"{short_name(entry)}, {sides} px, {proxy}", "model": entry, "sides": sides,
            "proxy": proxy, "strategy": job["strategy"], "plan": "/".join(plans), "job": job, "plain": plain,
            "ratio": ratio(job["images_per_s"], plain["images_per_s"]),
            "steady_ratio": ratio(plain["steady_per_image_s"], job["steady_per_image_s"]),
            "steady_mean_over_self": ratio(job["steady_per_image_s"], self_job and self_job["steady_per_image_s"]),
            "mean_over_self": (job["per_image_s"] / self_job["per_image_s"]
                               if self_job is not None and min(job["per_image_s"], self_job["per_image_s"]) > 0
                               else None)}


def short_name(entry: str) -> str:
    return Path(entry.split(":", 1)[1]).name if entry.startswith("checkpoint:") else entry.split(":", 1)[-1]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "embcam": embcam.__version__, "ray": importlib.metadata.version("ray"),
            "python": platform.python_version()}


def table(rows: list[dict]) -> str:
    def f(v, digits=2):
        return "n/a" if v is None else f"{v:.{digits}f}"

    def rate(per_image):
        return f(1 / per_image) if per_image else "n/a"

    lines = ["| configuration | plan | steady job img/s | steady plain img/s | **job/plain** | **mean/self** "
             "| slope job img/s | slope plain img/s | slope job/plain | slope mean/self | fixed s (job) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['configuration']} | {r['plan']} | {rate(r['job']['steady_per_image_s'])} | "
                     f"{rate(r['plain']['steady_per_image_s'])} | {f(r['steady_ratio'])} | "
                     f"{f(r['steady_mean_over_self'])} | {f(r['job']['images_per_s'])} | "
                     f"{f(r['plain']['images_per_s'])} | {f(r['ratio'])} | {f(r['mean_over_self'])} | "
                     f"{f(r['job']['fixed_s'], 1)} |")
    return "\n".join(lines)


# --- the bench ------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, help="specs, or checkpoint:<file> (its own spec)")
    p.add_argument("--proxies", nargs="+", default=PROXIES, choices=PROXIES)
    p.add_argument("--sides", nargs="+", default=["200:300", "700:900"], metavar="MIN:MAX",
                   help="generated image sizes, px a side (one dataset each)")
    p.add_argument("--images", nargs=2, type=int, default=[32, 96], metavar=("N_SMALL", "N_LARGE"))
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, help="model input size (default: the model's)")
    p.add_argument("--strategy", default="catalog", choices=["catalog", *JOB_STRATEGIES],
                   help="the job's --strategy; catalog (default): auto's plan for --catalog-rows images")
    p.add_argument("--catalog-rows", type=int, default=1_000_000)
    p.add_argument("--object-store-mb", type=int, help="each job's local Ray object store (default: Ray's)")
    p.add_argument("--extra-args", default="",
                   help="passed verbatim to every explain run: --extra-args='--precision bf16' (with '=' when "
                        "it is one word starting with --)")
    p.add_argument("--plain-precision", choices=sorted(PRECISIONS),
                   help="the plain loop's autocast (default: the job's --precision in --extra-args, else fp32 on "
                        "CPU, bf16 on CUDA)")
    p.add_argument("--plain-decode", choices=["full", "reduced"], default="full",
                   help="the plain loop's decode: full (decode_image_oriented + resize_square, default) or "
                        "reduced (decode_resized, the job's: large JPEGs decoded at a reduced scale)")
    p.add_argument("--plain-model", choices=["prepared", "as-built"], default="prepared",
                   help="the plain loop's model: prepared (prepare_for_inference: BatchNorm folded, channels_last, "
                        "as the job runs it; default, so that the ratio is the job's overhead) or as-built")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotated", action="store_true", help="keep the generated boxes and masks in the manifest")
    p.add_argument("--job-timeout", type=float, default=3600)
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (data, runs)")
    args = p.parse_args(argv)
    if not 0 < args.images[0] < args.images[1]:
        p.error("--images N_SMALL N_LARGE needs 0 < N_SMALL < N_LARGE")
    if args.object_store_mb is not None and args.object_store_mb < 75:
        p.error("--object-store-mb: Ray's smallest object store is 75 MiB")
    args.sides = [tuple(int(v) for v in s.split(":")) for s in args.sides]
    return args


def plain_precision(args, device: torch.device) -> str:
    if args.plain_precision:
        return args.plain_precision
    extra = shlex.split(args.extra_args)
    for i, arg in enumerate(extra):  # the job's --precision P or --precision=P, when the loop knows P
        value = extra[i + 1] if arg == "--precision" and i + 1 < len(extra) else arg.partition("=")[2]
        if arg.startswith("--precision") and value in PRECISIONS:
            return value
    return "bf16" if device.type == "cuda" else "fp32"


def bench_model(entry: str, sides: str, manifests: dict[int, Path], work: Path, args, device, precision,
                log) -> list[dict]:
    """The plain loop and every proxy's job runs of one model on one dataset."""
    sizes = sorted(manifests)
    prepared = args.plain_model == "prepared"
    plain_loop(entry, args.image_size, manifests[sizes[0]], args.batch_size, device, precision, args.plain_decode,
               limit=args.batch_size, prepared=prepared)  # warm-up, untimed
    plain = {n: [] for n in sizes}
    plain_steady = {n: [] for n in sizes}
    jobs = {proxy: dict(job_strategy(entry, manifests[sizes[-1]], proxy, args), runs=[],
                        seconds={n: [] for n in sizes})
            for proxy in PROXIES if proxy in args.proxies}  # self first: mean/self needs it
    for repeat in range(args.repeats):
        for n in sizes:
            seconds, steady = plain_loop(entry, args.image_size, manifests[n], args.batch_size, device, precision,
                                         args.plain_decode, prepared=prepared)
            plain[n].append(seconds)
            plain_steady[n].append(steady)
            log(f"plain {short_name(entry)} {sides} px, {n} images: {seconds:.1f} s")
        for proxy, job in jobs.items():
            for n in sizes:
                out = work / "runs" / re.sub(r"[^\w.-]", "_", f"{short_name(entry)}-{sides}-{proxy}-{n}-{repeat}")
                run = run_job(job_argv(entry, manifests[n], out, proxy, job["strategy"], args), out,
                              args.object_store_mb, args.job_timeout)
                job["runs"].append(dict(run, images=n, repeat=repeat))
                job["seconds"][n].append(run["seconds"])
                log(f"job {short_name(entry)} {sides} px, {proxy}, {n} images: {run['seconds']:.1f} s "
                    f"({run['summary']['plan']} plan)")
    plain_fit = dict(fit(plain), steady_per_image_s=median(plain_steady[sizes[-1]]), device=str(device),
                     precision=precision, decode=args.plain_decode, model=args.plain_model)
    rows, self_fit = [], None
    for proxy, job in jobs.items():
        check_runs(job["runs"], proxy, job["strategy"])
        steady = median([r["steady_per_image_s"] for r in job["runs"] if r["images"] == sizes[-1]])
        job_fit = dict(fit(job.pop("seconds")), **job, steady_per_image_s=steady)
        self_fit = job_fit if proxy == "self" else self_fit
        rows.append(configuration(entry, sides, proxy, job_fit, plain_fit, self_fit if proxy == "mean" else None))
    return rows


def check_runs(runs: list[dict], proxy: str, strategy: str) -> None:
    """Every row explained, and the plan the bench asked for ran."""
    for run in runs:
        s = run["summary"]
        if s["counts"]["ok"] != run["images"]:
            raise RuntimeError(f"{run['images']} images but {s['counts']['ok']} ok rows: {s['counts']}")
        expected = "one-pass" if proxy == "self" else None if strategy == "auto" else strategy
        if expected and s["plan"] != expected:
            raise RuntimeError(f"asked for the {expected} plan, the job ran {s['plan']}: {s['plan_reason']}")


def run(argv=None, log=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = plain_precision(args, device)
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="embcam-catalog-"))
    report = {"machine": machine(), "config": dict(vars(args), sides=[f"{a}:{b}" for a, b in args.sides],
                                                    plain_precision=precision, command=[sys.executable, *sys.argv]),
              "configurations": []}
    log(f"machine: {json.dumps(report['machine'])}; work folder {work}")
    try:
        (work / "runs").mkdir()
        for low, high in args.sides:
            sides = f"{low}-{high}"
            start = time.perf_counter()
            manifests = make_manifests(work / f"data-{sides}", (low, high), args.images, args.classes, args.seed,
                                       args.annotated)
            log(f"generated {max(args.images)} images of {sides} px in {time.perf_counter() - start:.1f} s")
            for entry in args.models:
                report["configurations"] += bench_model(entry, sides, manifests, work, args, device, precision, log)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}, ray {m['ray']}; "
          f"batch {args.batch_size}, {args.images[0]} and {args.images[1]} images a run, plain loop {precision} "
          f"on {device}\n")
    print(table(report["configurations"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run()
