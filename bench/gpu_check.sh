#!/usr/bin/env bash
# The GPU check: everything the package has to show on one GPU (389 s on one H200, 2026-11-30,
# three parts cut at their limits).
#
#   part         limit  what
#   tests        150 s  every GPU test: python3 -m pytest -m gpu tests (one tile configuration per
#                       kernel, TPL_ATTENTION_AUTOTUNE=0 TPL_CONV_AUTOTUNE=0, to bound compile time)
#   attention    100 s  bench/bench_attention.py: forward and backward against every SDPA backend,
#                       bf16, seq 1k-8k, head dims 64 and 128, causal and not (autotuned)
#   conv          80 s  bench/bench_conv.py: conv+bias+ReLU against cuDNN and torch.compile on
#                       ResNet-50's shapes, channels_last bf16, batch 32
#   matmul        30 s  bench/bench_matmul.py: the GEMM against cuBLAS at 4096^3 and 8192^3, bf16
#   lstm          20 s  bench/bench_lstm.py: one LSTM layer, the fused Triton cell against cuDNN's
#                       nn.LSTM and the unfused torch cell, bf16, hidden 256/1024, batch 32/128
#   train_step    90 s  bench/bench_train_step.py: one bf16 training step of the GPT 125M preset,
#                       eager, then torch.compile'd (Inductor compiles the step, the attention
#                       kernel autotunes): tokens/s and MFU
#   train_cli     45 s  the Quickstart's training command on this one GPU: torchrun, NCCL (world
#                       size 1), the 125M preset in bf16 for 30 steps, evaluation, checkpoint,
#                       sample; its summary.json, metrics.jsonl and loss.png (not the checkpoint)
#
# The limits are hard (timeout(1), then SIGKILL 5 s later) and add up to 515 s (550 s at worst).
# They follow the H200 runs' times (tests 138 s, train_step 74 s, train_cli 28 s, matmul 24 s,
# lstm 16 s), moving time to the two parts those runs cut short (attention at 70 s, conv at 45 s);
# the benchmarks also get a time budget inside their limit, so a slow machine gives fewer grid
# points rather than a timeout. After each part the report is rewritten: OUT_DIR/gpu_check.json
# and gpu_check.md (bench/gpu_check_report.py) hold every part's status (ok, failed, timeout,
# pending), time, log and result files, so a run cut short still reports what finished.
#
# Usage, from anywhere (no network, package not installed; needs torch, triton, pytest, matplotlib):
#   OUT=/some/dir bash bench/gpu_check.sh        # results in $OUT (default bench/results)
#   bash bench/gpu_check.sh --smoke              # the same parts at smoke size (CPU, ~40 s of CPU)
#   bash bench/gpu_check.sh --parts "matmul conv"  # only these parts (a re-check after a fix)
#   GPU_TESTS="tests/test_matmul.py" bash bench/gpu_check.sh --parts tests  # the tests part on these
# Without a GPU the parts run at smoke size on the CPU (the GPU tests skip), each limited to 150 s:
# a check of the script itself, which tests/test_gpu_check.py runs. Exit status: 0 when every part is ok, else 1.
set -uo pipefail

ALL_PARTS=(tests attention conv matmul lstm train_step train_cli)
PARTS=("${ALL_PARTS[@]}")
smoke=0
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) smoke=1 ;;
        --parts)
            [ $# -ge 2 ] || { echo "--parts needs a list, of: ${ALL_PARTS[*]}" >&2; exit 2; }
            read -ra PARTS <<<"$2"
            for part in "${PARTS[@]}"; do
                [[ " ${ALL_PARTS[*]} " == *" $part "* ]] ||
                    { echo "--parts: unknown part '$part'; expected some of: ${ALL_PARTS[*]}" >&2; exit 2; }
            done
            shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument '$1'; expected --smoke, --parts \"PART ...\" or --help" >&2; exit 2 ;;
    esac
    shift
done

source "$(dirname "$0")/_gpu_env.sh"
if [ "$smoke" = 1 ]; then
    GPU=0
    TAG=cpu_smoke
fi
MODE=$([ "$GPU" = 1 ] && echo gpu || echo cpu-smoke)
log_environment "$OUT_DIR/gpu_check_environment.log" >/dev/null
python3 bench/gpu_check_report.py start "$OUT_DIR" --mode "$MODE" --parts "${PARTS[@]}" || exit 1
failed=()

# run_part NAME LIMIT_S "ARTIFACT ..." COMMAND...: run COMMAND under a hard limit, log it, record it.
run_part() {
    local name=$1 limit=$2 artifacts=$3
    shift 3
    [[ " ${PARTS[*]} " == *" $name "* ]] || return 0  # not selected (--parts)
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
    limits=(150 100 80 30 20 90 45)
    attention_args=(--dtypes bf16 --head-dims 128 64 --causal both --seqs 1024 2048 4096 8192
                    --time-budget-s 80 --warmup-ms 5 --rep-ms 20)
    conv_args=(--shapes resnet50 --batch 32 --dtypes bf16 --time-budget-s 60 --warmup 5 --rep 20)
    matmul_args=(--sizes 4096 8192 --tp 2 --dtype bf16 --warmup 10 --rep 40)
    lstm_args=(--hidden 256 1024 --batch 32 128 --length 128 --dtype bf16 --iters 10 --warmup 2)
    lstm_name=lstm_gpu
    train_args=(--model 125m --batch 16 --warmup 3 --steps 10)
    cli_args=(--model 125m --max-steps 30 --batch-size 16 --data-bytes 4000000 --eval-batches 2
              --sample-tokens 60)
else  # seconds of CPU each, but generous limits: a shared CI machine may be slow
    limits=(150 150 150 150 150 150 150)
    attention_args=(--smoke --backend ref --modes fwd --no-plot)
    conv_args=(--smoke --no-plot)
    matmul_args=(--smoke)
    lstm_args=(--smoke)
    lstm_name=lstm_smoke
    train_args=(--smoke)
    cli_args=(--model tiny --max-steps 3 --batch-size 4 --data-bytes 200000 --eval-batches 1
              --sample-tokens 10)
fi

run_part tests "${limits[0]}" "" env TPL_ATTENTION_AUTOTUNE=0 TPL_CONV_AUTOTUNE=0 \
    python3 -m pytest -m gpu ${GPU_TESTS:-tests} -q -p no:cacheprovider
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
# The run folder's checkpoint (1.5 GB at 125m) is deleted; the rest is the part's result.
run_part train_cli "${limits[6]}" \
    "train_cli/summary.json train_cli/metrics.jsonl train_cli/loss.png" \
    python3 -m torch.distributed.run --standalone --nproc-per-node=1 scripts/train_gpt.py \
    "${cli_args[@]}" --eval-interval 0 --ckpt-interval 0 --out "$OUT_DIR/train_cli"
rm -rf "$OUT_DIR/train_cli/checkpoints"  # also when not selected: no stale 1.5 GB left

echo "== done in $((SECONDS - T0)) s: $OUT_DIR/gpu_check.md"
cat "$OUT_DIR/gpu_check.md"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "not ok: ${failed[*]}" >&2
    exit 1
fi
