"""Pipeline memory per rank, for the README's GPT preset (``--model tiny``) on CPU processes.

1. Parameters: what :func:`~triton_parallel_layers.training.engine.build_engine` leaves
   materialized on each rank at pp = 1, 2, 4 (bytes of non-``meta`` parameters), and the most
   CPU memory allocated while it builds (``torch.profiler``'s memory events, summed in order):
   only this rank's stages are materialized and initialized, so both scale as ``1/pp``.
2. Activations: the peak bytes a rank holds for the backward during one 1F1B step (what autograd
   saved, the stage inputs and outputs kept for the backward, send buffers in flight, buffers of
   receives posted ahead of the action needing them), with and
   without ``free_outputs`` (each sent output's storage freed once its send has completed).

    python bench/pipeline_memory.py        # writes bench/results/pipeline_memory_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import cpu_name, write_results  # noqa: E402

from triton_parallel_layers.models.gpt import GPT_TP_PLAN  # noqa: E402
from triton_parallel_layers.parallel_layers import ParallelDims  # noqa: E402
from triton_parallel_layers.parallel_layers.pipeline import Schedule1F1B  # noqa: E402
from triton_parallel_layers.training.config import ParallelConfig, RunConfig  # noqa: E402
from triton_parallel_layers.training.engine import build_engine  # noqa: E402
from triton_parallel_layers.training.tasks import (  # noqa: E402
    GPT_PRESETS,
    GPTTask,
    GPTTaskConfig,
)

PRESET = "tiny"


def _task() -> GPTTask:
    preset = GPT_PRESETS[PRESET]
    return GPTTask(GPTTaskConfig(model=PRESET), RunConfig(batch_size=preset["batch_size"], seed=0))


def measure(pp: int, activations: bool) -> dict:
    """On every rank: parameter bytes and build peak; with ``activations``, 1F1B's peak
    activation bytes with ``free_outputs`` off and on."""
    from torch.profiler import ProfilerActivity, profile

    task = _task()
    dims = ParallelDims(pp=pp)
    parallel = ParallelConfig(pp=pp)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine = build_engine(task.build_model, GPT_TP_PLAN, dims, parallel)
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start
    )
    now = peak = 0
    for e in events:
        now += e.cpu_memory_usage
        peak = max(peak, now)
    held = {id(p): p.numel() * p.element_size() for p in engine.model.parameters() if not p.is_meta}
    row = {"pp": pp, "rank": dist.get_rank(), "param_bytes": sum(held.values()), "build_peak": peak}
    if activations and pp > 1:
        preset = GPT_PRESETS[PRESET]
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 256, (preset["batch_size"], preset["seq_len"] + 1), generator=gen)
        for free in (False, True):
            schedule = Schedule1F1B(
                engine.stages,
                parallel.microbatches,
                engine.model.loss,
                track_memory=True,
                free_outputs=free,
            )
            schedule.step(tokens[:, :-1], tokens[:, 1:])
            row[f"act_peak_free_{free}"] = schedule.peak_activation_bytes
            for stage in engine.stages:
                for p in stage.parameters():
                    p.grad = None
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| pp | rank | parameter bytes | build peak (CPU bytes) | 1F1B peak activation bytes, "
        "before -> after free_outputs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        act = "-"
        if "act_peak_free_True" in r:
            before, after = r["act_peak_free_False"], r["act_peak_free_True"]
            act = f"{before:,} -> {after:,} ({(after - before) / before:+.1%})"
        lines.append(
            f"| {r['pp']} | {r['rank']} | {r['param_bytes']:,} | {r['build_peak']:,} | {act} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from triton_parallel_layers.parallel_layers.testing import WorkerPools

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pps", default="1,2,4", help="pipeline sizes (default 1,2,4)")
    parser.add_argument("--no-activations", action="store_true", help="parameters only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    with WorkerPools() as pools:
        rows = [
            row
            for pp in (int(x) for x in args.pps.split(","))
            for row in pools.run(pp, measure, pp, not args.no_activations, timeout=600)
        ]
    text = table(rows)
    print(text)
    markdown = (
        f"Pipeline memory per rank, GPT preset {PRESET!r} (bench/pipeline_memory.py), exact "
        f"bytes, on {cpu_name()}, torch {torch.__version__}.\n\n" + text + "\n"
    )
    write_results(args.out, "pipeline_memory_cpu", rows, markdown)
    return rows


if __name__ == "__main__":
    main()
