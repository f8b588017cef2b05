"""Forward+backward time of one LSTM layer: the fused-cell LSTM against nn.LSTM and an unfused cell.

Three providers on the same weights and inputs, one layer ``(B, T, H) -> (B, T, H)`` (input width =
hidden size), each timed as forward + backward of ``out.sum()`` with the gradients reset:

* ``fused``: :func:`triton_parallel_layers.kernels.lstm` (input projection of all steps as one
  GEMM, one ``addmm`` and one fused cell per step). On CUDA the cell is the Triton kernel. On the
  CPU it is the op's torch implementation (the ``ref`` path CPU training takes): Triton's
  interpreter is a correctness tool, thousands of times too slow to time.
* ``nn.LSTM``: PyTorch's own (cuDNN on CUDA, its fused CPU kernel on the CPU).
* ``unfused``: :func:`triton_parallel_layers.kernels.lstm_ref`, the textbook cell in torch ops
  (two ``F.linear`` and ~10 elementwise ops per step).

The providers run interleaved, case by case, so machine noise hits them alike; reported is the
median step time of each and the ratios ``fused / nn.LSTM`` and ``fused / unfused``.

    python bench/bench_lstm.py                       # the default CPU grid
    python bench/bench_lstm.py --smoke               # a few seconds: checks the script
    python bench/bench_lstm.py --hidden 256 1024 --batch 32 --length 128 --dtype bf16   # GPU

Results: ``bench/results/lstm_<cpu|gpu>.json`` and ``.png`` (``lstm_smoke.json`` for ``--smoke``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_name  # noqa: E402

from triton_parallel_layers.kernels import force_backend, lstm, lstm_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROVIDERS = ("fused", "nn.LSTM", "unfused")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(hidden: int, batch: int, length: int, dtype, device, iters: int, warmup: int) -> dict:
    """Median forward+backward milliseconds of each provider on one shape."""
    torch.manual_seed(0)
    module = nn.LSTM(hidden, hidden, batch_first=True, device=device, dtype=dtype)
    params = list(module.parameters())  # weight_ih, weight_hh, bias_ih, bias_hh
    x = torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=True)

    def fused():
        return lstm(x, *params)[0]

    def unfused():
        return lstm_ref(x, *params)[0]

    def torch_lstm():
        return module(x)[0]

    fns = {"fused": fused, "nn.LSTM": torch_lstm, "unfused": unfused}
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    for i in range(warmup + iters):
        for name in PROVIDERS:
            _sync(device)
            start = time.perf_counter()
            fns[name]().float().sum().backward()
            _sync(device)
            elapsed = time.perf_counter() - start
            x.grad = None
            for p in params:
                p.grad = None
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    row = {"hidden": hidden, "batch": batch, "length": length}
    for name in PROVIDERS:
        row[f"{name}_ms"] = statistics.median(times[name])
    row["fused_vs_nn_lstm"] = row["fused_ms"] / row["nn.LSTM_ms"]
    row["fused_vs_unfused"] = row["fused_ms"] / row["unfused_ms"]
    return row


def plot(rows: list[dict], title: str, path: Path) -> bool:
    """A grouped bar chart of the step times; ``False`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"H={r['hidden']}\nB={r['batch']} T={r['length']}" for r in rows]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4))
    for k, name in enumerate(PROVIDERS):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[f"{name}_ms"] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 512],
                        help="hidden sizes (= input width)")  # fmt: skip
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64], help="batch sizes")
    parser.add_argument("--length", type=int, nargs="+", default=[32, 128], help="sequence lengths")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per case and provider")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="one tiny case, 1 step (a check)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.batch, args.length, args.iters, args.warmup = [16], [2], [4], 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    # CPU: the fused LSTM's torch path (see the module doc); CUDA: the Triton kernel.
    backend = "triton" if device.type == "cuda" else "ref"
    tag = "smoke" if args.smoke else device.type if device.type == "cpu" else "gpu"
    result = {
        "benchmark": "LSTM layer forward+backward: fused cell vs nn.LSTM vs unfused cell",
        "machine": machine_name(),
        "device": device.type,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "fused_path": backend,
        "note": (
            "fused = triton_parallel_layers.kernels.lstm; on the CPU its cell runs the op's torch "
            "path (Triton's interpreter is far too slow to time), on CUDA the Triton kernel"
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
    }
    print(f"{result['machine']}, torch {torch.__version__}, {args.dtype}, fused path: {backend}")
    print(f"{'H':>5} {'B':>4} {'T':>5} | {'fused':>9} {'nn.LSTM':>9} {'unfused':>9} ms | "
          f"{'/nn.LSTM':>8} {'/unfused':>8}")  # fmt: skip
    with force_backend(backend):
        for hidden in args.hidden:
            for batch in args.batch:
                for length in args.length:
                    row = _case(hidden, batch, length, dtype, device, args.iters, args.warmup)
                    result["rows"].append(row)
                    print(f"{hidden:>5} {batch:>4} {length:>5} | {row['fused_ms']:9.2f} "
                          f"{row['nn.LSTM_ms']:9.2f} {row['unfused_ms']:9.2f}    | "
                          f"{row['fused_vs_nn_lstm']:8.2f} {row['fused_vs_unfused']:8.2f}",
                          flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lstm_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"one LSTM layer fwd+bwd, {args.dtype}, {result['machine']}"
    wrote_png = plot(result["rows"], title, stem.with_suffix(".png"))
    print(f"wrote {stem}.json" + (" and .png" if wrote_png else ""))
    return result


if __name__ == "__main__":
    main()
