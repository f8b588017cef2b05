# Sourced by bench/gpu_check.sh: the set-up of the GPU check.
#
# Leaves the shell in the repository root with the package importable (PYTHONPATH; no install,
# no network), the compiled Triton path selected, and:
#   OUT_DIR   where results go: $OUT, else bench/results
#   GPU       1 with a CUDA GPU, 0 without (the checks then run at smoke size on the CPU)
#   TAG       file-name tag of the results: $TAG, else h200 (GPU) or cpu_smoke (CPU)
#   T0        $SECONDS at the start, for "s so far" lines
# and defines log_environment FILE: the date, the GPU and the versions, written to FILE.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET          # compiled kernels on the GPU (tests/conftest.py sets it on CPU)
export TPL_KERNEL_BACKEND=auto  # CUDA tensors take the Triton path

if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    GPU=1
    TAG="${TAG:-h200}"
else
    GPU=0
    TAG="${TAG:-cpu_smoke}"
    echo "no CUDA GPU: the GPU tests skip and the steps run at smoke size on the CPU" >&2
fi
T0=$SECONDS

log_environment() {
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ"
        if [ "$GPU" = 1 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
        python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    } 2>&1 | tee "$1"
}
