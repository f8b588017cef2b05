"""Pipeline schedules: this package's against ``torch.distributed.pipelining``, on the same stages.

For each pipeline size ``pp`` (2 and 4 gloo CPU processes), microbatch count ``m`` and schedule,
both implementations run the same stage modules (deep copies of one seeded model, cut at the same
layers), in the same processes, interleaved step by step (so machine noise hits both alike):

=================  ===============================  =======================================
schedule           ours                             torch.distributed.pipelining
=================  ===============================  =======================================
gpipe              ``ScheduleGPipe``                ``ScheduleGPipe``
1f1b               ``Schedule1F1B``                 ``Schedule1F1B``
interleaved (v=2)  ``ScheduleInterleaved1F1B``      ``ScheduleInterleaved1F1B``
zero-bubble        ``ScheduleZBH1``                 ``ScheduleInterleavedZeroBubble``
                                                    (one stage per rank)
=================  ===============================  =======================================

Two workloads:

* ``timed``: every rank holds two :class:`~triton_parallel_layers.parallel_layers.pipeline.TimedLayer` per stage whose
  forward, input-gradient and weight-gradient passes each sleep a fixed time (5 ms per layer),
  so 4 processes on a 2-core machine behave like 4 devices and the *bubble fraction* is measured
  the same way for both implementations: ``1 - sum over ranks of busy time / (pp x step time)``,
  busy time being what the layers measure inside their passes. (torch's zero-bubble schedules
  call autograd twice per backward, which runs a custom layer's whole backward twice: they are
  compared on the ``mlp`` workload only.)
* ``mlp``: real compute: each stage is two ``Linear(512, 512)`` + GELU layers
  (:class:`~triton_parallel_layers.parallel_layers.ColumnParallelLinear`, one rank), 64 rows per microbatch, one thread
  per process. At pp = 4 the 4 processes share 2 cores, so step times include contention (alike
  for both). Our bubble fraction here comes from our own timeline (a separate recorded step).

Reported per configuration: median step time of each (the slowest rank's, from a common barrier),
the ratio ours / torch (below 1 is faster), and the bubble fractions with the formula for equal
stages: ``(p-1)/(m+p-1)`` (GPipe, 1F1B), ``(p-1)/(vm+p-1)`` (interleaved), ``(p-1)/(3m+p-1)``
(ZB-H1 with F = B = W). Before timing, both sides' losses on the same batch are checked equal.

    python bench/bench_pipeline.py                      # the default grid (~8 min on 2 cores)
    python bench/bench_pipeline.py --workloads mlp --pp 2 --ms 8 --iters 20
    python bench/bench_pipeline.py --quick --out /tmp   # one tiny configuration, a smoke run

Each configuration runs ``warmup + iters`` steps per side, alternating which side goes first.
Results: ``bench/results/pipeline_cpu.json``, ``pipeline_cpu.png`` (ratios and bubble fractions)
and ``pipeline_timeline_<schedule>_cpu.png`` / ``pipeline_timeline_cpu.txt`` (our measured
timelines, largest pp, the m nearest 8, timed stages).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402

from triton_parallel_layers.parallel_layers import ColumnParallelLinear, ParallelDims  # noqa: E402
from triton_parallel_layers.parallel_layers.pipeline import (  # noqa: E402
    TimedLayer,
    bubble_fraction,
    build_stages,
    gather_timelines,
    get_schedule,
    partition_layers,
    render_ascii,
    render_png,
)
from triton_parallel_layers.parallel_layers.testing import WorkerPool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb-h1"]
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "zb-h1": "ScheduleInterleavedZeroBubble",
}
LAYER_MS = 5.0  # timed workload: each pass of each TimedLayer
WIDTH_TIMED, WIDTH_MLP, ROWS_MLP = 8, 512, 64


def formula(schedule: str, pp: int, m: int, v: int) -> float:
    if schedule == "interleaved":
        return (pp - 1) / (v * m + pp - 1)
    if schedule == "zb-h1":
        return (pp - 1) / (3 * m + pp - 1)
    return (pp - 1) / (m + pp - 1)


def _layers(workload: str, n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    if workload == "timed":
        s = LAYER_MS / 1e3
        return [TimedLayer(WIDTH_TIMED, s, s, s) for _ in range(n)]
    return [nn.Sequential(ColumnParallelLinear(WIDTH_MLP, WIDTH_MLP), nn.GELU()) for _ in range(n)]


def _batch(workload: str, m: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    rows = m * (2 if workload == "timed" else ROWS_MLP)
    width = WIDTH_TIMED if workload == "timed" else WIDTH_MLP
    return torch.randn(rows, width, generator=gen), torch.randn(rows, width, generator=gen)


class _Torch:
    """The same stages under torch.distributed.pipelining."""

    def __init__(self, layers, partition, schedule: str, m: int, dims: ParallelDims) -> None:
        from torch.distributed import pipelining
        from torch.distributed.pipelining import schedules

        pp, rank = dims.pp, dims.pp_rank
        self.stages = []
        for s in range(rank, partition.num_stages, pp):
            a, b = partition.bounds[s]
            module = nn.Sequential(*layers[a:b])
            self.stages.append(
                pipelining.PipelineStage(
                    module, s, partition.num_stages, torch.device("cpu"), group=dims.pp_group
                )
            )
        cls = getattr(schedules, TORCH_SCHEDULES[schedule])
        single = issubclass(cls, schedules.PipelineScheduleSingle)
        self.schedule = cls(self.stages[0] if single else self.stages, m, loss_fn=F.mse_loss)
        self.first = any(st.stage_index == 0 for st in self.stages)
        self.last = any(st.stage_index == partition.num_stages - 1 for st in self.stages)
        self.modules = [st.submod for st in self.stages]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        losses: list[torch.Tensor] = []
        args = (x,) if self.first else ()
        self.schedule.step(*args, target=y if self.last else None, losses=losses)
        return float(torch.stack([loss.detach() for loss in losses]).mean()) if self.last else None

    def zero_grad(self) -> None:
        for module in self.modules:
            module.zero_grad(set_to_none=True)


def _busy(layers) -> float:
    return sum(getattr(layer, "busy_s", 0.0) for layer in layers)


def _case(
    workload: str, schedule: str, m: int, iters: int, warmup: int, sizes: dict | None = None
) -> dict:
    """Time ours and torch's on one configuration; every rank returns the same row."""
    global LAYER_MS, WIDTH_MLP, ROWS_MLP
    if sizes:
        LAYER_MS, WIDTH_MLP, ROWS_MLP = sizes["layer_ms"], sizes["mlp_width"], sizes["mlp_rows"]
    dims = ParallelDims(pp=dist.get_world_size())
    pp = dims.pp
    v = 2 if schedule == "interleaved" else 1
    layers = _layers(workload, 2 * pp)  # 2 layers per rank, in every schedule
    partition = partition_layers(layers, pp * v, [2 // v] * (pp * v))
    ours_layers = copy.deepcopy(layers)
    stages = build_stages(ours_layers, partition, dims.pp_group)
    ours = get_schedule(schedule)(stages, m, F.mse_loss)
    ours_mine = [ours_layers[j] for st in stages for j in range(*st.layer_range)]
    theirs = None
    if not (workload == "timed" and schedule == "zb-h1"):
        torch_layers = copy.deepcopy(layers)
        theirs = _Torch(torch_layers, partition, schedule, m, dims)
        theirs_mine = [layer for module in theirs.modules for layer in module]

    # same numbers first: a benchmark of two different computations would mean nothing
    x, y = _batch(workload, m, 0)
    loss_ours = float(ours.step(x, y))
    if theirs is not None:
        loss_theirs = theirs.step(x, y)
        if theirs.last and abs(loss_ours - loss_theirs) > 1e-5 * max(1.0, abs(loss_ours)):
            raise AssertionError(f"losses differ: ours {loss_ours}, torch {loss_theirs}")
        theirs.zero_grad()
    for p in (p for st in stages for p in st.parameters()):
        p.grad = None

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    busy: dict[str, list[float]] = {"ours": [], "torch": []}
    sides = [("ours", ours, ours_mine)] + ([("torch", theirs, theirs_mine)] if theirs else [])
    for i in range(warmup + iters):
        x, y = _batch(workload, m, i + 1)
        for name, impl, mine in sides if i % 2 else sides[::-1]:  # alternate who goes first
            dist.barrier(dims.pp_group)
            busy0 = _busy(mine)
            start = time.perf_counter()
            impl.step(x, y)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
                busy[name].append(_busy(mine) - busy0)
            if name == "ours":
                for st in stages:
                    for p in st.parameters():
                        p.grad = None
            else:
                impl.zero_grad()
    # the slowest rank's time per step, and every rank's busy time
    local = torch.tensor([times["ours"], busy["ours"], times["torch"] or [0.0] * iters,
                          busy["torch"] or [0.0] * iters], dtype=torch.float64)  # fmt: skip
    gathered = [torch.empty_like(local) for _ in range(pp)]
    dist.all_gather(gathered, local, group=dims.pp_group)
    g = torch.stack(gathered)  # (pp, 4, iters)
    step_ours, step_torch = g[:, 0].max(0).values, g[:, 2].max(0).values
    row = {
        "workload": workload,
        "pp": pp,
        "m": m,
        "v": v,
        "schedule": schedule,
        "torch_schedule": TORCH_SCHEDULES[schedule] if theirs else None,
        "ours_ms": 1e3 * statistics.median(step_ours.tolist()),
        "torch_ms": 1e3 * statistics.median(step_torch.tolist()) if theirs else None,
        "bubble_formula": formula(schedule, pp, m, v),
    }
    row["ratio"] = row["ours_ms"] / row["torch_ms"] if theirs else None
    if workload == "timed":
        bubble = 1 - g[:, 1].sum(0) / (pp * step_ours)
        row["ours_bubble"] = statistics.median(bubble.tolist())
        if theirs:
            bubble = 1 - g[:, 3].sum(0) / (pp * step_torch)
            row["torch_bubble"] = statistics.median(bubble.tolist())
    # one recorded step of ours: the timeline's bubble fraction and its rendering
    recorded = get_schedule(schedule)(stages, m, F.mse_loss, record_timeline=True)
    recorded.step(*_batch(workload, m, 99))
    timelines = gather_timelines(recorded.timeline, dims.pp_group)
    row["ours_timeline_bubble"] = bubble_fraction(timelines)
    row["timelines"] = timelines if dims.pp_rank == 0 else None
    return row


def run(grid: list[tuple[str, int, int]], iters: int, warmup: int, sizes: dict) -> list[dict]:
    rows = []
    for pp in sorted({pp for _, pp, _ in grid}):
        with WorkerPool(pp) as pool:
            for workload, gpp, m in grid:
                if gpp != pp:
                    continue
                for schedule in SCHEDULES:
                    row = pool.run(_case, workload, schedule, m, iters, warmup, sizes, timeout=600)[
                        0
                    ]
                    rows.append(row)
                    ratio = f"{row['ratio']:.3f}" if row["ratio"] else "  -  "
                    torch_ms = f"{row['torch_ms']:8.1f}" if row["torch_ms"] else "     -  "
                    bub = row.get("ours_bubble", row["ours_timeline_bubble"])
                    tb = row.get("torch_bubble")
                    print(
                        f"{workload:5s} pp={pp} m={m:2d} {schedule:11s} ours {row['ours_ms']:8.1f} "
                        f"ms  torch {torch_ms} ms  ratio {ratio}  bubble ours {bub:.3f} "
                        f"torch {'-' if tb is None else f'{tb:.3f}'}  formula "
                        f"{row['bubble_formula']:.3f}",
                        flush=True,
                    )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, workload in zip(axes[:2], ("timed", "mlp")):
        sel = [r for r in rows if r["workload"] == workload and r["ratio"]]
        labels = [f"{r['schedule']}\npp={r['pp']} m={r['m']}" for r in sel]
        ax.bar(range(len(sel)), [r["ratio"] for r in sel], color="tab:blue")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(sel)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("step time, ours / torch.distributed.pipelining")
        ax.set_title(f"{workload} stages (below 1: ours faster)")
    ax = axes[2]
    colors = {"gpipe": "tab:gray", "1f1b": "tab:blue", "interleaved": "tab:orange",
              "zb-h1": "tab:green"}  # fmt: skip
    for schedule in SCHEDULES:
        for pp, style in ((2, "--"), (4, "-")):
            sel = [r for r in rows if r["workload"] == "timed" and r["schedule"] == schedule
                   and r["pp"] == pp]  # fmt: skip
            if not sel:
                continue
            ax.plot([r["m"] for r in sel], [r["ours_bubble"] for r in sel], style, marker="o",
                    color=colors[schedule], label=f"ours {schedule} pp={pp}")  # fmt: skip
            tb = [r.get("torch_bubble") for r in sel]
            if all(b is not None for b in tb):
                ax.plot([r["m"] for r in sel], tb, style, marker="x", color=colors[schedule],
                        alpha=0.5, label=f"torch {schedule} pp={pp}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches m")
    ax.set_ylabel("bubble fraction (timed stages)")
    ax.set_title("measured bubble fraction")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny configuration (smoke)")
    parser.add_argument("--workloads", default="timed,mlp")
    parser.add_argument("--pp", default="2,4", help="pipeline sizes, comma-separated")
    parser.add_argument(
        "--ms", default=None, help="microbatch counts (default: timed 4,8,16; mlp 4,8)"
    )
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layer-ms", type=float, default=LAYER_MS)
    parser.add_argument("--mlp-width", type=int, default=WIDTH_MLP)
    parser.add_argument("--mlp-rows", type=int, default=ROWS_MLP)
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.pp, args.ms, args.iters, args.warmup = "2", "2", 1, 1
        args.layer_ms, args.mlp_width, args.mlp_rows = 1.0, 32, 4
    sizes = {"layer_ms": args.layer_ms, "mlp_width": args.mlp_width, "mlp_rows": args.mlp_rows}
    default_ms = {"timed": (4, 8, 16), "mlp": (4, 8)}
    grid = [
        (w, pp, m)
        for w in args.workloads.split(",")
        for pp in (int(p) for p in args.pp.split(","))
        for m in (tuple(int(x) for x in args.ms.split(",")) if args.ms else default_ms[w])
    ]
    rows = run(grid, args.iters, args.warmup, sizes)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # our measured timelines of the timed stages at the largest pp and the m nearest 8
    timed = [r for r in rows if r["workload"] == "timed"]
    shown = min(((-r["pp"], abs(r["m"] - 8), r["m"]) for r in timed), default=None)
    timelines = {}
    for r in rows:
        tl = r.pop("timelines")
        if shown and r["workload"] == "timed" and (-r["pp"], abs(r["m"] - 8), r["m"]) == shown:
            timelines[r["schedule"]] = tl
    ratios: dict[str, list[float]] = {}
    for r in rows:
        if r["ratio"]:
            ratios.setdefault(r["schedule"], []).append(r["ratio"])
    summary = {k: {"median": statistics.median(v), "max": max(v), "min": min(v)}
               for k, v in ratios.items()}  # fmt: skip
    meta = {
        "machine": cpu_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "backend": "gloo (CPU), 1 thread per process",
        "timed_layer_ms": args.layer_ms,
        "mlp": {
            "width": args.mlp_width,
            "rows_per_microbatch": args.mlp_rows,
            "layers_per_rank": 2,
        },  # fmt: skip
        "iters": args.iters,
        "warmup": args.warmup,
        "command": "python bench/bench_pipeline.py " + " ".join(argv or sys.argv[1:]),
    }
    result = {"meta": meta, "ratio_summary": summary, "rows": rows}
    (out / "pipeline_cpu.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "pipeline_cpu.png")
    if timelines:
        text = []
        for name, tl in timelines.items():
            title = (
                f"ours {name}, timed stages, pp={len(tl)}, m={shown[2]} (measured; bubble "
                f"{bubble_fraction(tl):.3f})"
            )
            text.append(render_ascii(tl, title=title))
            render_png(tl, str(out / f"pipeline_timeline_{name}_cpu.png"), title=title)
        (out / "pipeline_timeline_cpu.txt").write_text("\n\n".join(text) + "\n")
    print(f"ratio ours/torch per schedule: {json.dumps(summary, indent=1)}")
    print(f"wrote {out / 'pipeline_cpu.json'} and {out / 'pipeline_cpu.png'}")
    return result


if __name__ == "__main__":
    main()
