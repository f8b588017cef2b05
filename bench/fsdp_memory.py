"""Parameter, gradient and optimizer-state bytes per rank: FSDP2 (``--dp-shard fsdp``) against DDP.

For the README's GPT preset (``--model tiny``) at dp = 1, 2, 4 (and dp = 2 x tp = 2), on gloo CPU
processes: the engine is built as the trainer builds it, takes one AdamW step (so gradients and
both Adam moments exist), and each rank counts what it holds with
:func:`~triton_parallel_layers.parallel_layers.memory.state_bytes` (a ``DTensor``'s local shard,
exact bytes). The analytic figure for FSDP is each parameter's ``torch.chunk(tp_shard, dp, 0)``
piece on this rank, summed (``1/dp`` of DDP's up to uneven chunks); optimizer state is
``2 x`` the parameter bytes (``exp_avg``, ``exp_avg_sq``) plus one 4-byte ``step`` per tensor.

The same step's data-parallel traffic is counted by the communication ledger
(:func:`~triton_parallel_layers.kernels.collectives.record_comm`: bytes this rank sends, ring
algorithm) and set against the analytic figure, with ``W`` the TP-local parameter bytes, ``S`` the
sum of FSDP's padded dim-0 pieces (``ceil(rows / dp)`` rows of every parameter) and ``m``
microbatches: DDP all-reduces the gradients once, ``2 (dp - 1) / dp x W``; FSDP all-gathers each
unit for its forward and again for its backward, ``2 m (dp - 1) x S``, and reduce-scatters the
gradients once, ``(dp - 1) x S``: ``(2m + 1) (dp - 1) S``, 1.5x DDP's at ``m = 1``. (Where ``tp > 1``
the TP all-reduces share DDP's kind, so only FSDP's rows are compared there.)

    python bench/fsdp_memory.py        # writes bench/results/fsdp_memory_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import math
import sys
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import cpu_name, write_results  # noqa: E402

from triton_parallel_layers.kernels.collectives import record_comm  # noqa: E402
from triton_parallel_layers.models.gpt import GPT_TP_PLAN  # noqa: E402
from triton_parallel_layers.parallel_layers import ParallelDims  # noqa: E402
from triton_parallel_layers.parallel_layers.data_parallel import dp_shard_shape  # noqa: E402
from triton_parallel_layers.parallel_layers.memory import state_bytes  # noqa: E402
from triton_parallel_layers.training.config import (  # noqa: E402
    OptimConfig,
    ParallelConfig,
    RunConfig,
)
from triton_parallel_layers.training.engine import build_engine  # noqa: E402
from triton_parallel_layers.training.tasks import GPT_PRESETS, GPTTask, GPTTaskConfig  # noqa: E402
from triton_parallel_layers.training.trainer import _make_optimizer  # noqa: E402

PRESET = "tiny"
LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2)]  # (dp, tp)


def measure(dp_shard: str, dp: int, tp: int, model_fn=None, seq_len: int | None = None) -> dict:
    """On every rank: the bytes it holds after one AdamW step, and FSDP's analytic share."""
    preset = GPT_PRESETS[PRESET]
    if model_fn is None:
        task = GPTTask(GPTTaskConfig(model=PRESET), RunConfig(batch_size=preset["batch_size"]))
        model_fn, seq_len = task.build_model, preset["seq_len"]
    dims = ParallelDims(dp=dp, tp=tp)
    engine = build_engine(
        model_fn, GPT_TP_PLAN, dims, ParallelConfig(dp=dp, tp=tp, dp_shard=dp_shard)
    )
    optimizer = _make_optimizer(engine, OptimConfig(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    tokens = torch.randint(0, vocab, (2 * dp, seq_len + 1), generator=gen)[dims.dp_rank :: dp]
    with record_comm() as ledger:
        engine.train_step(tokens[:, :-1], tokens[:, 1:])
    optimizer.step()
    held = state_bytes(engine.model, optimizer)
    # the TP-local parameters (what DDP holds), FSDP's dim-0 piece of each on this rank and
    # FSDP's padded piece (what its collectives carry)
    whole = piece = padded = 0
    for p in engine.model.parameters():  # every parameter here has dim >= 1
        row_bytes = math.prod(p.shape[1:]) * p.element_size()
        whole += p.shape[0] * row_bytes
        piece += dp_shard_shape(p.shape, dp, dims.dp_rank)[0] * row_bytes
        padded += -(-p.shape[0] // dp) * row_bytes
    n_tensors = sum(1 for _ in engine.model.parameters())
    analytic = piece if dp_shard == "fsdp" else whole
    m = engine.parallel.microbatches
    if dp_shard == "fsdp":
        dp_kinds = ("all_gather", "reduce_scatter")
        analytic_comm = (2 * m + 1) * (dp - 1) * padded
    else:
        dp_kinds = ("all_reduce",) if tp == 1 else ()  # TP all-reduces too where tp > 1
        analytic_comm = round(Fraction(2 * (dp - 1) * whole, dp))
    sent = ledger.bytes_sent
    return {
        "dp_shard": dp_shard, "dp": dp, "tp": tp, "rank": dist.get_rank(), **held,
        "ddp_param_bytes": whole, "analytic_param_bytes": analytic,
        "analytic_optimizer_bytes": 2 * analytic + 4 * n_tensors,
        "dp_comm_bytes": sum(sent[k] for k in dp_kinds) if dp_kinds else None,
        "analytic_dp_comm_bytes": analytic_comm,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| dp | tp | mode | rank | parameter bytes | gradient bytes | optimizer bytes | "
        "analytic parameter bytes | parameters / DDP's (1/dp) | dp bytes sent per step | "
        "analytic |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        measured = r["dp_comm_bytes"]
        lines.append(
            f"| {r['dp']} | {r['tp']} | {r['dp_shard']} | {r['rank']} | {r['param_bytes']:,} "
            f"| {r['grad_bytes']:,} | {r['optimizer_bytes']:,} | {r['analytic_param_bytes']:,} "
            f"| {r['param_bytes'] / r['ddp_param_bytes']:.4f} ({1 / r['dp']:.4f}) "
            f"| {'-' if measured is None else f'{measured:,}'} "
            f"| {r['analytic_dp_comm_bytes']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from triton_parallel_layers.parallel_layers.testing import WorkerPools

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    with WorkerPools() as pools:
        rows = [
            row
            for dp, tp in LAYOUTS
            for mode in ("ddp", "fsdp")
            for row in pools.run(dp * tp, measure, mode, dp, tp, timeout=600)
        ]
    text = table(rows)
    print(text)
    markdown = (
        f"Bytes per rank after one AdamW step, GPT preset {PRESET!r} (bench/fsdp_memory.py), "
        f"exact local-tensor bytes (DTensor shards unpadded), on {cpu_name()}, "
        f"torch {torch.__version__}.\n\n" + text + "\n"
    )
    write_results(args.out, "fsdp_memory_cpu", {"machine": cpu_name(), "rows": rows}, markdown)
    return rows


if __name__ == "__main__":
    main()
