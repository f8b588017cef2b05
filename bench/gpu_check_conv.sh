#!/usr/bin/env bash
# GPU check of kernels/conv.py (fused conv2d + bias + ReLU) on one GPU, sized for one H200:
# about 3-4 minutes in all, autotuning and torch.compile included.
#
#   1. the GPU tests: python3 -m pytest -m gpu tests/test_conv.py (fp16/bf16 on ResNet-like
#      shapes, fp32 with and without TF32, NCHW, no-ReLU, >2**31-element tensors). They run with
#      one tile per shape (TPL_CONV_AUTOTUNE=0) to keep compile time down, except one test that
#      runs the autotuner; the benchmark below is autotuned throughout.
#   2. the pytest-benchmark entry of bench/bench_conv.py, if pytest-benchmark is installed.
#   3. the benchmark, channels_last, Triton vs cuDNN vs torch.compile, fwd / bwd / fwd+bwd:
#      fp16 at batch 32 on the example CNN's conv and all 23 distinct ResNet-50 convs, then bf16
#      at batch 128 on a 7-shape ResNet-50 subset. Each run has a time budget; cases it had no
#      time for are listed under "skipped" in its JSON. The full grid, without a budget:
#      PYTHONPATH=$PWD python3 bench/bench_conv.py --out bench/results
#
# Usage, from anywhere (no network, package not installed; needs torch, triton, pytest,
# matplotlib; pytest-benchmark optional):
#   bash bench/gpu_check_conv.sh                 # results in ${OUT:-bench/results}
#   OUT=/some/dir bash bench/gpu_check_conv.sh
# Writes: conv_gpu_tests.log, conv_bench.log, conv_${TAG}_fp16_b32.{json,png},
#   conv_${TAG}_bf16_b128.{json,png} (TAG defaults to h200), conv_pytest_benchmark.json.
# Exit status: the GPU tests' (benchmark failures show in its log and in the JSON "errors").
# Hard timeouts per step add up to under 9 minutes, so one 600 s device call always returns.
# Without a GPU it runs the same steps at smoke size on the CPU (a check of the script itself).
set -uo pipefail

source "$(dirname "$0")/_gpu_env.sh"
log_environment "$OUT_DIR/conv_gpu_tests.log"

# 1. GPU tests (skipped, not failed, without a GPU).
TPL_CONV_AUTOTUNE=0 timeout 180 python3 -m pytest -m gpu tests/test_conv.py -q \
    -p no:cacheprovider 2>&1 | tee -a "$OUT_DIR/conv_gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "gpu tests exit status: $test_rc ($((SECONDS - T0)) s so far)" | tee -a "$OUT_DIR/conv_gpu_tests.log"

# 2. pytest-benchmark entry (forward of one ResNet-50 conv, Triton vs cuDNN).
if python3 -c "import pytest_benchmark" 2>/dev/null; then
    timeout 60 python3 -m pytest bench/bench_conv.py -m gpu -q -p no:cacheprovider \
        --benchmark-only --benchmark-json "$OUT_DIR/conv_pytest_benchmark.json" 2>&1 \
        | tee -a "$OUT_DIR/conv_gpu_tests.log"
    echo "pytest-benchmark exit status: ${PIPESTATUS[0]}" | tee -a "$OUT_DIR/conv_gpu_tests.log"
else
    echo "pytest-benchmark not installed: its entry skipped" | tee -a "$OUT_DIR/conv_gpu_tests.log"
fi

# 3. Benchmark (autotuned), with time budgets; hard timeouts leave the JSON of the last shape.
if [ "$GPU" = 1 ]; then
    fp16_args=(--shapes seed,resnet50 --batch 32 --dtypes fp16 --time-budget-s 100)
    bf16_args=(--shapes resnet50-small --batch 128 --dtypes bf16 --time-budget-s 45)
    common=(--warmup 5 --rep 25 --out "$OUT_DIR")
else
    fp16_args=(--smoke)
    bf16_args=(--smoke --no-plot)
    common=(--out "$OUT_DIR")
fi
: >"$OUT_DIR/conv_bench.log"
timeout 170 python3 bench/bench_conv.py "${fp16_args[@]}" "${common[@]}" --tag "conv_${TAG}_fp16_b32" \
    2>&1 | tee -a "$OUT_DIR/conv_bench.log"
echo "fp16 benchmark exit status: ${PIPESTATUS[0]} ($((SECONDS - T0)) s so far)" | tee -a "$OUT_DIR/conv_bench.log"
timeout 100 python3 bench/bench_conv.py "${bf16_args[@]}" "${common[@]}" --tag "conv_${TAG}_bf16_b128" \
    2>&1 | tee -a "$OUT_DIR/conv_bench.log"
echo "bf16 benchmark exit status: ${PIPESTATUS[0]} ($((SECONDS - T0)) s in all)" | tee -a "$OUT_DIR/conv_bench.log"

ls -l "$OUT_DIR"/conv_* 2>/dev/null
exit "$test_rc"
