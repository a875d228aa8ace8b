"""Throughput of EmbeddingCAM against plain inference, pytorch-grad-cam and Captum.

Every method sees the same seeded model and the same seeded random images. Each is
first called once untimed (the warm-up, whose outputs are checked against each other:
"agreement" in the report), then the methods run INTERLEAVED (a, b, c, ..., a, b, c, ...) so that machine
noise hits all of them alike; each figure is the median images/s over the repeats and
its ratio to (a), plain inference, measured in the same run.

    (a) plain             embeddings only, under torch.inference_mode (the floor)
    (a') plain_prepared   the same on the model as embcam runs it (below)
    (b) embcam_map        EmbeddingCAM, self proxy, strategy="embedding-map" (closed form)
    (b+) embcam_compiled  (b) with the backbone compiled (--compile in the job)
    (c) embcam_autograd   EmbeddingCAM, self proxy, strategy="autograd"
    (d) embcam_map_5      embedding-map, the 5 nearest of a bank of 20 proxies per image
    (e) gradcam           pytorch-grad-cam GradCAM, dot-product target y.p, one per image
    (f) captum            Captum LayerGradCam on a forward returning y.p per image
    (f') captum_prepared  the same on the model as embcam runs it
    mean-proxy workflow   embed all images, reduce to class proxies, explain each image
                          against its class proxy: embcam = one embedding-map pass;
                          each peer = an embedding pass + its explain pass.
    (g0) user_plain       the same weights in the model a user builds: torchvision's
                          ResNet with fc = nn.Linear(K, d), a plain nn.Module (not an
                          EmbeddingNet, not prepared); plain inference
    (g) user_embcam_map   EmbeddingCAM(that model, target_layer="layer4",
                          strategy="embedding-map")(x, "self"): the closed form, found by
                          tracing the model (embcam.tail)

embcam runs the model as its explain job does: ``prepare_for_inference`` (BatchNorm
folded into the convs, channels_last weights; on CPU at batch 1 channels_last is left
off, as it is slower there). The peers get the model as the user built it, as their
documentation shows; (a') and (f') show what the same preparation is worth without
EmbeddingCAM. The peers get their proxies (each image's own normalised embedding for (e)/(f))
precomputed outside the timed region, so (b) vs (e)/(f) is conservative for embcam.
Each tool returns what it returns by design: embcam and Captum raw (h, w) maps on the
device, pytorch-grad-cam min-max scaled NumPy maps upsampled to the input size.

    python bench/cam_throughput.py                      # ResNet-50, 224 px, batch 1/16/64
    python bench/cam_throughput.py --quick              # ResNet-18, 112 px, batch 1/8
    python bench/cam_throughput.py --device cuda --bf16 --json out.json
    python bench/cam_throughput.py --batch-sizes 16 --methods user_plain,user_embcam_map --no-compile
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from embcam import EmbeddingCAM, heatmaps_from_maps, normalise, prepare_for_inference  # noqa: E402
from embcam.models import build_model  # noqa: E402

METHODS = {
    "plain": "(a) plain inference",
    "plain_prepared": "(a') plain inference, prepared model",
    "embcam_map": "(b) embcam embedding-map, self",
    "embcam_compiled": "(b+) embcam embedding-map, compiled",
    "embcam_autograd": "(c) embcam autograd, self",
    "embcam_map_5": "(d) embcam embedding-map, 5 proxies",
    "gradcam": "(e) pytorch-grad-cam GradCAM",
    "captum": "(f) Captum LayerGradCam",
    "captum_prepared": "(f') Captum, prepared model",
    "mean_proxy_embcam": "mean-proxy workflow: embcam",
    "mean_proxy_gradcam": "mean-proxy workflow: grad-cam",
    "mean_proxy_captum": "mean-proxy workflow: Captum",
    "user_plain": "(g0) plain inference, user's model",
    "user_embcam_map": "(g) embcam embedding-map, user's model",
}
BANK_SIZE, PROXIES_PER_IMAGE, IMAGES_PER_CLASS = 20, 5, 4


class DotTarget:
    """pytorch-grad-cam target: the score y . p of one image's embedding output."""

    def __init__(self, proxy: torch.Tensor):
        self.proxy = proxy

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output * self.proxy).sum()


def class_mean_proxies(y: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """p_c = normalise(sum_j normalise(y_j)) over the images j of class c (the mean
    proxy; the 1/n of the mean drops out under the outer normalisation)."""
    sums = torch.zeros(num_classes, y.shape[1], dtype=torch.float32, device=y.device)
    return normalise(sums.index_add_(0, labels, normalise(y.float())))


def user_model(model, spec: str) -> torch.nn.Module:
    """The same weights in the model a user builds: torchvision's ResNet (the spec's
    architecture) with ``fc = nn.Linear(K, d)``, a plain nn.Module. Its modules are copies
    of the EmbeddingNet's (embcam:small-resnet, which has no max pool, in ResNet-18's class)."""
    import torchvision

    arch = spec.partition(":")[2].partition("+")[0] if spec.startswith("torchvision:") else "resnet18"
    net = getattr(torchvision.models, arch)(weights=None)
    parts = dict(model.backbone.named_children())
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        setattr(net, name, copy.deepcopy(parts.get(name, torch.nn.Identity())))
    net.fc = copy.deepcopy(model.head)
    return net.eval()


def build_methods(model, prepared, compiled, user, images: torch.Tensor, bank: torch.Tensor, bf16: bool) -> dict:
    """name -> a callable running that method once on ``images`` and returning its maps
    (``model`` as the user built it, ``prepared`` as embcam runs it, ``compiled`` the
    same with a compiled backbone, or None; ``user`` the same weights as a plain torchvision
    ResNet, see ``user_model``)."""
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM

    device = images.device
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    batch = images.shape[0]
    cam_map = EmbeddingCAM(prepared, strategy="embedding-map")
    cam_grad = EmbeddingCAM(prepared, strategy="autograd")
    cam_compiled = EmbeddingCAM(compiled, strategy="embedding-map") if compiled is not None else None
    cam_user = EmbeddingCAM(user, target_layer="layer4", strategy="embedding-map")
    if cam_user.path != "closed-form":
        raise RuntimeError(f"the user's model took the {cam_user.path} path, not the closed form")
    with torch.no_grad():  # not inference_mode: the peers' autograd must be able to use these
        self_proxies = normalise(model(images).float())  # peers' (e)/(f) proxies, untimed
    labels = torch.arange(batch, device=device) // IMAGES_PER_CLASS
    num_classes = int(labels.max()) + 1

    def embed(net=model):
        with torch.inference_mode(), autocast():
            return net(images)

    def embcam_5():
        with autocast():
            y, maps = cam_map.embedding_maps(images)
        nearest = (normalise(y.float()) @ bank.T).topk(PROXIES_PER_IMAGE, dim=1).indices
        return heatmaps_from_maps(maps, bank[nearest])  # (B, 5, h, w)

    def gradcam(proxies):
        with GradCAM(model=model, target_layers=[model.backbone.layer4]) as cam, autocast():
            return cam(input_tensor=images, targets=[DotTarget(p) for p in proxies])

    def captum_for(net):
        def dot_forward(x, proxies):
            return (net(x) * proxies).sum(-1)

        return LayerGradCam(dot_forward, net.backbone.layer4)

    captum_cams = {"user": captum_for(model), "prepared": captum_for(prepared)}

    def captum(proxies, net="user"):
        with autocast():
            return captum_cams[net].attribute(images, additional_forward_args=(proxies,), relu_attributions=True)

    def mean_proxy_embcam():
        with autocast():
            y, maps = cam_map.embedding_maps(images)
        proxies = class_mean_proxies(y, labels, num_classes)
        return heatmaps_from_maps(maps, proxies[labels])

    def mean_proxies_by_embedding_pass():
        return class_mean_proxies(embed(), labels, num_classes)[labels]

    def run_cam(cam):
        with autocast():
            return cam(images, "self").heatmaps

    methods = {
        "plain": embed,
        "plain_prepared": lambda: embed(prepared),
        "embcam_map": lambda: run_cam(cam_map),
        "embcam_compiled": lambda: run_cam(cam_compiled),
        "embcam_autograd": lambda: run_cam(cam_grad),
        "embcam_map_5": embcam_5,
        "gradcam": lambda: gradcam(self_proxies),
        "captum": lambda: captum(self_proxies),
        "captum_prepared": lambda: captum(self_proxies, "prepared"),
        "mean_proxy_embcam": mean_proxy_embcam,
        "mean_proxy_gradcam": lambda: gradcam(mean_proxies_by_embedding_pass()),
        "mean_proxy_captum": lambda: captum(mean_proxies_by_embedding_pass()),
        "user_plain": lambda: embed(user),
        "user_embcam_map": lambda: run_cam(cam_user),
    }
    if compiled is None:
        del methods["embcam_compiled"]
    return methods


def gradcam_scaling(heat: torch.Tensor, size: int) -> np.ndarray:
    """Raw (B, h, w) maps scaled as pytorch-grad-cam scales its output (min-max, cv2
    resize, min-max again), for the agreement check."""
    import cv2

    def minmax(a):
        a = a - a.min()
        return a / (1e-7 + a.max())

    return np.stack([minmax(cv2.resize(minmax(h), (size, size))) for h in heat.float().cpu().numpy()])


def agreement(outputs: dict, image_size: int) -> dict:
    """Max differences between methods that compute the same maps (self proxy):
    embcam autograd vs embedding-map, Captum vs embcam (raw, relative to the peak),
    grad-cam vs embcam scaled the way grad-cam scales (absolute, maps in [0, 1])."""
    ref = outputs["embcam_map"].float().cpu()
    scale = ref.abs().max().clamp_min(1e-30)
    rel = lambda other: float((other.detach().float().cpu() - ref).abs().max() / scale)  # noqa: E731
    out = {}
    if "embcam_compiled" in outputs:
        out["embcam_compiled_vs_map_rel"] = rel(outputs["embcam_compiled"])
    if "embcam_autograd" in outputs:
        out["embcam_autograd_vs_map_rel"] = rel(outputs["embcam_autograd"])
    if "captum" in outputs:
        out["captum_vs_embcam_rel"] = rel(outputs["captum"][:, 0])
    if "user_embcam_map" in outputs:
        out["user_model_vs_embcam_rel"] = rel(outputs["user_embcam_map"])
    if "gradcam" in outputs:
        out["gradcam_vs_embcam_abs"] = float(np.abs(outputs["gradcam"] - gradcam_scaling(ref, image_size)).max())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) for one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_batch(model, batch: int, args, device: torch.device, log) -> dict:
    """Warm-up, agreement check, then interleaved timed repeats for one batch size."""
    gen = torch.Generator().manual_seed(args.seed + batch)
    f32 = torch.float32  # explicit: callers (tests) may have changed the default dtype
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen, dtype=f32).to(device)
    bank = normalise(torch.randn(BANK_SIZE, model.head.out_features, generator=gen, dtype=f32)).to(device)
    channels_last = not (device.type == "cpu" and batch == 1)
    prepared = prepare_for_inference(model, channels_last=channels_last)
    compiled = (prepare_for_inference(model, channels_last=channels_last, compile_batch_size=batch)
                if args.compile else None)
    user = user_model(model, args.model).to(device)
    methods = build_methods(model, prepared, compiled, user, images, bank, args.bf16)
    methods = {name: fn for name, fn in methods.items() if name in args.methods}
    errors, outputs, first_call = {}, {}, {}
    for name, fn in list(methods.items()):  # first call: the check run, and any failure
        try:
            start = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            first_call[name] = time.perf_counter() - start
        except Exception as exc:  # a peer failing (e.g. NumPy on bf16) is a result, not a crash
            errors[name] = f"{type(exc).__name__}: {exc}"
            del methods[name]
            log(f"  {name} failed: {errors[name]}")
        model.zero_grad(set_to_none=True)  # grad-cam leaves parameter gradients behind
    checks = agreement(outputs, args.image_size) if "embcam_map" in outputs else {}
    del outputs
    for _ in range(args.warmup):
        for fn in methods.values():
            fn()
        model.zero_grad(set_to_none=True)
    seconds = {name: [] for name in methods}
    cpu_seconds = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, fn in methods.items():
            wall, cpu = time_once(fn, device)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
            model.zero_grad(set_to_none=True)  # outside the timed region
        log(f"  batch {batch} repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{n}={s[-1]:.2f}s" for n, s in seconds.items()))
    figures = {  # the median is the headline; the best repeat and CPU time help read a noisy box
        "images_per_s": {n: statistics.median(batch / t for t in ts) for n, ts in seconds.items()},
        "best_images_per_s": {n: batch / min(ts) for n, ts in seconds.items()},
        # images per CPU-second of this process (all threads); meaningless on cuda
        "images_per_cpu_s": {n: statistics.median(batch / max(t, 1e-9) for t in ts)
                             for n, ts in cpu_seconds.items()},
    }
    ratio_names = {"images_per_s": "ratio_to_plain", "best_images_per_s": "best_ratio_to_plain",
                   "images_per_cpu_s": "cpu_ratio_to_plain"}
    results = {}
    for name in methods:
        entry = {"label": METHODS[name], "seconds": seconds[name], "cpu_seconds": cpu_seconds[name]}
        for key, values in figures.items():
            floor = values.get("plain")
            entry[key] = values[name]
            entry[ratio_names[key]] = values[name] / floor if floor else None
        results[name] = entry
    return {"methods": results, "errors": errors, "agreement": checks,
            "compile_seconds": first_call.get("embcam_compiled")}


def _target(name: str, batch: int, res: dict, a: str, b: str, threshold: float) -> dict | None:
    """Target ``name``: the rate of method ``a`` over that of ``b`` at ``batch``, at least
    ``threshold``; None when a method was left out with --methods (a failed one is a miss)."""
    methods = res["methods"]
    if not {a, b} <= set(methods) | set(res["errors"]):
        return None
    ratio = {key: methods[a][key] / methods[b][key] if a in methods and b in methods else None
             for key in ("images_per_s", "best_images_per_s", "images_per_cpu_s")}
    value = ratio["images_per_s"]
    return {"target": name, "batch_size": batch, "value": value,
            "value_best": ratio["best_images_per_s"], "value_cpu": ratio["images_per_cpu_s"],
            "threshold": threshold, "met": value is not None and value >= threshold}


# (target, method a, method b, threshold on rate(a) / rate(b), judged only at batch >= 16)
TARGETS = [
    ("(b)/(a) >= 0.9", "embcam_map", "plain", 0.9, True),
    ("(b)/(a') >= 0.9 (same model)", "embcam_map", "plain_prepared", 0.9, True),
    ("(b)/(e) >= 3", "embcam_map", "gradcam", 3.0, False),
    ("(b)/(f) >= 1.4", "embcam_map", "captum", 1.4, False),
    ("(b+)/(f) >= 1.4 (compiled)", "embcam_compiled", "captum", 1.4, False),
    # "(d) costs <= 1.1x (b)": time(d) <= 1.1 time(b), i.e. ips(d)/ips(b) >= 1/1.1
    ("(d)/(b) >= 1/1.1", "embcam_map_5", "embcam_map", 1 / 1.1, False),
    ("mean-proxy embcam/grad-cam >= 1.8", "mean_proxy_embcam", "mean_proxy_gradcam", 1.8, False),
    ("mean-proxy embcam/Captum >= 1.8", "mean_proxy_embcam", "mean_proxy_captum", 1.8, False),
    ("(g)/(g0) >= 0.95 (user's model)", "user_embcam_map", "user_plain", 0.95, True),
]


def check_targets(per_batch: dict) -> list[dict]:
    """The project's throughput targets, judged on wall-clock medians ("value");
    "value_best" is the same ratio on the best repeats, "value_cpu" on CPU-time medians."""
    targets = [_target(name, batch, res, a, b, threshold) for batch, res in per_batch.items()
               for name, a, b, threshold, large_only in TARGETS if batch >= 16 or not large_only]
    return [t for t in targets if t is not None]


def format_table(report: dict) -> str:
    """Per batch size: median images/s (wall) and the ratio to (a) on the median, on
    the best repeat and on CPU time; then the targets and the agreement checks."""
    batches = list(report["results"])
    head = f"{'method':38s}" + "".join(f" | b={b:<3d}  img/s  x(a) best  cpu" for b in batches)
    lines = [head, "-" * len(head)]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for name, label in METHODS.items():
        if not any(name in r["methods"] or name in r["errors"] for r in report["results"].values()):
            continue  # left out with --methods
        row = f"{label:38s}"
        for b in batches:
            m = report["results"][b]["methods"].get(name)
            row += (f" | {m['images_per_s']:10.2f} {fmt(m['ratio_to_plain']):>5s} {fmt(m['best_ratio_to_plain']):>5s}"
                    f" {fmt(m['cpu_ratio_to_plain']):>4s}" if m else f" | {'failed':>27s}")
        lines.append(row)
    lines.append("")
    for t in report["targets"]:
        lines.append(f"{'MET ' if t['met'] else 'MISS'} b={t['batch_size']:<3d} {t['target']:34s} median "
                     f"{fmt(t['value']):>5s}  best {fmt(t['value_best']):>5s}  cpu {fmt(t['value_cpu']):>5s}")
    for b in batches:
        if report["results"][b].get("compile_seconds") is not None:
            lines.append(f"compile b={b}: first call of (b+) took {report['results'][b]['compile_seconds']:.1f} s "
                         "(untimed above)")
        if report["results"][b]["agreement"]:
            lines.append(f"agreement b={b}: " + ", ".join(
                f"{k}={v:.1e}" for k, v in report["results"][b]["agreement"].items()))
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec (default torchvision:resnet50+linear:128)")
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default 224)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16,64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="extra untimed rounds (default 0: the first call of every method, used for "
                             "the agreement check, is the warm-up)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip (b+), the compiled backbone (its compile is untimed, reported apart)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (cuda only)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: resnet18+linear:128, 112 px, batch 1,8 (explicit flags still win)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of the methods to run (default all): " + ", ".join(METHODS))
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    quick = ("torchvision:resnet18+linear:128", 112, "1,8")
    full = ("torchvision:resnet50+linear:128", 224, "1,16,64")
    model, size, batches = quick if args.quick else full
    args.model = args.model or model
    args.image_size = args.image_size or size
    args.batch_sizes = [int(b) for b in (args.batch_sizes or batches).split(",")]
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 autocast is for --device cuda only")
    args.methods = args.methods.split(",")
    if set(args.methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(args.methods) - set(METHODS))}; known: {', '.join(METHODS)}")
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error("need --repeats >= 1, --warmup >= 0 and batch sizes >= 1")
    return args


def run(argv=None, log=print) -> dict:
    """Run the benchmark; returns the report (also written to --json when given)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.model).float().eval().to(device)  # float32 whatever the default dtype
    if not hasattr(model, "backbone") or not hasattr(model.backbone, "layer4"):
        raise ValueError(f"{args.model}: the peers need a ResNet backbone with layer4")
    log(f"{args.model}, {args.image_size} px, {args.device}{' bf16' if args.bf16 else ''}, "
        f"{torch.get_num_threads()} threads, batches {args.batch_sizes}, "
        f"{args.warmup} warm-up + {args.repeats} repeats")
    per_batch = {}
    for batch in args.batch_sizes:
        per_batch[batch] = bench_batch(model, batch, args, device, log)
    report = {
        "config": {
            "model": args.model, "image_size": args.image_size, "batch_sizes": args.batch_sizes,
            "repeats": args.repeats, "warmup": args.warmup, "device": args.device, "bf16": args.bf16,
            "compile": args.compile,
            "threads": torch.get_num_threads(), "seed": args.seed, "command": " ".join(sys.argv),
            "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores".strip(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "versions": {p: _version(p) for p in ("torch", "torchvision", "grad-cam", "captum", "embcam")},
        },
        "results": per_batch,
        "targets": check_targets(per_batch),
    }
    log(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run()
