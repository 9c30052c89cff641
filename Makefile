# Two commands for a fresh machine (see README):
#   make demo   set up if needed, then train + evaluate a tiny BPT Mask R-CNN
#   make test   set up if needed, then run the whole test suite
# and, for a machine that already has an OpenMMLab environment:
#   make check-openmmlab-env BASE_PYTHON=/path/to/env/bin/python
#               set up a throw-away venv on top of it, check what it imports
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

BASE_PYTHON ?= $(PY)

.PHONY: setup test demo clean-data check-openmmlab-env

setup:
	@VENV=$(abspath $(VENV)) bash tools/setup_env.sh

test: setup
	@$(PY) -m pytest tests --durations=15 $(PYTEST_ARGS)

demo: setup
	@$(PY) tools/demo.py

clean-data:
	rm -rf data/tiny work_dirs/demo

# The "existing OpenMMLab environment" route of set-up (README, "GPU"), run
# into a temporary venv that is removed afterwards; about 2 minutes.
check-openmmlab-env:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	PYTHON=$(abspath $(BASE_PYTHON)) VENV=$$tmp/venv BPT_MM_CACHE=$$tmp/cache bash tools/setup_env.sh && \
	(cd / && $$tmp/venv/bin/python -c 'import os, bpt_mm, mmcv, mmcv.ops; from mmcv.ops import RoIAlign, nms; print("[check] bpt_mm from", os.path.dirname(bpt_mm.__file__)); print("[check] mmcv", mmcv.__version__, "from", os.path.dirname(mmcv.__file__), "- ops compiled with CUDA:", mmcv.ops.get_compiling_cuda_version())') && \
	test -z "$$(ls $$tmp/cache 2>/dev/null)" && echo "[check] nothing compiled or cached: the environment's mmcv was used"
