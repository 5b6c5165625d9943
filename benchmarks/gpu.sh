#!/usr/bin/env bash
# TSDN training and scoring throughput on one GPU, from a clean copy of the repo, in a few minutes.
#
#   bash benchmarks/gpu.sh [gpu_bench.py options]      e.g.  --train-batch 32 --iters 30
#
# Uses the machine's python3 that already carries a CUDA build of PyTorch (GPU images do; this script never
# installs torch). That python3 is often itself a virtual environment, and a venv made from it would not see
# its torch, so nothing here makes a venv: the project and whatever the model library lacks (timm, kornia,
# kornia_rs, scikit-image, safetensors, pyyaml, huggingface_hub) are installed without dependencies into a
# private folder put on PYTHONPATH. Missing packages come from wheels in ./.whl if that folder exists
# (offline machines; benchmarks/README.md says how to fill it), else from the package index.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
SITE=${TSDN_GPU_SITE:-/tmp/tsdn-gpu-site}
RESULTS=${OUT:-benchmarks/results}
START=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

echo "== environment"
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needs = {
    "timm": "timm",
    "huggingface_hub": "huggingface_hub",
    "kornia": "kornia",
    "kornia_rs": "kornia_rs",
    "skimage": "scikit-image",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
}
print(" ".join(dist for module, dist in needs.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "installing into $SITE: $missing"
    if [ -d .whl ]; then
        "$PYTHON" -m pip install --quiet --no-deps --target "$SITE" --no-index --find-links .whl $missing
    else
        "$PYTHON" -m pip install --quiet --no-deps --target "$SITE" $missing
    fi
fi
# The project itself (a built wheel, not the source tree on the path), without dependencies.
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --upgrade --target "$SITE" .
"$PYTHON" -c 'import timm, kornia, tsdn.model; print("timm", timm.__version__, "kornia", kornia.__version__, "tsdn from", tsdn.model.__file__)'

echo "== benchmark"
mkdir -p "$RESULTS"
status=0
PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_bench.py --device cuda --json "$RESULTS/gpu.json" "$@" || status=$?
echo "== done in $(( $(date +%s) - START )) s (exit $status); JSON in $RESULTS/gpu.json"
exit "$status"
