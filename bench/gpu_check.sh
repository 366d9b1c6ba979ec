#!/usr/bin/env bash
# DeiT-S training throughput and MFU on a GPU machine: one prepared run, no network needed.
#
# Usage (from anywhere): bash bench/gpu_check.sh [gpu_check.py options]
# Picks a Python whose torch sees CUDA (else the first with torch; PYTHON=... forces one),
# makes deitpipe importable (pip install -e . --no-deps offline, else a link to the repository
# root), then runs bench/gpu_check.py: its in-memory run needs only torch and deitpipe's student
# modules; its run from synthetic shards also needs webdataset (pip install --no-index
# --find-links DIR webdataset braceexpand where the machine has no index) and is skipped without.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    local candidates=(${PYTHON:-} .venv/bin/python python3 python)
    for py in "${candidates[@]}"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
            echo "$py"; return
        fi
    done
    for py in "${candidates[@]}"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import torch" 2>/dev/null; then
            echo "$py"; return
        fi
    done
    echo "gpu_check: no Python with torch found (tried ${candidates[*]})" >&2
    exit 1
}

PY=$(pick_python)
echo "gpu_check: python $PY" >&2
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" >&2

if ! "$PY" -c "import deitpipe.student.model" 2>/dev/null; then
    # Offline: no index, no build isolation (which would fetch setuptools), no dependencies.
    pip_log=$(mktemp)
    if ! "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . >"$pip_log" 2>&1; then
        echo "gpu_check: pip install -e . failed: $(tail -n 1 "$pip_log")" >&2
    fi
fi
if ! "$PY" -c "import deitpipe.student.model" 2>/dev/null; then
    # The repository root is the package (package-dir "." in pyproject.toml): link it as deitpipe.
    shim=$(mktemp -d)
    ln -s "$PWD" "$shim/deitpipe"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: using deitpipe from $PWD via $shim" >&2
fi

exec "$PY" bench/gpu_check.py "$@"
