"""Train the reference embedding network on a manifest (Proxy-Anchor loss).

    python jobs/train_embedding.py --manifest /tmp/embcam-synth/manifest.parquet --out model.pt

Trains on the ``split == "train"`` rows, reports Recall@1 on the ``split == "eval"``
classes before and after training, saves an embcam checkpoint and prints a final
JSON line. All logic lives in :func:`embcam.training.train`.
"""
import sys

from embcam.training import main

if __name__ == "__main__":
    main(sys.argv[1:])
