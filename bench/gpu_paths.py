"""EmbeddingCAM's paths on a GPU: exactness against a float64 CPU reference, and speed
against plain inference of the same model, for the models users bring.

Models (random weights, as users build them, not embcam's EmbeddingNet):
  resnet50-fc128   torchvision ResNet-50, fc = Linear(2048, 128), target layer4 -> closed-form
  convnext_tiny    torchvision ConvNeXt-T, classifier[2] = Linear(768, 128)      -> pooled-jacobian
  swin_t           torchvision Swin-T, head = Linear(768, 128), target norm (nhwc) -> closed-form
  vit_b_16         torchvision ViT-B/16, heads = Linear(768, 128), target
                   encoder.layers.encoder_layer_11.ln_1 (tokens)                  -> vjp

Exactness: embedding-map and autograd heatmaps for 2 images, float32 on the device, against
the autograd path in float64 on the CPU (relative to the reference's peak).
Speed: images/s of EmbeddingCAM(strategy="embedding-map")(x, "self") and of plain inference
(torch.inference_mode), interleaved, median of --repeats, and their ratio; float32, and
bf16 autocast for the forward with --bf16.

    python bench/gpu_paths.py --batch-sizes 16,64 --repeats 10 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torchvision
from torch import nn

from embcam import EmbeddingCAM

CASES = {
    "resnet50-fc128": ("layer4", None),
    "convnext_tiny": ("features", None),
    "swin_t": ("norm", "nhwc"),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", "tokens"),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet50-fc128":
        m = torchvision.models.resnet50()
        m.fc = nn.Linear(2048, 128)
    elif name == "convnext_tiny":
        m = torchvision.models.convnext_tiny()
        m.classifier[2] = nn.Linear(768, 128)
    elif name == "swin_t":
        m = torchvision.models.swin_t()
        m.head = nn.Linear(768, 128)
    else:
        m = torchvision.models.vit_b_16()
        m.heads = nn.Linear(768, 128)
    for mod in m.modules():  # running statistics away from (0, 1), so eval BatchNorm is not the identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def exactness(name: str, device: str) -> dict:
    target, reshape = CASES[name]
    model = build(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ref_model = copy.deepcopy(model).double()
    ref = EmbeddingCAM(ref_model, target, "autograd", reshape=reshape)(x.double(), "self").heatmaps
    out = {}
    model = model.to(device)
    for strategy in ("embedding-map", "autograd"):
        cam = EmbeddingCAM(model, target, strategy, reshape=reshape)
        heat = cam(x.to(device), "self").heatmaps.double().cpu()
        out[strategy] = {"path": cam.path,
                         "rel_err": float((heat - ref).abs().max() / ref.abs().max().clamp_min(1e-30))}
    return out


def speed(name: str, device: str, batch: int, repeats: int, bf16: bool) -> dict:
    target, reshape = CASES[name]
    model = build(name).to(device)
    cam = EmbeddingCAM(model, target, "embedding-map", reshape=reshape)
    x = torch.randn(batch, 3, 224, 224, device=device)
    amp = torch.autocast(device, torch.bfloat16) if bf16 else nullcontext()

    def plain():
        with torch.inference_mode(), amp:
            return model(x)

    def explain():
        with amp:
            return cam(x, "self").heatmaps

    def timed(fn) -> float:
        torch.cuda.synchronize() if device == "cuda" else None
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize() if device == "cuda" else None
        return batch / (time.perf_counter() - t)

    for _ in range(3):  # warm-up (cuDNN autotune, allocator)
        plain(), explain()
    rates = {"plain": [], "embcam": []}
    for _ in range(repeats):
        rates["plain"].append(timed(plain))
        rates["embcam"].append(timed(explain))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"batch": batch, "path": cam.path, "plain_img_s": med["plain"], "embcam_img_s": med["embcam"],
            "ratio": med["embcam"] / med["plain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "torchvision": torchvision.__version__, "bf16": args.bf16, "models": {}}
    for name in args.models.split(","):
        entry = {"exactness": exactness(name, args.device), "speed": []}
        for b in map(int, args.batch_sizes.split(",")):
            entry["speed"].append(speed(name, args.device, b, args.repeats, args.bf16))
        report["models"][name] = entry
        ex = entry["exactness"]
        print(f"{name:16s} exact: " + ", ".join(f"{s} ({v['path']}) {v['rel_err']:.1e}" for s, v in ex.items()))
        for s in entry["speed"]:
            print(f"{'':16s} batch {s['batch']:4d}: plain {s['plain_img_s']:8.1f} img/s, embcam "
                  f"{s['embcam_img_s']:8.1f} img/s, ratio {s['ratio']:.3f} ({s['path']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
