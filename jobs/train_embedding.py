"""Train the reference embedding network on a manifest (Proxy-Anchor loss).

    python jobs/train_embedding.py --manifest /tmp/embcam-synth/manifest.parquet --out model.pt

Trains on the ``split == "train"`` rows, reports Recall@1 on the ``split == "eval"``
classes before and after training, saves an embcam checkpoint and prints a final
JSON line. All logic lives in :func:`embcam.training.train`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from embcam.training import DEFAULT_MODEL, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="Parquet manifest with label and split columns")
    parser.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size S (S x S, no crop); default 128 for embcam:small-resnet, "
                             "else the model's preprocessing size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-classes", type=int, default=8, help="classes per batch")
    parser.add_argument("--per-class", type=int, default=4, help="images per class in a batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="network learning rate (AdamW)")
    parser.add_argument("--proxy-lr-scale", type=float, default=100.0, help="proxy lr = lr x this")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--image-root", default=None, help="root of relative uris (default: the manifest's folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "jobs/train_embedding.py", *(sys.argv[1:] if argv is None else argv)])
    result = train(args.manifest, args.out, model=args.model, image_size=args.image_size, epochs=args.epochs,
                   batch_classes=args.batch_classes, per_class=args.per_class, lr=args.lr,
                   proxy_lr_scale=args.proxy_lr_scale, weight_decay=args.weight_decay, seed=args.seed,
                   device=args.device, image_root=args.image_root, command=command)
    print(json.dumps({key: result[key] for key in (
        "recall_at_1_before", "recall_at_1_after", "epochs", "seconds", "out", "model", "image_size", "seed",
        "device")}))
    return result


if __name__ == "__main__":
    main()
