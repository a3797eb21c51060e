#!/usr/bin/env bash
# One-command setup: creates .venv at the repo root and installs the tested stack into it.
# Idempotent: a second run only checks what is there.
#
#   bash tools/setup_env.sh                      # the pinned stack (requirements/build.txt) in .venv
#   bash tools/setup_env.sh --torch 2.1.2        # the oldest supported torch, in .venv-torch2.1.2
#   PIP_CONSTRAINT=/dev/null bash tools/setup_env.sh --torch 2.15.0   # newer than this machine's
#                                                # pip cap (/etc/xdg/pip), for a one-off check
#
# --torch VERSION installs that torch (and its torchvision, from the table below or
# --torchvision) into its own venv (default .venv-torch<VERSION>); everything else is the same
# stack, with numpy < 2 and opencv-python < 4.12 for torches built against numpy 1 (< 2.3).
# mmcv is compiled against whichever torch is installed, cached per torch version.
#
# Environment knobs:
#   PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VENV        venv location (default: <repo>/.venv, or <repo>/.venv-torch<VERSION> with --torch)
#   MMCV_CACHE  where the built mmcv wheel is kept (default: ~/.cache/cbn_mmdet)
#   FORCE_CUDA  set to 1 to build mmcv's CUDA ops (automatic when torch sees a GPU)
#   MAX_JOBS    parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# torch -> torchvision for the releases we test; others need --torchvision. 'none': the stack
# does not import torchvision (mmcv/mmengine only lazily, for paths our configs do not use), and
# the index served no torchvision for torch 2.15.0 (checked 2026-12-02).
declare -A TORCHVISION_FOR=([2.1.2]=0.16.2 [2.4.1]=0.19.1 [2.14.1]=0.29.1 [2.15.0]=none)
TORCH= TORCHVISION=
while [ $# -gt 0 ]; do
    case "$1" in
        --torch) [ $# -ge 2 ] || die "--torch needs a version, e.g. --torch 2.1.2"; TORCH=$2; shift 2 ;;
        --torchvision) [ $# -ge 2 ] || die "--torchvision needs a version (or none)"; TORCHVISION=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option '$1' (allowed: --torch VERSION, --torchvision VERSION)" ;;
    esac
done
if [ -n "$TORCH" ]; then
    [[ "$TORCH" =~ ^2\.[0-9]+\.[0-9]+$ ]] || die "--torch must be a release like 2.1.2 (2.1 or newer), got '$TORCH'"
    minor=$(echo "$TORCH" | cut -d. -f2)
    [ "$minor" -ge 1 ] || die "--torch $TORCH: cbn_mmdet supports torch 2.1 and newer"
    TORCHVISION=${TORCHVISION:-${TORCHVISION_FOR[$TORCH]:-}}
    [ -n "$TORCHVISION" ] || die "--torch $TORCH: no known torchvision for it (known: ${!TORCHVISION_FOR[*]}); pass --torchvision VERSION"
    VENV=${VENV:-$ROOT/.venv-torch$TORCH}
else
    [ -z "$TORCHVISION" ] || die "--torchvision needs --torch"
    VENV=${VENV:-$ROOT/.venv}
fi
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
MMCV_VERSION=2.1.0
MMCV_CACHE=${MMCV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbn_mmdet}

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# 1. torch first: mmcv compiles against it, so it must be in place before the mmcv build.
#    setuptools keeps pkg_resources (mmcv's setup.py and mmengine's `mmdet::` configs import it).
PINS=()   # constraints kept for every later install into this venv
if [ -n "$TORCH" ]; then
    printf 'torch==%s\n' "$TORCH" > "$VENV/torch-pins.txt"
    [ "$TORCHVISION" = none ] || printf 'torchvision==%s\n' "$TORCHVISION" >> "$VENV/torch-pins.txt"
    if [ "$minor" -lt 3 ]; then  # built against numpy 1: numpy 2 breaks torch.from_numpy
        cat "$ROOT/requirements/numpy1.txt" >> "$VENV/torch-pins.txt"
    fi
    PINS=(-c "$VENV/torch-pins.txt")
    say "installing torch $TORCH / torchvision $TORCHVISION and build tools into $VENV"
    grep -v '^torch' "$ROOT/requirements/build.txt" > "$VENV/build-tools.txt"
    "${PIP[@]}" install -q "${PINS[@]}" -r "$VENV/torch-pins.txt" -r "$VENV/build-tools.txt"
else
    say "installing torch and build tools (requirements/build.txt)"
    "${PIP[@]}" install -q -r "$ROOT/requirements/build.txt"
fi

# 2. mmcv with its compiled ops.
mmcv_ok() {
    "$PY" - <<PYEOF 2>/dev/null
import mmcv, mmcv.ops
assert mmcv.__version__ == '$MMCV_VERSION', mmcv.__version__
from mmcv.ops import nms, RoIAlign  # compiled ops used by Faster/Mask R-CNN
PYEOF
}

if mmcv_ok; then
    say "mmcv $MMCV_VERSION with ops already installed"
else
    # The cache is keyed by torch version, Python version and CPU/CUDA: one wheel per torch.
    TORCH_TAG=$("$PY" -c "import torch, sys; print(f'torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}'.replace('+', '_'))")
    if [ -z "${FORCE_CUDA:-}" ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        FORCE_CUDA=1
    fi
    [ "${FORCE_CUDA:-0}" = "1" ] && TORCH_TAG="$TORCH_TAG-cuda" || TORCH_TAG="$TORCH_TAG-cpu"
    WHEEL_DIR="$MMCV_CACHE/mmcv-$MMCV_VERSION-$TORCH_TAG"
    mkdir -p "$WHEEL_DIR"
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$WHEEL" ]; then
        BUILD_DIR=$(mktemp -d)
        trap 'rm -rf "$BUILD_DIR"' EXIT
        say "building mmcv $MMCV_VERSION with ops for $TORCH_TAG; about 9 minutes on 2 cores, once per machine and torch"
        # No build isolation: an isolated build env has no torch and silently skips the ops.
        "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
            -d "$BUILD_DIR" "mmcv==$MMCV_VERSION"
        tar -xzf "$BUILD_DIR"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD_DIR"
        SRC="$BUILD_DIR/mmcv-$MMCV_VERSION"
        # mmcv hard-codes C++17; newer torch headers (2.14 here) need C++20. Patch our private
        # copy of the source (nothing installed is touched), only for a torch that says so.
        TORCH_INC=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
        if grep -qs "C++20 or later compatible compiler is required" "$TORCH_INC/ATen/ATen.h"; then
            grep -q 'c++17' "$SRC/setup.py" || die "mmcv setup.py no longer names c++17; review the C++ standard patch"
            sed -i 's/c++17/c++20/g' "$SRC/setup.py"
            say "torch's headers need C++20: building mmcv with -std=c++20"
        fi
        (cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" .) \
            || die "mmcv build failed (see the compiler output above)"
        WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    else
        say "using cached mmcv wheel $WHEEL"
    fi
    "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
fi

# 3. The rest of the stack, pytest and this package (editable).
say "installing requirements.txt and cbn_mmdet (editable)"
if [ -n "$TORCH" ]; then  # requirements.txt less its torch pins (requirements/build.txt)
    grep -v '^-r requirements/build.txt' "$ROOT/requirements.txt" > "$VENV/stack.txt"
    "${PIP[@]}" install -q "${PINS[@]}" -r "$VENV/stack.txt"
else
    "${PIP[@]}" install -q -r "$ROOT/requirements.txt"
fi
# (checked from / so that the repo's own folder on sys.path does not count as installed)
if [ "$(cd / && "$PY" -c 'import cbn_mmdet, os; print(os.path.dirname(os.path.dirname(os.path.abspath(cbn_mmdet.__file__))))' 2>/dev/null)" != "$ROOT" ]; then
    "${PIP[@]}" install -q "${PINS[@]}" --no-deps --no-build-isolation -e "$ROOT"
fi

# 4. Fail loudly if the ops did not make it.
mmcv_ok || die "mmcv.ops does not import: mmcv $MMCV_VERSION was installed without its compiled ops"
(cd / && "$PY" -c "import cbn_mmdet, mmdet, torch, numpy; print('[setup] ok: torch', torch.__version__, '| numpy', numpy.__version__, '| mmdet', mmdet.__version__, '| cbn_mmdet', cbn_mmdet.__version__)") \
    || die "cbn_mmdet does not import from outside the repo (editable install missing)"
