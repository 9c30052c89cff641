#!/usr/bin/env bash
# One idempotent set-up step for bpt_mm, called by `make demo` and `make test`.
#
# Creates .venv in the clone, installs torch, mmcv 2.1.0 with its C++ ops
# (compiled once and cached outside the clone: CPU ops on a machine without a
# GPU, CUDA ops for the local GPUs' arch where torch sees one; the choice is
# tools/mmcv_build_plan.py's), the rest of requirements/, and bpt_mm itself in
# editable mode. A second run only checks.
#
# Environment:
#   PYTHON          interpreter to build the venv from (default: python3)
#   VENV            where the venv goes (default: .venv in the clone)
#   BPT_MM_CACHE    cache folder for the built mmcv wheel (default: ~/.cache/bpt_mm)
#   MAX_JOBS        parallel compile jobs for mmcv (default: number of cores)
#   CXX             C++ compiler for mmcv (default: c++)
#   BPT_MM_MMCV_OPS auto (default: CUDA ops where torch sees a GPU, else CPU),
#                   cpu (CPU ops even on a GPU machine) or cuda
#   TORCH_CUDA_ARCH_LIST  archs of a CUDA build (default: the local GPUs')
#   CUDA_HOME       the CUDA toolkit whose nvcc compiles mmcv's CUDA ops
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
CACHE="${BPT_MM_CACHE:-$HOME/.cache/bpt_mm}"
MMCV_VERSION="2.1.0"
TORCH_VERSION="$(sed -n 's/^torch==//p' requirements/torch.txt)"
STAMP="$VENV/.bpt_mm_setup"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# What the stamp certifies: the inputs of this set-up. Any change re-runs it.
inputs_digest() {
    cat requirements/*.txt setup.py tools/setup_env.sh tools/mmcv_build_plan.py tools/venv_on_top.py | sha256sum | cut -d' ' -f1
}

# The environment is usable when the stack imports and mmcv's compiled ops load.
env_works() {
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import mmcv, mmcv.ops
from mmcv.ops import RoIAlign, nms
import mmdet, mmseg, mmengine, timm, torch
import bpt_mm
EOF
}

# ---- fast path: a finished set-up with the same inputs that still works ----
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(inputs_digest)" ]]; then
    if env_works; then
        say "environment in $VENV is up to date"
        "$VENV/bin/python" tools/mmcv_build_plan.py --check-installed --ops "${BPT_MM_MMCV_OPS:-auto}" >&2 || true
        exit 0
    fi
    say "environment in $VENV has the right stamp but does not import; repairing"
fi
# From here on the stamp is invalid until the end: an interrupted set-up is redone.
rm -f "$STAMP"

# ---- interpreter ----
# Checked here, before anything is installed; tools/mmcv_build_plan.py acts on it.
case "${BPT_MM_MMCV_OPS:-auto}" in
    auto|cpu|cuda) ;;
    *) die "BPT_MM_MMCV_OPS must be auto, cpu or cuda, got '${BPT_MM_MMCV_OPS}'" ;;
esac
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' on PATH; set PYTHON=/path/to/python3.11"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYVER" in
    3.10|3.11|3.12) ;;
    *) die "Python $PYVER is not supported: bpt_mm needs Python 3.10, 3.11 or 3.12 (torch $TORCH_VERSION, mmcv $MMCV_VERSION). Set PYTHON=/path/to/python3.11" ;;
esac
PYTAG="cp${PYVER/./}"

# Does the base interpreter already carry a working mmcv with ops in range?
base_has_mmcv() {
    "$PYTHON" - <<'EOF' >/dev/null 2>&1
import mmcv, mmcv.ops
from mmcv.ops import RoIAlign, nms
from packaging.version import Version
v = Version(mmcv.__version__)
assert Version('2.0.0') <= v < Version('2.2.0')
EOF
}

CXX="${CXX:-c++}"
# The CPU-ops cache key; a CUDA build adds its CUDA version and archs to it.
BASE_KEY="mmcv-${MMCV_VERSION}_torch-${TORCH_VERSION}_${PYTAG}_$(uname -m)"
WHEEL_DIR="$CACHE/wheels/$BASE_KEY"
# Any wheel for this mmcv/torch/Python (CPU or CUDA ops): which one fits is
# decided once torch is installed (tools/mmcv_build_plan.py).
cached_wheel() { ls "$CACHE/wheels/$BASE_KEY"*/mmcv-${MMCV_VERSION}-*.whl 2>/dev/null | head -n 1 || true; }
venv_has_mmcv() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import mmcv, mmcv.ops
from mmcv.ops import RoIAlign, nms
from packaging.version import Version
v = Version(mmcv.__version__)
assert Version('2.0.0') <= v < Version('2.2.0')
EOF
}
BASE_HAS_MMCV=0
base_has_mmcv && BASE_HAS_MMCV=1
# Fail before installing anything if mmcv will have to be compiled without a compiler.
if [[ $BASE_HAS_MMCV == 0 && -z "$(cached_wheel)" ]] && ! venv_has_mmcv; then
    command -v "$CXX" >/dev/null 2>&1 \
        || die "no C++ compiler '$CXX' found: mmcv $MMCV_VERSION must be compiled on this machine. Install one (e.g. 'apt-get install -y g++') or set CXX"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ $BASE_HAS_MMCV == 1 ]]; then
        say "$PYTHON already has a working mmcv with ops: creating $VENV on top of it (--system-site-packages)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
        # When $PYTHON is itself a venv's, --system-site-packages alone would
        # lose that venv's packages (mmcv): a .pth adds them.
        VENV_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$PYTHON" tools/venv_on_top.py "$VENV_SITE" || die "could not make $VENV see the packages of $PYTHON"
    else
        say "creating virtual environment $VENV (Python $PYVER)"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

# ---- torch and build tools ----
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" >/dev/null 2>&1; then
    say "installing torch $TORCH_VERSION and torchvision (about 5 GB, a few minutes)"
    "${PIP[@]}" -q -r requirements/torch.txt
fi
"${PIP[@]}" -q -r requirements/build.txt

# ---- mmcv with ops ----
WHEEL=""
if venv_has_mmcv; then
    say "mmcv with compiled ops is present"
else
    JOBS="${MAX_JOBS:-$(nproc)}"
    # CPU or CUDA ops, cached or compiled, or stop before compiling.
    PLAN="$("$PY" tools/mmcv_build_plan.py --base-key "$BASE_KEY" --cache-dir "$CACHE/wheels" \
            --ops "${BPT_MM_MMCV_OPS:-auto}" --jobs "$JOBS")" \
        || die "mmcv $MMCV_VERSION cannot be built as things stand (reason above); nothing was compiled"
    eval "$PLAN"
    WHEEL_DIR="$CACHE/wheels/$PLAN_KEY"
    WHEEL=""
    if [[ "$PLAN_ACTION" == use-cache ]]; then
        WHEEL="$(ls "$WHEEL_DIR"/mmcv-${MMCV_VERSION}-*.whl 2>/dev/null | head -n 1 || true)"
        [[ -n "$WHEEL" ]] || die "the wheel cache $WHEEL_DIR was emptied while set-up ran; run again"
    fi
    if [[ -z "$WHEEL" ]]; then
        say "no cached mmcv wheel in $WHEEL_DIR"
        say "$PLAN_MESSAGE"
        BUILD="$(mktemp -d "${TMPDIR:-/tmp}/bpt_mm_mmcv.XXXXXX")"
        trap 'rm -rf "$BUILD"' EXIT
        "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD" \
            || die "could not download the mmcv $MMCV_VERSION sdist"
        tar -xzf "$BUILD"/mmcv-${MMCV_VERSION}.tar.gz -C "$BUILD"
        SRC="$BUILD/mmcv-$MMCV_VERSION"
        # torch>=2.10 headers refuse anything older than C++20.
        sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
        grep -q 'c++20' "$SRC/setup.py" || die "could not switch mmcv's setup.py to C++20 (its layout changed?)"
        mkdir -p "$BUILD/out"
        if ! (cd "$SRC" \
                && if [[ "$PLAN_CUDA_VISIBLE_DEVICES" != keep ]]; then export CUDA_VISIBLE_DEVICES="$PLAN_CUDA_VISIBLE_DEVICES"; fi \
                && if [[ -n "$PLAN_ARCH_LIST" ]]; then export TORCH_CUDA_ARCH_LIST="$PLAN_ARCH_LIST"; fi \
                && CXX="$CXX" MMCV_WITH_OPS=1 FORCE_CUDA="$PLAN_FORCE_CUDA" MAX_JOBS="$JOBS" \
                "$PY" -m pip wheel --disable-pip-version-check --no-deps --no-build-isolation . -w "$BUILD/out" \
                > "$BUILD/build.log" 2>&1); then
            tail -n 40 "$BUILD/build.log" >&2
            cp "$BUILD/build.log" "$ROOT/mmcv-build.log" 2>/dev/null || true
            die "compiling mmcv $MMCV_VERSION failed (last lines above, full log in mmcv-build.log); nothing was cached"
        fi
        BUILT="$(ls "$BUILD"/out/mmcv-*.whl)"
        # Move into the cache atomically so a killed build never leaves a wheel that looks complete.
        mkdir -p "$WHEEL_DIR"
        cp "$BUILT" "$WHEEL_DIR/.partial.whl"
        mv "$WHEEL_DIR/.partial.whl" "$WHEEL_DIR/$(basename "$BUILT")"
        WHEEL="$WHEEL_DIR/$(basename "$BUILT")"
        say "cached $WHEEL"
    else
        say "$PLAN_MESSAGE: $WHEEL"
    fi
    # --no-deps: pip must not touch torch; mmcv's own needs (mmengine,
    # addict, yapf, opencv) come with requirements/runtime.txt below.
    "${PIP[@]}" -q --no-deps --force-reinstall "$WHEEL"
fi

# ---- the rest ----
say "installing requirements/runtime.txt, requirements/tests.txt and bpt_mm (editable)"
"${PIP[@]}" -q -r requirements/runtime.txt -r requirements/tests.txt -c requirements/torch.txt
EDITABLE=()
# On top of another environment: a plain path entry (compat mode) for this
# clone, which comes before that environment's entries, so that a bpt_mm
# installed there (another clone) does not shadow this one.
[[ -f "$VENV/lib/python$PYVER/site-packages/bpt_mm_base_env.pth" ]] && EDITABLE=(--use-pep517 --config-settings editable_mode=compat)
"${PIP[@]}" -q --no-deps --no-build-isolation "${EDITABLE[@]}" -e .
venv_has_mmcv || die "mmcv is installed${WHEEL:+ from $WHEEL} but 'import mmcv.ops' fails (run: $PY -c 'import mmcv.ops'); if the cached wheel is broken, delete $WHEEL_DIR and run again"

env_works || die "set-up finished but the stack does not import; run: $PY -c 'import bpt_mm'"
# An environment set-up was built on top of may hold another bpt_mm (another
# clone, installed there): it must not shadow this one.
FOUND="$(cd / && "$PY" -c 'import os, bpt_mm; print(os.path.dirname(os.path.dirname(os.path.realpath(bpt_mm.__file__))))')"
[[ "$FOUND" == "$(realpath "$ROOT")" ]] \
    || die "in $VENV, 'import bpt_mm' finds the copy in $FOUND, not this clone ($ROOT): it is installed in the environment $VENV was made on top of ($PYTHON). Uninstall it there (pip uninstall bpt_mm), or install this clone into that environment instead (pip install -e . --no-deps)"
"$PY" tools/mmcv_build_plan.py --check-installed --ops "${BPT_MM_MMCV_OPS:-auto}" >&2 || true
inputs_digest > "$STAMP"
say "done: $VENV"
