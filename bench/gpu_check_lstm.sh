#!/usr/bin/env bash
# GPU check of kernels/lstm.py (the fused LSTM cell), sized for one H200: a few minutes.
#
#   1. the GPU tests: python3 -m pytest -m gpu tests/test_lstm.py (the compiled kernel against
#      nn.LSTM/cuDNN in fp32, fp16 and bf16: outputs, final states, every gradient).
#   2. bench/bench_lstm.py: the fused-cell LSTM against cuDNN's nn.LSTM and the unfused torch
#      cell, forward+backward, bf16, hidden 256/1024/2048, batch 32/128, length 128.
#
# Usage, from anywhere (no network, package not installed; needs torch, triton, pytest,
# matplotlib):
#   bash bench/gpu_check_lstm.sh                   # results in ${OUT:-bench/results}
# Writes: lstm_gpu_tests.log, lstm_bench.log, lstm_gpu.{json,png} (lstm_smoke.* on the CPU).
# Exit status: the GPU tests'. Hard timeouts add up to under 9 minutes.
# Without a GPU it runs the benchmark at smoke size on the CPU (a check of the script itself).
set -uo pipefail

source "$(dirname "$0")/_gpu_env.sh"
log_environment "$OUT_DIR/lstm_gpu_tests.log"

# 1. GPU tests (skipped, not failed, without a GPU).
timeout 210 python3 -m pytest -m gpu tests/test_lstm.py -q -p no:cacheprovider 2>&1 \
    | tee -a "$OUT_DIR/lstm_gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "gpu tests exit status: $test_rc ($((SECONDS - T0)) s so far)" | tee -a "$OUT_DIR/lstm_gpu_tests.log"

# 2. Benchmark: fused cell vs cuDNN vs unfused.
if [ "$GPU" = 1 ]; then
    bench_args=(--hidden 256 1024 2048 --batch 32 128 --length 128 --dtype bf16 --iters 10 --warmup 2)
else
    bench_args=(--smoke)
fi
timeout 300 python3 bench/bench_lstm.py "${bench_args[@]}" --out "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/lstm_bench.log"
echo "benchmark exit status: ${PIPESTATUS[0]} ($((SECONDS - T0)) s in all)" | tee -a "$OUT_DIR/lstm_bench.log"

ls -l "$OUT_DIR"/lstm_* 2>/dev/null
exit "$test_rc"
