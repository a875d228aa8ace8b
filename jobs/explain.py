"""Entry point for `ray job submit`: `embcam explain`, with the same options and the same
one-line errors for bad input.

    ray job submit --working-dir . -- python jobs/explain.py --manifest s3://b/m/ --out s3://b/run1
"""
import sys

from embcam.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
