#!/usr/bin/env bash
# TSDN training and scoring throughput on one GPU, from a clean copy of the repo, in a few minutes.
#
#   bash benchmarks/gpu.sh [gpu_bench.py options]      e.g.  --train-batch 32 --iters 30
#
# Uses the machine's python3 that already carries a CUDA build of PyTorch (GPU images do; this script
# never installs torch). It makes a venv that sees those system packages, installs this project into it
# without dependencies, and adds only what is missing among the model library's needs (timm, kornia,
# scikit-image, safetensors, pyyaml): from wheels in ./.whl if that folder exists (offline machines; see
# benchmarks/README.md for how to fill it), else from the package index. Then it prints the GPU, runs
# benchmarks/gpu_bench.py and writes the JSON to $OUT (if set) or benchmarks/results/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${TSDN_GPU_VENV:-/tmp/tsdn-gpu-venv}
RESULTS=${OUT:-benchmarks/results}
START=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

echo "== environment"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
missing=$("$PY" - <<'EOF'
import importlib.util
needs = {"timm": "timm", "kornia": "kornia", "skimage": "scikit-image", "safetensors": "safetensors", "yaml": "pyyaml"}
print(" ".join(dist for mod, dist in needs.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "installing missing: $missing"
    if [ -d .whl ]; then
        "$PY" -m pip install --quiet --no-index --find-links .whl $missing
    else
        "$PY" -m pip install --quiet $missing
    fi
fi
# The project itself, without dependencies: the system torch must stay the one in use.
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$PY" -c 'import torch, timm, kornia, tsdn.model; print("timm", timm.__version__, "kornia", kornia.__version__)'

echo "== benchmark"
mkdir -p "$RESULTS"
status=0
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_bench.py --device cuda --json "$RESULTS/gpu.json" "$@" || status=$?
echo "== done in $(( $(date +%s) - START )) s (exit $status); JSON in $RESULTS/gpu.json"
exit "$status"
