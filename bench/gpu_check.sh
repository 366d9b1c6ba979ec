#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): DeiT-S and DeiT-Ti training throughput in memory and
# from shards (--loader gpu and --loader cpu), MFU, and offline vs online distillation; one run,
# about 5 minutes on an H100/H200, no network needed.
#
# Preparation, once, HERE in the repository root (the GPU image has no webdataset, which the rows
# from shards need; both wheels are pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7
# (webdataset's other needs, numpy and pyyaml, are on the image.)
#
# The device call: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420).
# Results: one JSON line per row and a final summary line on stdout; also $OUT/gpu_check.jsonl and
# the progress log $OUT/gpu_check.log. Options after the script name go to gpu_check.py (e.g.
# --rows s_memory,s_gpu_loader for a shorter rerun; --budget-s, --hard-limit-s; GPU_CHECK_TIMEOUT_S
# raises the outer limit for longer manual runs).
#
# The costs of stored augmentation on the GPU (label-teacher rendering on CUDA, --loader gpu replaying)
# are a second call after this one: run(command="bash bench/gpu_check.sh --rows ''; PYTHONPATH=/tmp/site
# python3 bench/stored_augment.py --images 256", carry=[".whl"], timeout_s=300).
#
# What it does: installs the wheels in .whl/ when present (into /tmp/site, offline); picks a Python
# whose torch sees CUDA (else the first with torch; PYTHON=... forces one); makes deitpipe
# importable (pip install -e . --no-deps offline, else a link to the repository root); says when
# webdataset is missing (the rows from shards are then skipped with that reason); runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${OUT:-}" ]]; then
    exec 2> >(tee -a "$OUT/gpu_check.log" >&2)
fi

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

shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} )); then
    # Carried wheels (see the preparation above): offline, into a folder of their own.
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}" >&2; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: installed ${#wheels[@]} carried wheels into /tmp/site" >&2
    else
        echo "gpu_check: installing the carried wheels failed; going on without them" >&2
    fi
fi

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

"$PY" - >&2 <<'EOF'
import importlib.util, torch
print("gpu_check: torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if importlib.util.find_spec("webdataset") is None:
    print("gpu_check: webdataset is missing: the rows from shards (loaders, online teacher) will be skipped; "
          "carry its wheels (.whl, see the top of bench/gpu_check.sh)")
EOF

export PYTHONUNBUFFERED=1
# gpu_check.py stops its last row at --hard-limit-s (330 s) and prints the summary; this outer limit
# only ends a process that hangs after that, well inside the device call's timeout_s of 420.
limit=(); command -v timeout >/dev/null && limit=(timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-360}")
exec "${limit[@]}" "$PY" bench/gpu_check.py "$@"
