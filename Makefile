# Two commands for a fresh machine (see README):
#   make demo   set up if needed, then train + evaluate a tiny BPT Mask R-CNN
#   make test   set up if needed, then run the whole test suite
#   make test-min-timm  the backbone/attention tests against the lowest timm
#               that bpt_mm declares (installed into a temporary directory)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-min-timm demo clean-data

setup:
	@VENV=$(abspath $(VENV)) bash tools/setup_env.sh

test: setup
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
