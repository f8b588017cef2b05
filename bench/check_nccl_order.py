"""Every pipeline schedule's point-to-point traffic, recorded on gloo and replayed under NCCL's rule.

For each case (schedule x (dp, pp, tp) x m x chunks), the pipeline runs two training steps on
tiny stages (small linear layers, tensor-parallel pairs when ``tp > 1``, DDP when ``dp > 1``)
while :func:`~triton_parallel_layers.parallel_layers.pipeline.p2p_check.record_p2p` logs every
rank's groups; :func:`~triton_parallel_layers.parallel_layers.pipeline.p2p_check.replay_nccl`
replays each step (the first exchanges shapes, the second runs with cached shapes) under NCCL's
rule. A case "completes" when both steps do and every FIFO-matched pair agrees in size and tag.
Each pipeline's recorded groups are also compared with what
:func:`~triton_parallel_layers.parallel_layers.pipeline.p2p_check.planned_groups` computes from the
action lists (``= planned`` column).

Controls, in a second table, show the checker is neither too lax nor too strict on recorded
traffic: a known-bad order (both ranks post a lone ``isend`` before their ``irecv``: fine on gloo,
a hang on NCCL for messages beyond its buffers) must be reported stuck, and PyTorch's own
``Schedule1F1B`` and ``ScheduleInterleaved1F1B`` (``torch.distributed.pipelining``, pp = 2 and
4, m = pp and 2 pp) must complete. The script exits with status 1 unless every case completes
and every control gives its expected result.

    python bench/check_nccl_order.py            # writes bench/results/nccl_order_cpu.{md,json}
    python bench/check_nccl_order.py --quick    # pp = 2 only

The CPU cost is small (a few seconds per world size, plus starting the worker processes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import write_results  # noqa: E402

from triton_parallel_layers.parallel_layers import (  # noqa: E402
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
)
from triton_parallel_layers.parallel_layers.pipeline import (  # noqa: E402
    SCHEDULES,
    build_stages,
    partition_layers,
)
from triton_parallel_layers.parallel_layers.pipeline.p2p_check import (  # noqa: E402
    planned_groups,
    record_p2p,
    replay_nccl,
)

WIDTH = 8
STEPS = 2


def microbatch_counts(schedule: str, pp: int) -> list[int]:
    """``m = 1``, ``pp``, ``pp + 1`` (not a multiple of pp) and ``2 pp``, where the schedule
    accepts them (the interleaved one needs multiples of pp)."""
    v = 2 if schedule == "interleaved" else 1
    out = []
    for m in sorted({1, pp, pp + 1, 2 * pp}):
        try:
            SCHEDULES[schedule].check(pp, m, v)
        except ValueError:
            continue
        out.append(m)
    return out


def grid(dp: int, pp: int, tp: int) -> list[tuple[str, int, int]]:
    """``(schedule, m, chunks)`` for every schedule at this layout."""
    return [
        (name, m, 2 if name == "interleaved" else 1)
        for name in SCHEDULES
        for m in microbatch_counts(name, pp)
    ]


def _layers(n: int, tp_group) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(
            ColumnParallelLinear(WIDTH, 2 * WIDTH, tp_group=tp_group),
            nn.Tanh(),
            RowParallelLinear(2 * WIDTH, WIDTH, tp_group=tp_group),
        )
        for _ in range(n)
    ]


def record_cases(dp: int, tp: int, cases: list[tuple[str, int, int]]) -> dict:
    """On every rank: run each case for STEPS steps; return ``{"cases": [case][step] -> groups,
    "pipeline": the global ranks of this rank's pipeline}``."""
    pp = dist.get_world_size() // (dp * tp)
    dims = ParallelDims(dp=dp, pp=pp, tp=tp)
    pipeline = [dist.get_global_rank(dims.pp_group, r) for r in range(pp)] if pp > 1 else []
    out = []
    for name, m, v in cases:
        layers = _layers(pp * v, dims.tp_group)
        stages = build_stages(
            layers, partition_layers(layers, pp * v), dims.pp_group, dp_group=dims.dp_group
        )
        schedule = SCHEDULES[name](stages, m, F.mse_loss)
        steps = []
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(step)
            x, y = (
                torch.randn(2 * m, WIDTH, generator=gen),
                torch.randn(2 * m, WIDTH, generator=gen),
            )
            with record_p2p() as log:
                schedule.step(x, y)
            steps.append(log.groups)
        out.append(steps)
    return {"cases": out, "pipeline": pipeline}


def both_send_first() -> list:
    """Every rank's groups when two ranks each post a lone ``isend`` before their ``irecv``
    (runs on gloo, which buffers sends; hangs on NCCL for large messages)."""
    peer = 1 - dist.get_rank()
    out, into = torch.randn(1 << 16), torch.empty(1 << 16)
    with record_p2p() as log:
        send = dist.isend(out, dst=peer)
        dist.irecv(into, src=peer).wait()
        send.wait()
    return log.groups


def torch_schedule(name: str, m: int, v: int, steps: int = STEPS) -> list:
    """Every rank's groups over ``steps`` steps of ``torch.distributed.pipelining``'s schedule
    ``name`` (``v`` stages per rank, small linear stages)."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining import schedules

    pp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    stages = [
        pipelining.PipelineStage(nn.Linear(WIDTH, WIDTH), s, pp * v, torch.device("cpu"))
        for s in range(rank, pp * v, pp)
    ]
    cls = getattr(schedules, name)
    single = issubclass(cls, schedules.PipelineScheduleSingle)
    with record_p2p() as log:
        schedule = cls(stages[0] if single else stages, m, loss_fn=F.mse_loss)
        for step in range(steps):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(2 * m, WIDTH, generator=gen)
            y = torch.randn(2 * m, WIDTH, generator=gen)
            schedule.step(*((x,) if rank == 0 else ()), target=y if rank == pp - 1 else None)
    return log.groups


TORCH_SCHEDULES = [("Schedule1F1B", 1), ("ScheduleInterleaved1F1B", 2)]


def _outcome(replay) -> str:
    if replay.ok:
        return "completes"
    return "deadlock" if not replay.completes else "mismatched pairs"


def _control_row(control: str, pp: int, m: int, expected: str, replay) -> dict:
    return {"control": control, "pp": pp, "m": m, "expected": expected,
            "result": _outcome(replay), "report": replay.report()}  # fmt: skip


def check_controls(run, pps: list[int]) -> list[dict]:
    """The known-bad order at 2 ranks and PyTorch's schedules at each of ``pps``, replayed; one
    row each, with the result expected of a checker that is right."""
    replay = replay_nccl(run(2, both_send_first, timeout=120))
    rows = [
        _control_row("known-bad: lone isend then irecv on both ranks", 2, 1, "deadlock", replay)
    ]
    for pp in pps:
        for name, v in TORCH_SCHEDULES:
            label = f"torch.distributed.pipelining.{name}" + (f" (v={v})" if v > 1 else "")
            for m in (pp, 2 * pp):
                replay = replay_nccl(run(pp, torch_schedule, name, m, v, timeout=120))
                rows.append(_control_row(label, pp, m, "completes", replay))
    return rows


def _same(recorded, pipeline: list[int], planned) -> bool:
    """Whether one pipeline's recorded groups (global peers) are the planned ones (pp ranks)."""
    index = {g: r for r, g in enumerate(pipeline)}
    got = [[[(o.kind, index[o.peer], o.tag) for o in g] for g in recorded[r]] for r in pipeline]
    want = [[[(o.kind, o.peer, o.tag) for o in g] for g in rank] for rank in planned]
    return got == want


def check_layout(run, dp: int, pp: int, tp: int, cases=None) -> list[dict]:
    """Record and replay ``cases`` (default: :func:`grid`) at ``(dp, pp, tp)`` with ``run``
    (``run(world_size, fn, *args)``, e.g. a :class:`WorkerPools`' ``run``); one row per case."""
    cases = cases if cases is not None else grid(dp, pp, tp)
    results = run(dp * pp * tp, record_cases, dp, tp, cases, timeout=600)
    pipelines = {tuple(r["pipeline"]) for r in results}
    rows = []
    for c, (name, m, v) in enumerate(cases):
        row = {"schedule": name, "dp": dp, "pp": pp, "tp": tp, "m": m, "chunks": v}
        reports, planned = [], True
        actions = SCHEDULES[name].build_actions(pp, m, v)
        for step in range(STEPS):
            logs = [results[rank]["cases"][c][step] for rank in range(dp * pp * tp)]
            replay = replay_nccl(logs)
            reports.append(replay)
            want = planned_groups(actions, v, first_step=step == 0)
            planned &= all(_same(logs, list(p), want) for p in pipelines)
        row["completes"] = all(r.ok for r in reports)
        row["groups"] = sum(sum(r.num_groups) for r in reports)
        row["planned"] = planned
        row["report"] = next((r.report() for r in reports if not r.ok), "")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| schedule | (dp, pp, tp) | m | chunks | groups (2 steps) | completes | = planned |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        planned = "yes" if r["planned"] else "NO"
        lines.append(
            f"| {r['schedule']} | ({r['dp']}, {r['pp']}, {r['tp']}) | {r['m']} | {r['chunks']} "
            f"| {r['groups']} | {'completes' if r['completes'] else 'DEADLOCK'} | {planned} |"
        )
    return "\n".join(lines)


def controls_table(rows: list[dict]) -> str:
    lines = ["| control | pp | m | expected | replayed |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        mark = "" if r["result"] == r["expected"] else " (WRONG)"
        lines.append(
            f"| {r['control']} | {r['pp']} | {r['m']} | {r['expected']} | {r['result']}{mark} |"
        )
    return "\n".join(lines)


LAYOUTS = [(1, 2, 1), (1, 3, 1), (1, 4, 1), (2, 2, 2)]


def main(argv: list[str] | None = None) -> dict:
    from triton_parallel_layers.parallel_layers.testing import WorkerPools

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pp = 2 only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS
    with WorkerPools() as pools:
        rows = [row for layout in layouts for row in check_layout(pools.run, *layout)]
        controls = check_controls(pools.run, [2] if args.quick else [2, 4])
    text, control_text = table(rows), controls_table(controls)
    print(text + "\n\n" + control_text)
    markdown = (
        "Point-to-point traffic of every schedule, recorded on gloo and replayed under NCCL's "
        "rule (bench/check_nccl_order.py)\n\n" + text + "\n\n"
        "Controls: the same checker on recorded traffic that must fail and on PyTorch's own "
        "schedules, which must pass\n\n" + control_text + "\n"
    )
    write_results(args.out, "nccl_order_cpu", {"cases": rows, "controls": controls}, markdown)
    return {"cases": rows, "controls": controls}


if __name__ == "__main__":
    result = main()
    ok = all(r["completes"] for r in result["cases"]) and all(
        r["result"] == r["expected"] for r in result["controls"]
    )
    sys.exit(0 if ok else 1)
