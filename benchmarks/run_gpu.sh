#!/usr/bin/env bash
# The gpu-tier benchmarks on one H100/H200, each under its own time limit so that one failing or slow part does not
# cost the others (all steps: at most ~22 minutes; a short session runs a few, e.g. `decode tests profile`).
# Results land in benchmarks/results/.
#   bash benchmarks/run_gpu.sh [RESULTS_DIR] [STEPS...]   # needs CUDA; RESULTS_DIR defaults to benchmarks/results
#   STEPS: any of tests decode profile engine-paths sampling http http-own batcher mfu, run in the order given (default: all, in that order); DECODE_ARGS="--no-compile --no-hf-compile" skips the torch.compile variants (guide's, transformers' static cache)
#   DEADLINE=S: every step ends by S seconds after the start (its own limit is cut to what is left; a step with under 20 s left is skipped)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # guide from this checkout, installed or not (a bare GPU machine)
res=${1:-benchmarks/results}; shift || true
steps=${*:-tests decode profile engine-paths sampling http http-own batcher mfu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
status=0
deadline=${DEADLINE:-100000}
step() { local limit=$1; shift; local left=$((deadline - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
         [ "$limit" -lt 20 ] && { echo "=== SKIPPED (deadline): $*"; status=1; return; }
         echo "=== $* (limit ${limit}s)"; local t=$SECONDS
         timeout "$limit" "$@" || { echo "=== FAILED ($?): $*"; status=1; }; echo "=== $((SECONDS - t)) s"; }
for s in $steps; do      # in the order given: put first what matters most if time may run out
  case $s in
    tests) step 240 python3 -m pytest -q -p no:cacheprovider tests/test_serve_engine.py -k "(cuda or triton) and not interpreter" ;;   # the interpreter test runs in CI
    decode) step 330 python3 benchmarks/serve_engine.py --gpu-decode --device cuda ${DECODE_ARGS:-} --out "$res" ;;
    profile) step 120 sh -c "python3 benchmarks/profile_decode_gpu.py > '$res/decode_profile.txt'" ;;
    engine-paths)   # speculation, the prefix cache and chunked prefill: eager step_forward passes beside the decode graphs (tiny tier)
      step 200 sh -c "python3 benchmarks/serve_speculative.py --device cuda --batches 1 8 32 --out '$res' &&
                      python3 benchmarks/serve_prefix_cache.py --device cuda --out '$res' &&
                      python3 benchmarks/serve_chunked_prefill.py --device cuda --out '$res'" ;;
    sampling) step 60 python3 benchmarks/serve_sampling.py --device cuda --name serve_sampling_gpu --out "$res" ;;
    http) step 240 python3 benchmarks/serve_http.py --tier gpu --device cuda --workers 8 12 --clients 4 --concurrency 256 \
            --requests 400000 --time-limit 15 --shared-encoder --encoder-batch-size 128 --encoder-delay 0.002 --name serve_http_gpu --out "$res" ;;
    http-own) step 150 python3 benchmarks/serve_http.py --tier gpu --device cuda --workers 6 --clients 4 --concurrency 256 \
            --requests 400000 --time-limit 15 --name serve_http_gpu_own_encoders --out "$res" ;;
    batcher) step 120 python3 benchmarks/serve_batcher.py --tier gpu --device cuda --requests 20000 --concurrency 64 \
            --max-batch-size 64 --name serve_batcher_gpu --out "$res" ;;
    mfu) step 240 python3 benchmarks/train_mfu_gpu.py --out "$res" ;;
    *) echo "unknown step: $s (steps: tests decode profile engine-paths sampling http http-own batcher mfu)"; status=1 ;;
  esac
done
exit $status
