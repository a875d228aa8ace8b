#!/usr/bin/env bash
# The package as a user installs it: build the wheel from this tree, install it into a fresh
# venv outside the repository, and run a tiny explain job (the bundled demo model on 20
# generated images) from a temporary folder; then check its summary. About 30 s.
#
# Offline: the wheel is built with the project venv's setuptools (--no-build-isolation) and
# installed with --no-deps; the new venv finds the dependencies (torch, ray, ...) through a
# .pth file naming the project venv's site-packages. That file is written after the install,
# so that pip never sees (and never touches) the project's own editable embcam.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

mkdir "$WORK/src" "$WORK/run"   # build from a copy: nothing (build/, *.egg-info) lands in the tree
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/embcam" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"

"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$PY" -m pip --python "$VPY" install -q --no-deps "$WORK"/dist/embcam-*.whl
"$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
    > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/embcam-deps.pth"

cd "$WORK/run"
env -u RAY_ADDRESS -u PYTHONPATH RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled \
    "$WORK/venv/bin/embcam" demo --out demo --per-class 2 --no-progress
env -u PYTHONPATH "$VPY" - "$REPO" <<'PY'
import importlib.metadata, json, os, subprocess, sys
import embcam
from embcam.cli import DEMO_MODEL
from embcam.data.schemas import load_schema

repo = os.path.realpath(sys.argv[1])
for path in (embcam.__file__, str(DEMO_MODEL)):
    assert os.path.realpath(path).startswith(os.path.realpath(sys.prefix) + os.sep), f"{path} is not in the new venv"
    assert not os.path.realpath(path).startswith(repo + os.sep), f"{path} comes from the repository"
assert {c["name"] for c in load_schema("results")["columns"]} >= {"image_id", "heatmap"}
said = subprocess.run([os.path.join(sys.prefix, "bin", "embcam"), "--version"], capture_output=True, text=True,
                      check=True).stdout
assert said == f"embcam {embcam.__version__}\n" == f"embcam {importlib.metadata.version('embcam')}\n", said
summary = json.load(open("demo/run/summary.json"))
counts = summary["counts"]
assert counts["results"] == counts["ok"] == 20 and counts["error"] == 0, counts
assert os.path.exists("demo/run/_SUCCESS") and summary["plan"] in ("embedding-map", "streaming"), summary["plan"]
print(f"wheel check: ok (embcam {embcam.__version__}, {embcam.__file__}; {counts['ok']} rows explained, "
      f"{summary['plan']} plan)")
PY
