"""Benchmark of the fused conv2d + bias + ReLU kernel (kernels/conv.py).

Providers, all computing ``relu(conv2d(x, w, b))`` on channels_last fp16/bf16 tensors:

* ``triton``  -- ``triton_parallel_layers.kernels.conv2d_bias_relu`` (Triton forward, cuDNN backward);
* ``torch``   -- ``F.relu(F.conv2d(...))``, i.e. cuDNN plus a separate ReLU kernel
  (``torch.backends.cudnn.benchmark = True``, so cuDNN picks its best algorithm as we autotune);
* ``compile`` -- ``torch.compile`` of the same two calls (static shapes, recompiled per shape).

Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (backward alone) and
``fwd+bwd``. TFLOP/s counts 2*N*OH*OW*K*C*KH*KW for the forward and twice that for the backward
(input and weight gradients; every input requires grad, the stem's included).

Shapes: the 23 distinct convolutions of ResNet-50 (torchvision, stride in the 3x3; ``count`` is
how often each occurs among its 53 convs, used for the weighted whole-network sum in the JSON),
a 7-shape subset ``resnet50-small``, and the example CNN's first conv (``seed``: 1->32 channels,
3x3, padding 1, 28x28).

Usage (from the repository root; the package need not be installed):

    python bench/bench_conv.py                                   # everything, batch 32 and 128
    python bench/bench_conv.py --shapes resnet50-small,seed --batch 128 --dtypes bf16
    python bench/bench_conv.py --providers triton,torch --out /tmp/results
    python bench/bench_conv.py --smoke                           # tiny CPU run (interpreter)
    python -m pytest bench/bench_conv.py -m gpu --benchmark-only # pytest-benchmark entry

Results: ``<out>/conv_<device>.json`` (GPU name, torch/triton versions, date, one row per
shape x batch x dtype x provider x mode, plus the weighted ResNet-50 sums, errors and cases skipped
for time) and one PNG per dtype x batch (``<stem>.png`` when there is one), under
``bench/results/`` by default. The JSON is rewritten after every shape, so an interrupted run
keeps what it measured.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Without a GPU only the smoke mode runs, on Triton's interpreter, which must be switched on
    # before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from triton_parallel_layers.kernels import conv2d_bias_relu, force_backend  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDERS = ("triton", "torch", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class ConvShape:
    """One convolution: x (N, c, h, w) -> (N, k, OH, OW) with a kernel x kernel filter."""

    name: str
    c: int
    h: int
    w: int
    k: int
    kernel: int
    stride: int = 1
    padding: int = 0
    count: int = 1  # occurrences in the network (weights the whole-network sum)

    def out_hw(self) -> tuple[int, int]:
        oh = (self.h + 2 * self.padding - self.kernel) // self.stride + 1
        ow = (self.w + 2 * self.padding - self.kernel) // self.stride + 1
        return oh, ow

    def flops(self, batch: int) -> int:
        """Forward FLOPs: 2 * N*OH*OW * K * C*KH*KW (multiply-adds of the implicit GEMM)."""
        oh, ow = self.out_hw()
        return 2 * batch * oh * ow * self.k * self.c * self.kernel * self.kernel


# The distinct convolutions of ResNet-50 at 224x224 (torchvision: the stride sits in the 3x3).
RESNET50 = [
    ConvShape("stem 7x7/2", 3, 224, 224, 64, 7, 2, 3, 1),
    ConvShape("l1 1x1 64-64", 64, 56, 56, 64, 1, 1, 0, 1),
    ConvShape("l1 3x3 64", 64, 56, 56, 64, 3, 1, 1, 3),
    ConvShape("l1 1x1 64-256", 64, 56, 56, 256, 1, 1, 0, 4),  # 3 expansions + 1 downsample
    ConvShape("l1 1x1 256-64", 256, 56, 56, 64, 1, 1, 0, 2),
    ConvShape("l2 1x1 256-128", 256, 56, 56, 128, 1, 1, 0, 1),
    ConvShape("l2 3x3/2 128", 128, 56, 56, 128, 3, 2, 1, 1),
    ConvShape("l2 1x1 128-512", 128, 28, 28, 512, 1, 1, 0, 4),
    ConvShape("l2 down 1x1/2 256-512", 256, 56, 56, 512, 1, 2, 0, 1),
    ConvShape("l2 1x1 512-128", 512, 28, 28, 128, 1, 1, 0, 3),
    ConvShape("l2 3x3 128", 128, 28, 28, 128, 3, 1, 1, 3),
    ConvShape("l3 1x1 512-256", 512, 28, 28, 256, 1, 1, 0, 1),
    ConvShape("l3 3x3/2 256", 256, 28, 28, 256, 3, 2, 1, 1),
    ConvShape("l3 1x1 256-1024", 256, 14, 14, 1024, 1, 1, 0, 6),
    ConvShape("l3 down 1x1/2 512-1024", 512, 28, 28, 1024, 1, 2, 0, 1),
    ConvShape("l3 1x1 1024-256", 1024, 14, 14, 256, 1, 1, 0, 5),
    ConvShape("l3 3x3 256", 256, 14, 14, 256, 3, 1, 1, 5),
    ConvShape("l4 1x1 1024-512", 1024, 14, 14, 512, 1, 1, 0, 1),
    ConvShape("l4 3x3/2 512", 512, 14, 14, 512, 3, 2, 1, 1),
    ConvShape("l4 1x1 512-2048", 512, 7, 7, 2048, 1, 1, 0, 3),
    ConvShape("l4 down 1x1/2 1024-2048", 1024, 14, 14, 2048, 1, 2, 0, 1),
    ConvShape("l4 1x1 2048-512", 2048, 7, 7, 512, 1, 1, 0, 2),
    ConvShape("l4 3x3 512", 512, 7, 7, 512, 3, 1, 1, 2),
]
assert sum(s.count for s in RESNET50) == 53  # ResNet-50's conv layers

# One shape per kind of layer: stem, 3x3, strided 3x3, 1x1 in/out, strided 1x1, small 7x7 map.
RESNET50_SMALL = [RESNET50[i] for i in (0, 2, 3, 6, 14, 15, 22)]
SEED = [ConvShape("seed 3x3 1-32", 1, 28, 28, 32, 3, 1, 1, 1)]  # the example CNN's first conv
SMOKE = [ConvShape("smoke 3x3 3-8", 3, 9, 11, 8, 3, 1, 1, 1)]
SHAPE_SETS = {
    "resnet50": RESNET50,
    "resnet50-small": RESNET50_SMALL,
    "seed": SEED,
    "smoke": SMOKE,
}


# ----------------------------------------------------------------------------------------------
# Providers and timing
# ----------------------------------------------------------------------------------------------


def make_provider(name: str, shape: ConvShape) -> Callable:
    """fn(x, w, b) -> relu(conv2d(x, w, b)) for one provider and shape."""
    stride, padding = shape.stride, shape.padding
    if name == "triton":

        def fn(x, w, b):
            with force_backend("triton"):
                return conv2d_bias_relu(x, w, b, stride, padding)

        return fn

    def eager(x, w, b):
        return F.relu(F.conv2d(x, w, b, stride, padding))

    if name == "torch":
        return eager
    if name == "compile":
        torch._dynamo.reset()  # a fresh static-shape compile per shape (no recompile limit)
        return torch.compile(eager, dynamic=False)
    raise ValueError(f"provider={name!r}: expected one of {PROVIDERS}")


def time_ms(fn: Callable[[], object], grad_to_none, device: str, warmup: int, rep: int) -> float:
    """Median time of fn() in ms: triton.testing.do_bench on GPU, a perf_counter loop on CPU."""
    if device == "cuda":
        # return_mode, not quantiles=[0.5]: Triton 3.6 returns one quantile as a bare float
        return triton.testing.do_bench(
            fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"
        )
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_backward_ms(forward, dy, params, device: str, rep: int) -> float:
    """Median time of the backward alone, in ms.

    Each repetition runs an untimed forward and times ``backward(dy)`` with CUDA events (a
    retained graph cannot be replayed: torch.compile donates the backward's buffers).
    """
    times, deadline = [], time.perf_counter() + rep / 1e3
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        for p in params:
            p.grad = None
        y = forward()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.backward(dy)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            y.backward(dy)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_case(shape, batch, dtype, provider, device, warmup, rep) -> list[dict]:
    """Time fwd, bwd and fwd+bwd of one provider on one shape; one row per mode."""
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last

    def rand(*size, scale=1.0):
        t = torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype)

    x = rand(batch, shape.c, shape.h, shape.w).contiguous(memory_format=fmt).requires_grad_()
    fan_in = shape.c * shape.kernel**2
    w = rand(shape.k, shape.c, shape.kernel, shape.kernel, scale=fan_in**-0.5)
    w = w.contiguous(memory_format=fmt).requires_grad_()
    b = rand(shape.k, scale=0.1).requires_grad_()
    fn = make_provider(provider, shape)
    params = [x, w, b]

    # First call: Triton autotuning / torch.compile happen here; timed separately.
    start = time.perf_counter()
    out = fn(x, w, b)
    dy = torch.randn_like(out)
    out.backward(dy)
    if device == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start

    ms = {"fwd": time_ms(lambda: fn(x, w, b), params, device, warmup, rep)}
    ms["fwd+bwd"] = time_ms(lambda: fn(x, w, b).backward(dy), params, device, warmup, rep)
    ms["bwd"] = time_backward_ms(lambda: fn(x, w, b), dy, params, device, rep)

    flops = {"fwd": shape.flops(batch), "bwd": 2 * shape.flops(batch)}
    flops["fwd+bwd"] = flops["fwd"] + flops["bwd"]
    oh, ow = shape.out_hw()
    rows = []
    for mode in MODES:
        rows.append(
            {
                "shape": shape.name,
                **{k: v for k, v in asdict(shape).items() if k != "name"},
                "oh": oh,
                "ow": ow,
                "batch": batch,
                "dtype": DTYPE_NAMES[dtype],
                "provider": provider,
                "mode": mode,
                "ms": ms[mode],
                "tflops": flops[mode] / (ms[mode] * 1e-3) / 1e12,
                "first_call_s": first_call_s,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Output: JSON and plots
# ----------------------------------------------------------------------------------------------


def metadata(device: str, args: argparse.Namespace) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "memory_format": "channels_last",
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1" and device == "cpu",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    return meta


def network_sums(rows: list[dict]) -> list[dict]:
    """Whole-ResNet-50 conv time per (batch, dtype, provider, mode): sum of count * ms."""
    names = {s.name for s in RESNET50}
    sums: dict[tuple, dict] = {}
    for r in rows:
        if r["shape"] not in names:
            continue
        key = (r["batch"], r["dtype"], r["provider"], r["mode"])
        acc = sums.setdefault(key, {"ms": 0.0, "shapes": 0})
        acc["ms"] += r["count"] * r["ms"]
        acc["shapes"] += 1
    return [
        {"batch": k[0], "dtype": k[1], "provider": k[2], "mode": k[3], **v}
        for k, v in sorted(sums.items())
        if v["shapes"] == len(RESNET50)
    ]


def write_json(path: Path, meta: dict, rows: list, errors: list, skipped: list) -> dict:
    doc = {
        "meta": meta,
        "results": rows,
        "resnet50_sums": network_sums(rows),
        "errors": errors,
        "skipped": skipped,
    }
    path.write_text(json.dumps(doc, indent=1))
    return doc


def plot(rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per (dtype, batch): TFLOP/s per shape, a panel per mode, a bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = sorted({(r["dtype"], r["batch"]) for r in rows})
    for dtype, batch in groups:
        sel = [r for r in rows if r["dtype"] == dtype and r["batch"] == batch]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        providers = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
        fig, axes = plt.subplots(len(MODES), 1, figsize=(max(8, 0.6 * len(shapes) + 3), 10))
        width = 0.8 / len(providers)
        for ax, mode in zip(axes, MODES):
            for i, prov in enumerate(providers):
                val = {
                    r["shape"]: r["tflops"]
                    for r in sel
                    if (r["provider"], r["mode"]) == (prov, mode)
                }
                xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
                ax.bar(xs, [val.get(s, 0.0) for s in shapes], width, label=prov)
            ax.set_ylabel(f"{mode} TFLOP/s")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes if mode == MODES[-1] else [], rotation=60, ha="right")
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend()
        axes[0].set_title(f"relu(conv2d + bias), channels_last {dtype}, batch {batch}")
        fig.tight_layout()
        path = out_dir / (f"{stem}.png" if len(groups) == 1 else f"{stem}_{dtype}_b{batch}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="resnet50,seed", help=f"comma list of {list(SHAPE_SETS)}")
    p.add_argument("--batch", default="32,128", help="comma list of batch sizes")
    p.add_argument("--dtypes", default="fp16,bf16", help=f"comma list of {list(DTYPES)}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {PROVIDERS}")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON and PNGs")
    p.add_argument("--tag", default=None, help="file name stem (default: conv_<device>)")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition, ms")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=0,
        help="start no new case after this many seconds (0: no limit); skipped cases are listed",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny fp32 case on CPU (Triton interpreter), providers triton and torch",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; return the path of the JSON written."""
    args = parse_args(argv)
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        args.shapes, args.batch, args.dtypes, args.providers = "smoke", "2", "fp32", "triton,torch"
    else:
        device = "cuda"
        if not torch.cuda.is_available():
            raise SystemExit("bench_conv.py needs a CUDA GPU (or --smoke for a CPU check)")
        torch.backends.cudnn.benchmark = True
    shapes = [s for name in args.shapes.split(",") for s in SHAPE_SETS[name.strip()]]
    batches = [int(b) for b in args.batch.split(",")]
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",")]
    providers = [p.strip() for p in args.providers.split(",")]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: {p!r} is not one of {PROVIDERS}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata(device, args)
    slug = "smoke" if args.smoke else meta["device"].replace("NVIDIA ", "").replace(" ", "-")
    stem = args.tag or f"conv_{slug}"
    json_path = out_dir / f"{stem}.json"
    rows: list[dict] = []
    skipped: list[dict] = []  # cases not started because the time budget was spent
    errors: list[dict] = []
    start = time.perf_counter()
    for dtype in dtypes:
        for batch in batches:
            for shape in shapes:
                for provider in providers:
                    what = {"shape": shape.name, "batch": batch, "dtype": DTYPE_NAMES[dtype]}
                    what["provider"] = provider
                    if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                        skipped.append(what)
                        continue
                    try:
                        case = bench_case(
                            shape, batch, dtype, provider, device, args.warmup, args.rep
                        )
                    except Exception as e:  # record and go on: one failure keeps the rest
                        errors.append({**what, "error": f"{type(e).__name__}: {e}"[:2000]})
                        print(f"FAILED {what}: {type(e).__name__}: {e}", flush=True)
                        continue
                    finally:
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    rows += case
                    line = "  ".join(
                        f"{r['mode']} {r['ms']:.3f} ms {r['tflops']:6.1f}" for r in case
                    )
                    print(
                        f"[{time.perf_counter() - start:6.1f}s] {DTYPE_NAMES[dtype]} b{batch:<4d}"
                        f" {shape.name:24s} {provider:8s} {line}"
                        f"  (first call {case[0]['first_call_s']:.1f}s)",
                        flush=True,
                    )
                # rewrite after every shape: an interrupted run keeps what it measured
                write_json(json_path, meta, rows, errors, skipped)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    doc = write_json(json_path, meta, rows, errors, skipped)
    if skipped:
        print(f"time budget spent: {len(skipped)} cases skipped (listed in the JSON)")
    for s in doc["resnet50_sums"]:
        print(f"ResNet-50 convs b{s['batch']} {s['dtype']} {s['provider']:8s} {s['mode']:8s}"
              f" {s['ms']:.2f} ms")  # fmt: skip
    if not args.no_plot:
        for path in plot(rows, out_dir, stem):
            print(f"wrote {path}")
    print(f"wrote {json_path}")
    return json_path


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry: python -m pytest bench/bench_conv.py -m gpu --benchmark-only
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_conv2d_bias_relu_forward(benchmark, provider):
    """Forward of ResNet-50's 3x3 64-channel conv, batch 32, fp16 channels_last."""
    shape = RESNET50[2]
    x = torch.randn(32, shape.c, shape.h, shape.w, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape.k, shape.c, 3, 3, device="cuda", dtype=torch.float16) / 24
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(shape.k, device="cuda", dtype=torch.float16)
    fn = make_provider(provider, shape)
    fn(x, w, b)  # autotune outside the timing

    def step():
        fn(x, w, b)
        torch.cuda.synchronize()

    benchmark(step)
    benchmark.extra_info["tflops"] = shape.flops(32) / benchmark.stats["median"] / 1e12


if __name__ == "__main__":
    main()
