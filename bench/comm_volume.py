"""Bytes on the wire of one bf16 training step of the GPT ``tiny`` preset, per collective kind and
dtype, at (tp=2, sequence parallel), (tp=2) and (pp=2, 4 microbatches) on 2 CPU processes (gloo).

The figures are exact (the communication ledger of :mod:`triton_parallel_layers.kernels.collectives`,
bytes one rank sends under the ring algorithm) and do not depend on the machine. The step is the
second one (the first also sends the pipeline's shape header).

    python bench/comm_volume.py       # writes bench/results/comm_volume.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_name, write_results  # noqa: E402

from triton_parallel_layers.kernels.collectives import record_comm  # noqa: E402
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig  # noqa: E402
from triton_parallel_layers.parallel_layers import ParallelDims  # noqa: E402
from triton_parallel_layers.training.config import ParallelConfig  # noqa: E402
from triton_parallel_layers.training.engine import build_engine  # noqa: E402
from triton_parallel_layers.training.tasks import GPT_PRESETS  # noqa: E402

LAYOUTS = {
    "tp2-sp": dict(tp=2, sequence_parallel=True),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2, microbatches=4),
}


def measure(layout: dict) -> dict:
    """On every rank: the ledger summary of the second bf16 step at ``layout``."""
    preset = GPT_PRESETS["tiny"]
    cfg = GPTConfig(vocab_size=256, vocab_pad_multiple=256, n_layers=preset["n_layers"],
                    embed_dim=preset["embed_dim"], n_heads=preset["n_heads"],
                    max_seq_len=preset["seq_len"])  # fmt: skip
    parallel = ParallelConfig(**layout)
    dims = ParallelDims(dp=parallel.dp, pp=parallel.pp, tp=parallel.tp)
    engine = build_engine(
        lambda: GPT(cfg, seed=0), GPT_TP_PLAN, dims, parallel, autocast_dtype=torch.bfloat16
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (preset["batch_size"], preset["seq_len"] + 1), generator=gen)
    engine.train_step(tokens[:, :-1], tokens[:, 1:])
    with record_comm() as ledger:
        engine.train_step(tokens[:, :-1], tokens[:, 1:])
    return ledger.summary()


def main(argv: list[str] | None = None) -> dict:
    from triton_parallel_layers.parallel_layers.testing import WorkerPools

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    with WorkerPools() as pools:
        result = {
            name: pools.run(2, measure, layout, timeout=600) for name, layout in LAYOUTS.items()
        }
    for name, ranks in result.items():
        for rank, summary in enumerate(ranks):
            kinds = ", ".join(f"{k} {e['bytes']:,} B {e['dtypes']}" for k, e in summary.items())
            print(f"{name} rank {rank}: {kinds}")
    meta = {"preset": "tiny", "dtype": "bf16 autocast", "step": 2, "ranks": 2, "backend": "gloo",
            "machine": machine_name()}  # fmt: skip
    write_results(args.out, "comm_volume", {"setup": meta, "per_layout_per_rank": result})
    return result


if __name__ == "__main__":
    main()
