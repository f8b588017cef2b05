#!/usr/bin/env bash
# The GPU check: everything the package has to show on one GPU, in under 8 minutes on one H200.
#
#   part         limit  what
#   tests        140 s  every GPU test: python3 -m pytest -m gpu tests (one tile configuration per
#                       kernel, TPL_ATTENTION_AUTOTUNE=0 TPL_CONV_AUTOTUNE=0, to bound compile time)
#   attention     70 s  bench/bench_attention.py: forward and backward against every SDPA backend,
#                       bf16, seq 1k-8k, head dims 64 and 128, causal and not (autotuned)
#   conv          45 s  bench/bench_conv.py: conv+bias+ReLU against cuDNN and torch.compile on
#                       ResNet-50's shapes, channels_last bf16, batch 32
#   matmul        40 s  bench/bench_matmul.py: the GEMM against cuBLAS at 4096^3 and 8192^3, bf16
#   lstm          30 s  bench/bench_lstm.py: one LSTM layer, the fused Triton cell against cuDNN's
#                       nn.LSTM and the unfused torch cell, bf16, hidden 256/1024, batch 32/128
#   train_step   125 s  bench/bench_train_step.py: one bf16 training step of the GPT 125M preset,
#                       eager, then torch.compile'd (Inductor compiles the step, the attention
#                       kernel autotunes): tokens/s and MFU
#
# The limits are hard (timeout(1), then SIGKILL 5 s later) and add up to 450 s (475 s at worst);
# the benchmarks also get a time budget inside their limit, so a slow machine gives fewer grid
# points rather than a timeout. After each part the report is rewritten: OUT_DIR/gpu_check.json
# and gpu_check.md (bench/gpu_check_report.py) hold every part's status (ok, failed, timeout,
# pending), time, log and result files, so a run cut short still reports what finished.
#
# Usage, from anywhere (no network, package not installed; needs torch, triton, pytest, matplotlib):
#   OUT=/some/dir bash bench/gpu_check.sh        # results in $OUT (default bench/results)
#   bash bench/gpu_check.sh --smoke              # the same parts at smoke size (CPU, ~40 s of CPU)
# Without a GPU the parts run at smoke size on the CPU (the GPU tests skip), each limited to 150 s:
# a check of the script itself, which tests/test_gpu_check.py runs. Exit status: 0 when every part is ok, else 1.
set -uo pipefail

source "$(dirname "$0")/_gpu_env.sh"
if [ "${1:-}" = "--smoke" ]; then
    GPU=0
    TAG=cpu_smoke
fi
MODE=$([ "$GPU" = 1 ] && echo gpu || echo cpu-smoke)
log_environment "$OUT_DIR/gpu_check_environment.log" >/dev/null
PARTS=(tests attention conv matmul lstm train_step)
python3 bench/gpu_check_report.py start "$OUT_DIR" --mode "$MODE" --parts "${PARTS[@]}" || exit 1
failed=()

# run_part NAME LIMIT_S "ARTIFACT ..." COMMAND...: run COMMAND under a hard limit, log it, record it.
run_part() {
    local name=$1 limit=$2 artifacts=$3
    shift 3
    local log="gpu_check_${name}.log" start=$SECONDS
    echo "== $name: limit ${limit} s ($((SECONDS - T0)) s so far)"
    timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/$log" 2>&1
    local rc=$?
    tail -n 4 "$OUT_DIR/$log"
    # shellcheck disable=SC2086  # artifacts: a space-separated list
    python3 bench/gpu_check_report.py part "$OUT_DIR" "$name" "$rc" "$((SECONDS - start))" \
        "$log" $artifacts
    [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
}

if [ "$GPU" = 1 ]; then
    limits=(140 70 45 40 30 125)
    attention_args=(--dtypes bf16 --head-dims 128 64 --causal both --seqs 1024 2048 4096 8192
                    --time-budget-s 55 --warmup-ms 5 --rep-ms 20)
    conv_args=(--shapes resnet50 --batch 32 --dtypes bf16 --time-budget-s 35 --warmup 5 --rep 20)
    matmul_args=(--sizes 4096 8192 --tp 2 --dtype bf16 --warmup 10 --rep 40)
    lstm_args=(--hidden 256 1024 --batch 32 128 --length 128 --dtype bf16 --iters 10 --warmup 2)
    lstm_name=lstm_gpu
    train_args=(--model 125m --batch 16 --warmup 3 --steps 10)
else  # seconds of CPU each, but generous limits: a shared CI machine may be slow
    limits=(150 150 150 150 150 150)
    attention_args=(--smoke --backend ref --modes fwd --no-plot)
    conv_args=(--smoke --no-plot)
    matmul_args=(--smoke)
    lstm_args=(--smoke)
    lstm_name=lstm_smoke
    train_args=(--smoke)
fi

run_part tests "${limits[0]}" "" env TPL_ATTENTION_AUTOTUNE=0 TPL_CONV_AUTOTUNE=0 \
    python3 -m pytest -m gpu tests -q -p no:cacheprovider
run_part attention "${limits[1]}" "attention_${TAG}.json attention_${TAG}.png" \
    python3 bench/bench_attention.py "${attention_args[@]}" --out-dir "$OUT_DIR" --tag "$TAG"
run_part conv "${limits[2]}" "conv_${TAG}.json" \
    python3 bench/bench_conv.py "${conv_args[@]}" --out "$OUT_DIR" --tag "conv_${TAG}"
run_part matmul "${limits[3]}" "matmul_${TAG}.json matmul_${TAG}.png" \
    python3 bench/bench_matmul.py "${matmul_args[@]}" --out "$OUT_DIR" --tag "$TAG"
run_part lstm "${limits[4]}" "${lstm_name}.json" \
    python3 bench/bench_lstm.py "${lstm_args[@]}" --out "$OUT_DIR"
run_part train_step "${limits[5]}" "train_step_${TAG}.json" \
    python3 bench/bench_train_step.py "${train_args[@]}" --out "$OUT_DIR" --tag "$TAG"

echo "== done in $((SECONDS - T0)) s: $OUT_DIR/gpu_check.md"
cat "$OUT_DIR/gpu_check.md"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "not ok: ${failed[*]}" >&2
    exit 1
fi
