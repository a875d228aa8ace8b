"""Entry point for `ray job submit`: `embcam train`, with the same options and the same
one-line errors for bad input.

    python jobs/train_embedding.py --manifest /tmp/embcam-synth/manifest.parquet --out model.pt

Trains on the ``split == "train"`` rows, reports Recall@1 on the ``split == "eval"``
classes before and after training, saves an embcam checkpoint and prints a final JSON
line. All logic lives in :func:`embcam.training.train`.
"""
import sys

from embcam.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
