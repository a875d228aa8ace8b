# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision are pinned here (not in pyproject) to the builds this project's
# machines install from local disk; pyproject keeps open ranges for clusters.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# the linters are pinned too: a new release may add findings to the same rules.
RUFF   ?= ruff==0.17.6
MYPY   ?= mypy==2.4.1

.PHONY: setup lint test test-fast wheel-check demo bench bench-scale clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]' $(RUFF) $(MYPY)
	touch $@

setup: $(VENV)/.installed

lint: setup  # ruff, and mypy on the core modules; both configured in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint  # everything, lint first (CI runs this); both cores (pytest-xdist), one module per worker
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

test-fast: setup  # the edit loop: the tests not marked slow (no Ray, no jobs, no subprocesses)
	$(PY) -m pytest -q -m "not slow"

wheel-check: setup  # build the wheel, install it in a fresh venv, explain 20 images with it (CI runs this)
	bash .ci/wheel_check.sh

demo: setup
	$(VENV)/bin/embcam demo --out demo_out

bench: setup  # the commands behind BENCHMARKS.md sections 3 and 4 (about 25 min on 2 cores)
	$(PY) bench/cam_throughput.py --repeats 5 --json bench/cam_throughput.json
	$(PY) bench/job_vs_loop.py --images 1000 --repeats 3 --memory-scale 10 --json bench/job_vs_loop.json
	$(PY) bench/job_vs_loop.py --images 5000 --repeats 2 --memory-scale 0 --json bench/job_vs_loop_5000.json

bench-scale: setup  # BENCHMARKS.md section 5 (about 25 min on 2 cores, 1 GB in /tmp/embcam-scale)
	$(PY) bench/scale.py --images 10000 100000 --queue bounded ray-default --strategy streaming --json bench/scale.json
	$(PY) bench/big_manifest.py --json bench/big_manifest.json
	$(PY) bench/stage_costs.py --manifest /tmp/embcam-scale/data/manifest-10000.parquet --images 2000 \
	    --models "checkpoint:embcam/assets/demo_model.pt@64" "torchvision:resnet50+linear:128@224" --json bench/stage_costs.json

clean:
	rm -rf $(VENV) .pytest_cache
