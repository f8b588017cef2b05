"""Peak memory of the loss forward + backward: vocab_parallel_cross_entropy against F.cross_entropy.

On every rank of a tp group (gloo, CPU processes), for ``N`` tokens and a vocabulary ``V``:

- ours: ``vocab_parallel_cross_entropy`` on this rank's logits shard ``(N, V/tp)``, forward and
  backward;
- torch: ``F.cross_entropy`` on the same logits gathered, ``(N, V)``, forward and backward,

each measured by :class:`~triton_parallel_layers.parallel_layers.memory.LiveBytes`: the most bytes
of tensor storages allocated inside the step that were alive at once (exact byte counts, the same
on every machine; the logits and targets themselves are made before and not counted; the
gradient left in ``logits.grad`` is). The ratio ours / torch is the figure: at most 1.0 at tp = 1
and at most its shard fraction 1/tp beyond. The analytic column is what the design holds: one
logits-sized gradient buffer ``N * V/tp * itemsize``, plus for low-precision logits the fp32
scratch of one token chunk ``chunk * V/tp * 4``.

    python bench/ce_memory.py        # writes bench/results/ce_memory_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import cpu_name, write_results  # noqa: E402

from triton_parallel_layers.parallel_layers import (  # noqa: E402
    ParallelDims,
    vocab_parallel_cross_entropy,
)
from triton_parallel_layers.parallel_layers.cross_entropy import _default_chunk_size  # noqa: E402
from triton_parallel_layers.parallel_layers.memory import LiveBytes  # noqa: E402

# (tokens, vocabulary, dtype, label_smoothing): GPT-2's padded vocabulary at a 1k-token microbatch
CASES = [
    (1024, 50304, "float32", 0.0),
    (1024, 50304, "bfloat16", 0.0),
    (1024, 50304, "float32", 0.1),
]
SMOKE_CASES = [(13, 96, "float32", 0.0), (13, 96, "bfloat16", 0.1)]


def _peak(loss_fn, logits: torch.Tensor, target: torch.Tensor, **kw) -> int:
    logits = logits.detach().requires_grad_()
    with LiveBytes() as mem:
        loss_fn(logits, target, **kw).backward()
    return mem.peak


def measure(n: int, vocab: int, dtype: str, label_smoothing: float) -> dict:
    """On every rank: the peak bytes of ours on the shard and of F.cross_entropy on the whole."""
    dims = ParallelDims(tp=dist.get_world_size())
    tp, rank = dims.tp, dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(n, vocab, generator=gen)).to(getattr(torch, dtype))
    target = torch.randint(0, vocab, (n,), generator=gen)
    shard = logits.chunk(tp, -1)[rank].contiguous()
    kw = {"label_smoothing": label_smoothing}
    ours = _peak(vocab_parallel_cross_entropy, shard, target, tp_group=dims.tp_group, **kw)
    torch_peak = _peak(F.cross_entropy, logits, target, **kw)
    v_local = vocab // tp
    analytic = n * v_local * shard.element_size()
    if shard.dtype != torch.float32:
        analytic += _default_chunk_size(n, v_local) * v_local * 4
    return {
        "tp": tp, "rank": rank, "tokens": n, "vocab": vocab, "dtype": dtype,
        "label_smoothing": label_smoothing, "ours_peak": ours, "torch_peak": torch_peak,
        "ratio": ours / torch_peak, "shard_fraction": 1 / tp, "analytic": analytic,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| tokens | V | dtype | smoothing | tp | ours peak (bytes/rank) | analytic | "
        "F.cross_entropy peak, gathered | ours / torch | 1/tp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['vocab']} | {r['dtype']} | {r['label_smoothing']} | {r['tp']} "
            f"| {r['ours_peak']:,} | {r['analytic']:,} | {r['torch_peak']:,} | {r['ratio']:.3f} "
            f"| {r['shard_fraction']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from triton_parallel_layers.parallel_layers.testing import WorkerPools

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tps", default="1,2,4", help="tensor-parallel sizes (default 1,2,4)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (for the tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    cases = SMOKE_CASES if args.smoke else CASES
    with WorkerPools() as pools:
        rows = [
            pools.run(tp, measure, *case, timeout=600)[0]  # every rank holds the same sizes
            for case in cases
            for tp in (int(x) for x in args.tps.split(","))
        ]
    text = table(rows)
    print(text)
    markdown = (
        "Peak memory of the loss forward + backward per rank (bench/ce_memory.py): "
        "vocab_parallel_cross_entropy on the (N, V/tp) shard against F.cross_entropy on the "
        "gathered (N, V) logits; exact bytes of live tensor storages (LiveBytes), measured on "
        f"{cpu_name()}, torch {torch.__version__}.\n\n" + text + "\n"
    )
    name = "ce_memory_smoke" if args.smoke else "ce_memory_cpu"
    write_results(args.out, name, {"machine": cpu_name(), "rows": rows}, markdown)
    return rows


if __name__ == "__main__":
    main()
