# Sourced by dist_train.sh / dist_test.sh / slurm_*.sh: picks the Python that runs the job and
# fails with one line if it cannot import torch.
# PYTHON=/path/to/python overrides; the default is the repo's .venv, else `python` on PATH.
HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then
        PYTHON="$HERE/../.venv/bin/python"
    else
        PYTHON=$(command -v python || command -v python3 || echo python)
    fi
fi
if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    echo "[cbn_mmdet] $PYTHON cannot import torch: run 'bash tools/setup_env.sh' (creates .venv) or set PYTHON=/path/to/python of an environment with torch, mmcv and mmdet" >&2
    exit 1
fi
echo "[cbn_mmdet] using Python $PYTHON (set PYTHON= to choose another)" >&2
