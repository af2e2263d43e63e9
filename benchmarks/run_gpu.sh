#!/usr/bin/env bash
# The gpu-tier benchmarks on one H100/H200, most important first, each under its own time limit (about 8 minutes
# in all), so that one failing or slow part does not cost the others. Results land in benchmarks/results/.
#   bash benchmarks/run_gpu.sh [RESULTS_DIR]     # needs CUDA; RESULTS_DIR defaults to benchmarks/results
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
res=${1:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
status=0
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t=$SECONDS
         timeout "$limit" "$@" || { echo "=== FAILED ($?): $*"; status=1; }; echo "=== $((SECONDS - t)) s"; }
step 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_engine.py -k cuda
step 150 python3 benchmarks/serve_engine.py --gpu-decode --device cuda --out "$res"
step 240 python3 benchmarks/serve_http.py --tier gpu --device cuda --workers 1 8 12 --clients 4 --concurrency 384 --requests 400000 --time-limit 20 --out "$res"
step 240 python3 benchmarks/train_mfu_gpu.py --out "$res"
exit $status
