"""The Triton GEMM of ``kernels/matmul.py`` against cuBLAS, and the cost of cutting a GEMM in chunks.

Two measurements on one GPU:

1. **Triton vs cuBLAS**: ``out = x @ w.T`` with ``x (S, S)``, ``w (S, S)`` (``--sizes``, default
   4096 and 8192, bf16), both writing into a preallocated output: :func:`triton_parallel_layers.kernels.matmul.matmul`
   against ``torch.mm(x, w.t(), out=...)``. Also the fused epilogue, ``x @ w.T + bias + partial``
   in one kernel, against ``torch.addmm`` followed by an add. Goal: the Triton kernel at
   >= 0.9x cuBLAS's TFLOP/s.
2. **The decomposition**: the overlapped collective matmuls replace one GEMM of ``S`` rows by
   ``tp`` GEMMs of ``S/tp`` rows written into slices of the output (all-gather + matmul,
   forward), and the weight gradient ``g.T @ x`` by ``tp`` GEMMs of reduction length ``S/tp``
   accumulated in fp32 (``partial=out``). On one GPU and without communication, the ratio
   ``t(tp chunks) / t(one GEMM)`` is what the decomposition costs; it must be well below what
   overlapping the communication saves. Measured for Triton and for cuBLAS (``torch.mm`` into
   row slices; ``addmm_`` for the accumulation, in the operand dtype as torch needs).

Timing: ``triton.testing.do_bench`` (median) on CUDA; on CPU a ``perf_counter`` loop over the
Triton interpreter and torch, which exists only so ``--smoke`` can check this script without a
GPU.

Usage (from the repository root; the package need not be installed)::

    PYTHONPATH=$PWD python3 bench/bench_matmul.py                    # GPU: 4096^3, 8192^3 bf16
    PYTHONPATH=$PWD python3 bench/bench_matmul.py --sizes 4096 --tp 2 4 --dtype fp16
    python3 bench/bench_matmul.py --smoke --out /tmp/mm              # CPU, seconds

Output: ``<out>/matmul_<tag>.json`` (GPU name, torch/triton versions, date, all numbers) and
``.png``. ``bench/gpu_check.sh`` runs the GPU tests and this benchmark on one GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from triton_parallel_layers.kernels import force_backend  # noqa: E402
from triton_parallel_layers.kernels.matmul import matmul  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def bench_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    """Median milliseconds per call."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def _triton(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with force_backend("triton"):
            return fn()

    return call


def vs_cublas(size: int, dtype: torch.dtype, warmup: int, rep: int) -> list[dict]:
    """``(S, S) @ (S, S).T`` and the fused bias+partial epilogue, Triton vs cuBLAS."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(size, size, device=dev, generator=gen).to(dtype)
    w = torch.randn(size, size, device=dev, generator=gen).to(dtype) / size**0.5
    bias = torch.randn(size, device=dev, generator=gen).to(dtype)
    partial = torch.randn(size, size, device=dev, generator=gen).to(dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    flops = 2.0 * size**3
    rows = []
    cases = {
        "plain": (
            _triton(lambda: matmul(x, w, out=out)),
            lambda: torch.mm(x, w.t(), out=out),  # (S, S) @ (S, S)
        ),
        "bias+partial": (
            _triton(lambda: matmul(x, w, bias, partial=partial, out=out)),
            lambda: torch.addmm(bias, x, w.t(), out=out).add_(partial),
        ),
    }
    for epilogue, (ours, theirs) in cases.items():
        t_triton, t_cublas = bench_ms(ours, warmup, rep), bench_ms(theirs, warmup, rep)
        rows.append(
            {
                "size": size,
                "dtype": str(dtype).removeprefix("torch."),
                "epilogue": epilogue,
                "triton_ms": t_triton,
                "cublas_ms": t_cublas,
                "triton_tflops": tflops(flops, t_triton),
                "cublas_tflops": tflops(flops, t_cublas),
                "triton_vs_cublas": t_cublas / t_triton,  # > 1: Triton faster
            }
        )
        print(
            f"S={size} {rows[-1]['dtype']} {epilogue:13s} triton {t_triton:8.3f} ms "
            f"({rows[-1]['triton_tflops']:6.1f} TFLOP/s)  cublas {t_cublas:8.3f} ms "
            f"({rows[-1]['cublas_tflops']:6.1f} TFLOP/s)  ratio {rows[-1]['triton_vs_cublas']:.3f}",
            flush=True,
        )
    return rows


def decomposition(size: int, tp: int, dtype: torch.dtype, warmup: int, rep: int) -> list[dict]:
    """One GEMM vs ``tp`` row-chunk GEMMs into slices, and the chunked fp32 weight gradient."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(size, size, device=dev, generator=gen).to(dtype)  # (M, K), M = S tokens
    w = torch.randn(size, size, device=dev, generator=gen).to(dtype) / size**0.5  # (N, K)
    g = torch.randn(size, size, device=dev, generator=gen).to(dtype)  # (M, N) output gradient
    out = torch.empty(size, size, device=dev, dtype=dtype)
    out3 = out.view(tp, size // tp, size)  # (tp, M/tp, N): chunk c's rows
    acc = torch.zeros(size, size, device=dev, dtype=torch.float32)  # (N, K) weight gradient
    xs, gs = x.chunk(tp), g.chunk(tp)  # tp x (M/tp, K), tp x (M/tp, N)

    def fwd_chunks_triton():
        for c in range(tp):
            matmul(xs[c], w, out=out3[c])  # (M/tp, K) @ (K, N) into rows of chunk c

    def fwd_chunks_cublas():
        for c in range(tp):
            torch.mm(xs[c], w.t(), out=out3[c])

    def wgrad_chunks_triton():
        for c in range(tp):
            matmul(gs[c].t(), xs[c].t(), partial=acc, out=acc)  # acc += (N, M/tp) @ (M/tp, K)

    acc_lo = torch.zeros(size, size, device=dev, dtype=dtype)  # (N, K) for cuBLAS, see below

    def wgrad_chunks_cublas():
        # torch's addmm_ needs one dtype, so cuBLAS accumulates in the operand dtype: the same
        # GEMMs and traffic but for the accumulator's width (the timing is what is compared).
        for c in range(tp):
            acc_lo.addmm_(gs[c].t(), xs[c])  # acc += (N, M/tp) @ (M/tp, K)

    def wgrad_one_triton():
        matmul(g.t(), x.t(), out=acc)  # (N, M) @ (M, K) -> fp32

    def wgrad_one_cublas():
        torch.mm(g.t(), x, out=acc_lo)  # (N, M) @ (M, K)

    rows = []
    cases = {
        "fwd_row_chunks": (
            (_triton(lambda: matmul(x, w, out=out)), _triton(fwd_chunks_triton)),
            (lambda: torch.mm(x, w.t(), out=out), fwd_chunks_cublas),
        ),
        "wgrad_fp32_accumulation": (
            (_triton(wgrad_one_triton), _triton(wgrad_chunks_triton)),
            (wgrad_one_cublas, wgrad_chunks_cublas),
        ),
    }
    for what, ((t1, tc), (c1, cc)) in cases.items():
        t_one, t_chunks = bench_ms(t1, warmup, rep), bench_ms(tc, warmup, rep)
        c_one, c_chunks = bench_ms(c1, warmup, rep), bench_ms(cc, warmup, rep)
        rows.append(
            {
                "size": size,
                "tp": tp,
                "dtype": str(dtype).removeprefix("torch."),
                "what": what,
                "triton_one_ms": t_one,
                "triton_chunks_ms": t_chunks,
                "triton_overhead": t_chunks / t_one,
                "cublas_one_ms": c_one,
                "cublas_chunks_ms": c_chunks,
                "cublas_overhead": c_chunks / c_one,
            }
        )
        print(
            f"S={size} tp={tp} {what:24s} triton x{t_chunks / t_one:.3f} "
            f"({t_one:.3f} -> {t_chunks:.3f} ms)  cublas x{c_chunks / c_one:.3f} "
            f"({c_one:.3f} -> {c_chunks:.3f} ms)",
            flush=True,
        )
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = report["vs_cublas"]
    labels = [f"{r['size']}^3\n{r['epilogue']}" for r in rows]
    xs = range(len(rows))
    ax1.bar([i - 0.2 for i in xs], [r["triton_tflops"] for r in rows], 0.4, label="Triton")
    ax1.bar([i + 0.2 for i in xs], [r["cublas_tflops"] for r in rows], 0.4, label="cuBLAS")
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['triton_vs_cublas']:.2f}x", (i, r["triton_tflops"]), ha="center")
    ax1.set_xticks(list(xs), labels, fontsize=8)
    ax1.set_ylabel("TFLOP/s")
    ax1.set_title(f"GEMM {rows[0]['dtype'] if rows else ''}: Triton vs cuBLAS")
    ax1.legend()
    for what, marker in (("fwd_row_chunks", "o"), ("wgrad_fp32_accumulation", "s")):
        for size in sorted({r["size"] for r in report["decomposition"]}):
            mine = [r for r in report["decomposition"] if r["what"] == what and r["size"] == size]
            tps = [r["tp"] for r in mine]
            ax2.plot(
                tps,
                [r["triton_overhead"] for r in mine],
                marker + "-",
                label=f"Triton {what} S={size}",
            )
            ax2.plot(
                tps,
                [r["cublas_overhead"] for r in mine],
                marker + "--",
                label=f"cuBLAS {what} S={size}",
            )
    ax2.axhline(1, color="k", lw=0.5)
    ax2.set_xlabel("tp (chunks)")
    ax2.set_ylabel("t(tp chunks) / t(one GEMM)")
    ax2.set_title("cost of the decomposition, one GPU")
    ax2.legend(fontsize=6)
    fig.suptitle(
        f"{report['device']}, torch {report['torch']}, triton {report['triton']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition, ms")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default=None, help="file name: matmul_<tag>.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.smoke:
        args.sizes, args.tp = [64], [2]
        if not torch.cuda.is_available():
            dtype = torch.float32  # the interpreter has no bf16 arithmetic
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA GPU: only --smoke runs on the CPU")
    tag = args.tag or ("smoke" if args.smoke else "h200" if "H200" in device_name() else "gpu")

    t0 = time.perf_counter()
    report = {
        "benchmark": "triton_gemm_vs_cublas_and_decomposition",
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "vs_cublas": [],
        "decomposition": [],
    }
    for size in args.sizes:
        report["vs_cublas"] += vs_cublas(size, dtype, args.warmup, args.rep)
    for size in args.sizes:
        for tp in args.tp:
            if size % tp == 0:
                report["decomposition"] += decomposition(size, tp, dtype, args.warmup, args.rep)
    plain = [r["triton_vs_cublas"] for r in report["vs_cublas"] if r["epilogue"] == "plain"]
    report["min_triton_vs_cublas_plain"] = min(plain) if plain else None
    report["goal_0p9_met"] = bool(plain) and min(plain) >= 0.9
    report["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"matmul_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
