"""How fast EmbeddingCAM's general ("vjp") embedding-map path is, and what was tried.

The vjp path needs M = mean_ij (dy/dA_.ij)^T: d vector-Jacobian products per image. The
model: torchvision ResNet-50 with ``fc = nn.Linear(2048, 128)`` (a plain nn.Module),
explained at ``layer4.1`` (a block inside the last stage, so the tail does not factor
through a pool and neither closed form applies). Methods, run INTERLEAVED after one
untimed call each (whose maps are checked against each other, and whose calls of the
convolution backward are counted by the profiler):

    plain                   plain inference (inference_mode): the floor
    func_chunk_<n>          EmbeddingCAM as shipped: torch.func.vjp + vmap over chunks of
                            cotangents, chunk_elements = n
    grads_batched_<n>       the previous implementation, kept here only for the comparison:
                            torch.autograd.grad(..., is_grads_batched=True) per chunk

    python bench/vjp_variants.py --batch-size 8 --repeats 3 --json bench/vjp_variants.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from embcam import EmbeddingCAM  # noqa: E402


def grads_batched_maps(cam: EmbeddingCAM, images: torch.Tensor) -> torch.Tensor:
    """E by the previous implementation: a leaf at the target, then batched VJPs with
    autograd's is_grads_batched (which runs the convolution backward once per cotangent)."""
    with cam.target_graph(images) as (activation, y):
        batch, d = y.shape
        chunk = max(1, min(d, cam.chunk_elements // activation.numel()))
        eye = torch.eye(d, dtype=y.dtype)
        parts = []
        for start in range(0, d, chunk):
            units = eye[start:start + chunk]
            (grads,) = torch.autograd.grad(y, activation, units[:, None, :].expand(-1, batch, -1),
                                           retain_graph=True, is_grads_batched=True)
            parts.append(grads.mean((-2, -1)))
        m = torch.cat(parts).permute(1, 2, 0)
    return torch.einsum("bkhw,bkd->bdhw", activation.detach(), m)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--target", default="layer4.1")
    parser.add_argument("--chunks", default="4194304,33554432,134217728",
                        help="chunk_elements values to compare (default 2^22, 2^25 = the default, 2^27)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Linear(2048, 128)
    model.eval()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    chunks = [int(c) for c in args.chunks.split(",")]
    cams = {c: EmbeddingCAM(model, args.target, "embedding-map", chunk_elements=c) for c in chunks}
    assert all(cam.path == "vjp" for cam in cams.values())

    def plain():
        with torch.inference_mode():
            return model(images)

    methods = {"plain": plain}
    for c in chunks:
        methods[f"func_chunk_{c}"] = lambda cam=cams[c]: cam.embedding_maps(images)[1]
        methods[f"grads_batched_{c}"] = lambda cam=cams[c]: grads_batched_maps(cam, images)
    first, conv_backward_calls = {}, {}
    for name, fn in methods.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            first[name] = fn()
        conv_backward_calls[name] = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward")
    ref = first[f"func_chunk_{chunks[0]}"]
    agreement = {name: float((out - ref).abs().max() / ref.abs().max())
                 for name, out in first.items() if name != "plain"}
    seconds = {name: [] for name in methods}
    cpu_seconds = {name: [] for name in methods}  # this process, all threads: steadier on a shared machine
    for r in range(args.repeats):
        for name, fn in methods.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu)
        print(f"repeat {r + 1}: " + ", ".join(f"{n}={s[-1]:.2f}s" for n, s in seconds.items()), flush=True)
    floor, cpu_floor = statistics.median(seconds["plain"]), statistics.median(cpu_seconds["plain"])
    report = {
        "config": vars(args) | {"command": " ".join(sys.argv), "model": "torchvision resnet50, fc=Linear(2048, 128)"},
        "seconds": seconds,
        "median_seconds": {n: statistics.median(s) for n, s in seconds.items()},
        "ratio_to_plain": {n: floor / statistics.median(s) for n, s in seconds.items()},
        "cpu_seconds": cpu_seconds,
        "cpu_ratio_to_plain": {n: cpu_floor / statistics.median(s) for n, s in cpu_seconds.items()},
        "conv_backward_calls": conv_backward_calls,
        "agreement_rel": agreement,
    }
    for name in methods:
        print(f"{name:28s} median {report['median_seconds'][name]:7.2f} s   x plain "
              f"{report['ratio_to_plain'][name]:.3f}   cpu x plain {report['cpu_ratio_to_plain'][name]:.3f}   "
              f"conv backward calls {conv_backward_calls[name]}")
    print("agreement (max rel. difference to func_chunk_%d): %s" % (chunks[0], agreement))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
