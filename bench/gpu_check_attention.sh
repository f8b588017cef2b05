#!/usr/bin/env bash
# GPU check of kernels/attention.py on one GPU (sized for one H200: about 3-4 minutes in all,
# compile and autotune included; the timeouts below cap it at about 10 minutes in the worst case).
#
#   1. the GPU tests: python3 -m pytest -m gpu tests/test_attention.py (bf16/fp16 at real sizes,
#      fp32, determinism, lse, pytest-benchmark entry if installed). They run with one block-size
#      configuration per kernel (TPL_ATTENTION_AUTOTUNE=0) to keep compile time down; the
#      benchmark below runs the autotuned kernels and records each point's error against SDPA.
#   2. the benchmark, autotuned, against every SDPA backend: bf16 over seq 512..16384, head dims
#      128 and 64, causal and not; fp16 on a smaller grid. Each run has a time budget: grid points
#      it had no time for are listed as skipped in its JSON, which is rewritten after every point
#      (so a timeout keeps the points measured). For the complete grid with no budget:
#      PYTHONPATH=$PWD python3 bench/bench_attention.py --out-dir bench/results
#
# Usage, from anywhere (no network, package not installed; needs torch, triton, pytest, matplotlib):
#   bash bench/gpu_check_attention.sh              # results in ${OUT:-bench/results}
#   OUT=/some/dir bash bench/gpu_check_attention.sh
# Writes (at most 6 files): attention_gpu_tests.log, attention_bench.log,
#   attention_${TAG}_bf16.{json,png}, attention_${TAG}_fp16.{json,png} (TAG defaults to h200).
# Exit status: the tests' (the benchmark's failures show in its log and JSON).
# Without a GPU it runs the same steps at smoke size on the CPU (a check of the script itself).
set -uo pipefail

source "$(dirname "$0")/_gpu_env.sh"
log_environment "$OUT_DIR/attention_gpu_tests.log"

# 1. GPU tests (skipped, not failed, without a GPU).
TPL_ATTENTION_AUTOTUNE=0 timeout 240 python3 -m pytest -m gpu tests/test_attention.py -q \
    -p no:cacheprovider 2>&1 | tee -a "$OUT_DIR/attention_gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "gpu tests exit status: $test_rc" | tee -a "$OUT_DIR/attention_gpu_tests.log"

# 2. Benchmark (autotuned). Time budgets bound the run; see the docstring of bench_attention.py.
if [ "$GPU" = 1 ]; then
    bf16_args=(--dtypes bf16 --head-dims 128 64 --causal both
               --seqs 512 1024 2048 4096 8192 16384 --time-budget-s 120)
    fp16_args=(--dtypes fp16 --head-dims 128 --causal both --seqs 1024 4096 16384
               --time-budget-s 45)
    common=(--warmup-ms 5 --rep-ms 20 --out-dir "$OUT_DIR")
else
    bf16_args=(--smoke --backend ref)
    fp16_args=(--smoke --backend ref --modes fwd)
    common=(--out-dir "$OUT_DIR")
fi
: >"$OUT_DIR/attention_bench.log"
timeout 200 python3 bench/bench_attention.py "${bf16_args[@]}" "${common[@]}" --tag "${TAG}_bf16" \
    2>&1 | tee -a "$OUT_DIR/attention_bench.log"
echo "bf16 benchmark exit status: ${PIPESTATUS[0]}" | tee -a "$OUT_DIR/attention_bench.log"
timeout 150 python3 bench/bench_attention.py "${fp16_args[@]}" "${common[@]}" --tag "${TAG}_fp16" \
    2>&1 | tee -a "$OUT_DIR/attention_bench.log"
echo "fp16 benchmark exit status: ${PIPESTATUS[0]}" | tee -a "$OUT_DIR/attention_bench.log"

ls -l "$OUT_DIR"/attention_* 2>/dev/null
exit "$test_rc"
