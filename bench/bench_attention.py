"""Benchmark :func:`triton_parallel_layers.kernels.flash_attention` against PyTorch's SDPA backends.

For every (dtype, head dim, causal, sequence length) of the grid and every provider, measures the
forward, the backward and forward+backward, and reports TFLOP/s:

* ``flash``: this package's Triton kernel (on CUDA; ``--backend ref`` times the torch reference),
* ``sdpa-math``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``: ``F.scaled_dot_product_attention``
  pinned to one backend with ``torch.nn.attention.sdpa_kernel``. A backend that errors for a shape
  (unsupported dtype/head dim/device) is skipped and the reason recorded in the JSON.

FLOPs (the FlashAttention convention): forward ``4 * B * H * Sq * Sk * D`` (two matmuls, 2 flops
per multiply-add), halved when causal; backward ``2.5x`` the forward (five matmuls of the same
size; recomputation is not counted); forward+backward ``3.5x``. Sizes follow flash-attention's
benchmark: ``B = --tokens // seq`` sequences of ``H = --model-dim // D`` heads, so every point
does the same work per token.

Timing: ``triton.testing.do_bench`` (median, gradients reset between calls) on CUDA; a plain
``perf_counter`` loop on CPU, which only exists so ``--smoke`` can run in the test suite.

Output: ``<out-dir>/attention[_<tag>].json`` (GPU name, torch and triton versions, date, the
arguments, every measurement and every skipped provider with its reason) and ``.png`` (TFLOP/s
against sequence length, one panel per dtype/head dim/causal and mode).

Usage (from the repository root; the package need not be installed)::

    PYTHONPATH=$PWD python3 bench/bench_attention.py                      # the full grid, GPU
    PYTHONPATH=$PWD python3 bench/bench_attention.py --seqs 1024 4096 --head-dims 128 \\
        --dtypes bf16 --causal true --providers flash sdpa-flash --time-budget-s 60
    PYTHONPATH=$PWD python3 bench/bench_attention.py --smoke --out-dir /tmp/attn   # CPU, seconds

``bench/gpu_check.sh`` runs the GPU tests and a sized grid on one GPU.

pytest-benchmark: the statistics-style entry is ``test_pytest_benchmark_flash_attention`` in
``tests/test_attention.py`` (marked ``gpu``, parametrized over provider and mode, defined only
when pytest-benchmark is installed); run it with
``python3 -m pytest -m gpu tests/test_attention.py -k pytest_benchmark --benchmark-only``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from triton_parallel_layers.kernels import (
    flash_attention,
    force_backend,
    interpreter_enabled,
    use_triton,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd_bwd")
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # relative to the forward's flops
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"


def _sdpa_backends() -> dict[str, object]:
    """Provider name -> ``SDPBackend`` member, for the members this torch has."""
    from torch.nn.attention import SDPBackend

    names = {
        "sdpa-math": "MATH",
        "sdpa-flash": "FLASH_ATTENTION",
        "sdpa-efficient": "EFFICIENT_ATTENTION",
        "sdpa-cudnn": "CUDNN_ATTENTION",
    }
    return {p: getattr(SDPBackend, m) for p, m in names.items() if hasattr(SDPBackend, m)}


PROVIDERS = ("flash", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool):
    """Forward FLOPs: two (Sq x Sk x D) matmuls per head, halved when causal."""
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    return flops / 2 if causal else flops


def make_provider(name: str, causal: bool, backend: str) -> Callable:
    """A callable ``(q, k, v) -> out`` for provider ``name``."""
    if name == "flash":

        def run(q, k, v):
            with force_backend(backend):
                return flash_attention(q, k, v, causal=causal)

        return run
    from torch.nn.attention import sdpa_kernel

    sdpa_backend = _sdpa_backends()[name]

    def run(q, k, v):
        with sdpa_kernel([sdpa_backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def time_ms(
    fn: Callable[[], object],
    *,
    device: torch.device,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: list[torch.Tensor],
) -> float:
    """Median milliseconds per call of ``fn``."""
    if device.type == "cuda":
        return float(
            triton.testing.do_bench(
                fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    for i in range(100):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if i >= 1 and time.perf_counter() > deadline:
            break
    return statistics.median(times[1:] if len(times) > 1 else times)  # the first call warms up


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def run_grid(
    args: argparse.Namespace,
    device: torch.device,
    on_point: Callable[[list, list, bool], None] | None = None,
) -> tuple[list, list, bool]:
    """Measure the whole grid. Returns (results, skipped, budget_exhausted).

    ``on_point(results, skipped, budget_exhausted)`` runs after every grid point (the CLI saves
    the JSON there, so a run killed from outside keeps what it measured).
    """
    results: list[dict] = []
    skipped: list[dict] = []
    start = time.perf_counter()
    exhausted = False
    causal_values = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for head_dim in args.head_dims:
            for causal in causal_values:
                for seq in args.seqs:
                    point = {
                        "dtype": dtype_name,
                        "head_dim": head_dim,
                        "causal": causal,
                        "seq": seq,
                    }
                    if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                        exhausted = True
                        skipped.append({**point, "provider": "*", "reason": "time budget spent"})
                        continue
                    _measure_point(args, device, dtype, point, results, skipped)
                    if on_point is not None:
                        on_point(results, skipped, exhausted)
    return results, skipped, exhausted


def _measure_point(args, device, dtype, point, results, skipped) -> None:
    seq, head_dim, causal = point["seq"], point["head_dim"], point["causal"]
    batch = max(1, args.tokens // seq)
    heads = max(1, args.model_dim // head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, heads, seq, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    fwd_flops = attention_flops(batch, heads, seq, seq, head_dim, causal)
    with torch.no_grad():  # the reference for the error column: SDPA with torch's own choice
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()

    for provider in args.providers:
        where = {**point, "provider": provider}
        if provider == "sdpa-math" and seq > args.math_max_seq:
            skipped.append({**where, "reason": f"seq {seq} > --math-max-seq {args.math_max_seq}"})
            continue
        if provider != "flash" and provider not in _sdpa_backends():
            skipped.append({**where, "reason": "this torch has no such SDPA backend"})
            continue
        fn = make_provider(provider, causal, args.backend)
        try:  # one checked call first: an unsupported backend raises here
            with warnings.catch_warnings(record=True) as caught:  # SDPA says why in warnings
                warnings.simplefilter("always")
                out = fn(q, k, v)
                out.backward(dout)
            err = (out.detach().float() - expected).abs().max().item()
        except Exception as e:  # noqa: BLE001 - any failure means "this backend cannot run this"
            why = [
                str(w.message).splitlines()[0][:200] for w in caught if "not used" in str(w.message)
            ]
            skipped.append({**where, "reason": "; ".join([_short(e), *why])})
            continue
        finally:
            for t in (q, k, v):
                t.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
        with force_backend(args.backend):
            path = ("triton" if use_triton(q) else "ref") if provider == "flash" else "sdpa"
        out = fn(q, k, v)  # kept alive for the backward-only timing
        timers = {
            "fwd": lambda fn=fn: fn(q, k, v),
            "bwd": lambda out=out: out.backward(dout, retain_graph=True),
            "fwd_bwd": lambda fn=fn: fn(q, k, v).backward(dout),
        }
        for mode in args.modes:
            try:
                ms = time_ms(
                    timers[mode],
                    device=device,
                    warmup_ms=args.warmup_ms,
                    rep_ms=args.rep_ms,
                    grad_to_none=[q, k, v],
                )
            except Exception as e:  # noqa: BLE001 - e.g. out of memory in one mode
                skipped.append({**where, "mode": mode, "reason": _short(e)})
                continue
            tflops = fwd_flops * FLOPS_FACTOR[mode] / (ms * 1e-3) / 1e12
            row = {
                **where,
                "mode": mode,
                "batch": batch,
                "heads": heads,
                "path": path,
                "ms": ms,
                "tflops": tflops,
                "max_abs_err_vs_sdpa": err,
            }
            results.append(row)
            print(
                f"{point['dtype']:>4} d={head_dim:<3} causal={causal!s:<5} seq={seq:<6} "
                f"{provider:<15} {mode:<7} {ms:9.3f} ms {tflops:8.2f} TFLOP/s  err={err:.1e}",
                flush=True,
            )
        del out
        for t in (q, k, v):
            t.grad = None


def plot(results: list[dict], path: Path, title: str) -> None:
    """TFLOP/s against sequence length: a row per (dtype, head dim, causal), a column per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in results})
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    if not rows or not modes:
        return
    fig, axes = plt.subplots(
        len(rows), len(modes), figsize=(4.5 * len(modes), 3.2 * len(rows)), squeeze=False
    )
    for i, (dtype, head_dim, causal) in enumerate(rows):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [
                r
                for r in results
                if (r["dtype"], r["head_dim"], r["causal"], r["mode"])
                == (dtype, head_dim, causal, mode)
            ]
            for provider in sorted({r["provider"] for r in sel}):
                pts = sorted((r["seq"], r["tflops"]) for r in sel if r["provider"] == provider)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(
                f"{dtype} d={head_dim} {'causal' if causal else 'full'} {mode}", fontsize=9
            )
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", choices=["both", "true", "false"], default="both")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument(
        "--math-max-seq", type=int, default=2048, help="skip sdpa-math above this (S x S memory)"
    )
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="start no new grid point after this many seconds (0: no limit); skipped points "
        "are listed in the JSON",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "triton", "ref"],
        default="auto",
        help="triton_parallel_layers.kernels.force_backend for the flash provider",
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny fp32 grid on the CPU (for the test suite): seq 32, head dim 16, 2 heads",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.seqs, args.head_dims, args.dtypes = [32], [16], ["fp32"]
        args.tokens, args.model_dim = 32, 32
        args.warmup_ms, args.rep_ms = 0.0, 50.0
        args.tag = args.tag or "smoke"
    return args


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the benchmark; returns the paths written (``json`` and, unless disabled, ``png``)."""
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "attention" + (f"_{args.tag}" if args.tag else "")
    paths = {"json": args.out_dir / f"{stem}.json"}
    meta = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu)",
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": interpreter_enabled(),
        "flops": "fwd 4*B*H*Sq*Sk*D (x0.5 causal); bwd 2.5x fwd; fwd_bwd 3.5x fwd",
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    def save(results: list, skipped: list, exhausted: bool, complete: bool = False) -> None:
        meta["elapsed_s"] = round(time.perf_counter() - started, 1)
        meta["time_budget_exhausted"] = exhausted
        meta["complete"] = complete  # False in a file left by a run that did not finish
        payload = {"meta": meta, "results": results, "skipped": skipped}
        paths["json"].write_text(json.dumps(payload, indent=1))

    results, skipped, exhausted = run_grid(args, device, on_point=save)
    save(results, skipped, exhausted, complete=True)
    if not args.no_plot:
        paths["png"] = args.out_dir / f"{stem}.png"
        plot(results, paths["png"], f"flash_attention vs SDPA on {meta['gpu']} ({meta['date']})")
    reasons = sorted({(s["provider"], s["reason"]) for s in skipped})
    for provider, reason in reasons:
        print(f"skipped {provider}: {reason}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
