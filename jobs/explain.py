"""Entry point for `ray job submit`: the explain job with the same options as `embcam explain`.

    ray job submit --working-dir . -- python jobs/explain.py --manifest s3://b/m/ --out s3://b/run1
"""
import argparse
import sys

from embcam.cli import add_explain_arguments, run_explain_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="embcam explain job (see `embcam explain --help`)")
    add_explain_arguments(parser)
    sys.exit(run_explain_command(parser.parse_args()))
