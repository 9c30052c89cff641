# Two commands for a fresh machine (see README):
#   make demo   set up if needed, then train + evaluate a tiny BPT Mask R-CNN
#   make test   set up if needed, then the style checks and the whole test suite
#   make test-min-timm  the backbone/attention tests against the lowest timm
#               that bpt_mm declares (installed into a temporary directory)
# and, for a machine that already has an OpenMMLab environment:
#   make check-openmmlab-env BASE_PYTHON=/path/to/env/bin/python
#               set up a throw-away venv on top of it, check what it imports
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

BASE_PYTHON ?= $(PY)

.PHONY: setup lint test test-min-timm demo clean-data check-openmmlab-env

setup:
	@VENV=$(abspath $(VENV)) bash tools/setup_env.sh

# Style (ruff.toml): pycodestyle and pyflakes over the whole tree.
lint: setup
	@$(PY) -m ruff check --no-cache .

test: setup lint
	@$(PY) -m pytest tests --durations=15 $(PYTEST_ARGS)

# The lowest timm of requirements/runtime.txt (the one home of that bound;
# bpt_mm/compat.py must agree, tests/test_environment.py checks it), pip
# installed without dependencies into a temporary directory that goes first
# on PYTHONPATH, so the venv's own timm is shadowed and left as it is.
TIMM_MIN = $(shell sed -n 's/^timm>=\([0-9.]*\).*/\1/p' requirements/runtime.txt)

test-min-timm: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m pip install -q --no-deps --target "$$tmp" timm==$(TIMM_MIN) && \
	PYTHONPATH="$$tmp" $(PY) -c 'import timm; assert timm.__version__ == "$(TIMM_MIN)", timm.__file__; print("timm", timm.__version__, "from", timm.__file__)' && \
	PYTHONPATH="$$tmp" $(PY) -m pytest tests/test_vit.py tests/test_attention.py -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	@$(PY) tools/demo.py

clean-data:
	rm -rf data/tiny work_dirs/demo

# The "existing OpenMMLab environment" route of set-up (docs/gpu.md), run
# into a temporary venv that is removed afterwards; about 2 minutes.
check-openmmlab-env:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	PYTHON=$(abspath $(BASE_PYTHON)) VENV=$$tmp/venv BPT_MM_CACHE=$$tmp/cache bash tools/setup_env.sh && \
	(cd / && $$tmp/venv/bin/python -c 'import os, bpt_mm, mmcv, mmcv.ops; from mmcv.ops import RoIAlign, nms; print("[check] bpt_mm from", os.path.dirname(bpt_mm.__file__)); print("[check] mmcv", mmcv.__version__, "from", os.path.dirname(mmcv.__file__), "- ops compiled with CUDA:", mmcv.ops.get_compiling_cuda_version())') && \
	test -z "$$(ls $$tmp/cache 2>/dev/null)" && echo "[check] nothing compiled or cached: the environment's mmcv was used"
