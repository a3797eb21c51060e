#!/usr/bin/env bash
# One-command setup: creates .venv at the repo root and installs the tested stack into it.
# Idempotent: a second run only checks what is there.
#
#   bash tools/setup_env.sh
#
# Environment knobs:
#   PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VENV        venv location (default: <repo>/.venv)
#   MMCV_CACHE  where the built mmcv wheel is kept (default: ~/.cache/cbn_mmdet)
#   FORCE_CUDA  set to 1 to build mmcv's CUDA ops (automatic when torch sees a GPU)
#   MAX_JOBS    parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
MMCV_VERSION=2.1.0
MMCV_CACHE=${MMCV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbn_mmdet}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# 1. torch first: mmcv compiles against it, so it must be in place before the mmcv build.
#    setuptools < 70 keeps pkg_resources (mmcv's setup.py and mmengine's `mmdet::` configs import it).
say "installing torch and build tools (requirements/build.txt)"
"${PIP[@]}" install -q -r "$ROOT/requirements/build.txt"

# 2. mmcv with its compiled ops.
mmcv_ok() {
    "$PY" - <<EOF 2>/dev/null
import mmcv, mmcv.ops
assert mmcv.__version__ == '$MMCV_VERSION', mmcv.__version__
from mmcv.ops import nms, RoIAlign  # compiled ops used by Faster/Mask R-CNN
EOF
}

if mmcv_ok; then
    say "mmcv $MMCV_VERSION with ops already installed"
else
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
        say "building mmcv $MMCV_VERSION with ops (FORCE_CUDA=${FORCE_CUDA:-0}); about 9 minutes on 2 cores, once per machine"
        # No build isolation: an isolated build env has no torch and silently skips the ops.
        "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
            -d "$BUILD_DIR" "mmcv==$MMCV_VERSION"
        tar -xzf "$BUILD_DIR"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD_DIR"
        SRC="$BUILD_DIR/mmcv-$MMCV_VERSION"
        # mmcv hard-codes C++17; torch >= 2.14 headers need C++20. Patch our private copy of the
        # source (nothing installed is touched).
        grep -q 'c++17' "$SRC/setup.py" || die "mmcv setup.py no longer names c++17; review the C++ standard patch"
        sed -i 's/c++17/c++20/g' "$SRC/setup.py"
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
"${PIP[@]}" install -q -r "$ROOT/requirements.txt"
# (checked from / so that the repo's own folder on sys.path does not count as installed)
if [ "$(cd / && "$PY" -c 'import cbn_mmdet, os; print(os.path.dirname(os.path.dirname(os.path.abspath(cbn_mmdet.__file__))))' 2>/dev/null)" != "$ROOT" ]; then
    "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
fi

# 4. Fail loudly if the ops did not make it.
mmcv_ok || die "mmcv.ops does not import: mmcv $MMCV_VERSION was installed without its compiled ops"
(cd / && "$PY" -c "import cbn_mmdet, mmdet; print('[setup] ok: mmdet', mmdet.__version__, '| cbn_mmdet', cbn_mmdet.__version__)") \
    || die "cbn_mmdet does not import from outside the repo (editable install missing)"
