"""The two exact CAM strategies against plain inference, on any registered model.

    .venv/bin/python bench/strategy_cost.py --model torchvision:vit_b_16+linear:128 --batch-size 4 --repeats 2
    .venv/bin/python bench/strategy_cost.py --model torchvision:convnext_tiny+identity --batch-size 16 --repeats 3

On the model through `prepare_for_inference` (as the job runs it), the same seeded random
batch, self proxy, all cores: plain inference (`torch.inference_mode`), the embedding-map
strategy and the autograd strategy, in interleaved rounds after one untimed call each.
Prints the embedding-map path and, per method, the median seconds per batch and its
ratio to plain (images/s of the method over plain's); checks the two strategies' maps agree.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from embcam import EmbeddingCAM, load_model, prepare_for_inference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, preprocess, _ = load_model(args.model)
    model = prepare_for_inference(model)
    x = torch.randn(args.batch_size, 3, preprocess.size, preprocess.size)
    cams = {name: EmbeddingCAM(model, strategy=name) for name in ("embedding-map", "autograd")}

    def plain():
        with torch.inference_mode():
            return model(x)

    methods = {"plain": plain, **{name: (lambda cam=cam: cam(x, "self")) for name, cam in cams.items()}}
    first = {name: fn() for name, fn in methods.items()}  # untimed
    ref = first["autograd"].heatmaps
    agree = float((first["embedding-map"].heatmaps - ref).abs().max() / ref.abs().max())
    seconds = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    report = {"model": args.model, "batch_size": args.batch_size, "path": cams["embedding-map"].path,
              "threads": torch.get_num_threads(), "max_rel_diff_of_maps": agree, "seconds": seconds,
              "median_seconds": median, "x_plain": {n: median["plain"] / s for n, s in median.items()}}
    print(f"{args.model}, batch {args.batch_size}, path {report['path']}, maps agree to {agree:.1e}")
    for name, s in median.items():
        print(f"  {name:14s} {s:8.2f} s per batch  {report['x_plain'][name]:.3f}x plain")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
