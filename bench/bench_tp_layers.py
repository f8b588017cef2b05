"""Step time of a tensor-parallel MLP block: these layers against PyTorch's DTensor tensor parallel.

The block is the Megatron MLP, ``Linear(E, 4E) -> GELU -> Linear(4E, E)``, parallelized two ways
from the same single-device module:

* ours: ``ColumnParallelLinear.from_linear`` / ``RowParallelLinear.from_linear``;
* DTensor: ``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``.

Both run in the same processes, interleaved step by step (so machine noise hits both alike), each
step a forward, a backward and a gradient reset. Reported: the median step time of each and the
ratio ours / DTensor (below 1 is faster). Three variants of ours:

* ``tp``: plain TP (replicated activations);
* ``sp``: sequence parallel (activations sharded along the sequence between blocks), Megatron-LM's
  schedule: a plain all-gather and reduce-scatter forward, and backward the re-gather of the
  saved input overlapped with the input-gradient GEMM and the reduce-scatter of the input
  gradient overlapped with the weight-gradient GEMM;
* ``sp+overlap``: sequence parallel with ``overlap_comm=True``, the collective matmuls: the
  forward's all-gather and reduce-scatter too travel chunk by chunk (a ring) while the GEMM
  computes the chunks already there. Same bytes, same GEMMs, same numbers as ``sp``. DTensor has
  no eager counterpart, so this row's DTensor step is the ``sp`` one (timed once, in the same loop).

A step ends when its output and input gradient are ready to be read: DTensor hands back its
last collectives' results as ``AsyncCollectiveTensor`` objects, and the step waits for them, as
the layers around the block would (see :func:`_complete`).

Also measured in the same loop, interleaved with the steps: the step's *floor*, its six GEMMs
alone (``torch.mm`` on preallocated tensors of the same shapes: forward fc1 and fc2, backward the
input and weight gradients of each) plus its collectives alone (``torch.distributed`` on
preallocated buffers, dim 0, no layout copies): plain TP an all-reduce of ``(B*S, E)`` forward and
one backward; sequence parallel an all-gather and a reduce-scatter forward and, backward, the
all-gather of the output gradient, the all-gather of the saved input shard again (our layers save
the shard, not the gathered input) and the reduce-scatter of the input gradient. Reported:
overhead = step / floor, for ours and for DTensor against the same floor (the GELU, the bias
adds and the layout work are what the floor leaves out).

The floor's collectives run back to back, and on gloo the second of two back-to-back collectives
is faster than one alone (its transport is warm), while the step never issues two in a row (GEMMs
sit between them). So each collective is also timed on its own, after its own barrier, and
reported beside: ``comms_each_ms`` (their sum) and ``overhead_comms_each`` = step / (GEMMs + that
sum). The goal (step / floor <= 1.1 at the two larger sizes) is judged on the first floor.

The whole grid is swept ``--repeats`` times (default 3) in one set of processes; each figure is
the median over every timed step of every sweep, and each sweep's own ratio and step / floor are
kept (``ratio_per_repeat``, ``overhead_per_repeat``): on a shared 2-core machine they move by a
few hundredths between sweeps, which is the resolution of these figures.

    python bench/bench_tp_layers.py                  # TP=2 on gloo (CPU), the default grid
    python bench/bench_tp_layers.py --tp 4 --iters 50
    python bench/bench_tp_layers.py --profile 8x128x512   # where our step's time goes (no file)
    python bench/bench_tp_layers.py --profile 8x128x512 --variant sp+overlap
    python bench/bench_tp_layers.py --breakdown 8x128x512 --variant sp   # phase by phase vs floor

``--breakdown`` times our step phase by phase with wall-clock marks (fc1, GELU, fc2 forward, then
their backwards, split by autograd hooks), each GEMM and collective of the floor alone after a
barrier, and prints each phase beside its share of the floor: where the step / floor excess sits.
Use it for the small operations: the profiler's own bookkeeping inflates them (GELU forward at
8x128x512: about 1.8 ms a call in ``--profile``, 0.8 ms between wall-clock marks).

Results: ``bench/results/tp_layers_<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
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

from _machine import machine_name  # noqa: E402

from triton_parallel_layers.kernels.collectives import (  # noqa: E402
    _all_gather_base,  # torch's entry points, whichever names the installed torch has
    _reduce_scatter_base,
)
from triton_parallel_layers.parallel_layers import (  # noqa: E402
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
)
from triton_parallel_layers.parallel_layers.testing import run_distributed  # noqa: E402

# (batch, sequence, hidden): the MLP's FFN width is 4 * hidden.
DEFAULT_SHAPES = [(4, 64, 128), (4, 128, 256), (8, 128, 512), (4, 256, 1024)]


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# The variants of ours: (name, sequence_parallel, overlap_comm).
VARIANTS = [("tp", False, False), ("sp", True, False), ("sp+overlap", True, True)]


def _ours(mlp: MLP, group, sequence_parallel: bool, overlap_comm: bool = False) -> nn.Module:
    par = MLP.__new__(MLP)
    nn.Module.__init__(par)
    options = {"sequence_parallel": sequence_parallel, "overlap_comm": overlap_comm}
    par.fc1 = ColumnParallelLinear.from_linear(mlp.fc1, group, **options)
    par.fc2 = RowParallelLinear.from_linear(mlp.fc2, group, **options)
    return par


def _dtensor(mlp: MLP, mesh, sequence_parallel: bool) -> nn.Module:
    import copy

    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    if sequence_parallel:
        plan = {
            "fc1": ColwiseParallel(input_layouts=Shard(1)),
            "fc2": RowwiseParallel(output_layouts=Shard(1)),
        }
    else:
        plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    return parallelize_module(copy.deepcopy(mlp), mesh, plan)


def _complete(*tensors: torch.Tensor | None) -> None:
    """Wait for the collectives still in flight behind ``tensors``.

    DTensor returns the output of its last forward collective (and, under sequence parallelism,
    the input gradient) as an ``AsyncCollectiveTensor``: the collective completes when something
    reads the tensor. In a model the next layer would; here nothing does, so without this wait the
    step would stop before its own communication finished, and every unwaited collective would
    keep its buffer alive in torch's work registry (the process grows by megabytes a step, and
    every step's allocations, ours included, land on fresh pages). Our layers return finished
    tensors, for which this does nothing.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    for t in tensors:
        if isinstance(t, AsyncCollectiveTensor):
            t.wait()


def _step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    start = time.perf_counter()
    y = model(x)
    y.backward(dy)
    _complete(y, x.grad)  # what the layers around the block would read
    _clear_grads(model, x)
    return time.perf_counter() - start


def _clear_grads(model: nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    x.grad = None  # (a real block hands it to the layer before; accumulating it is not the step)


def _floor_ops(batch: int, seq: int, hidden: int, tp: int, sequence_parallel: bool, group):
    """``(gemms, collectives)``: the step's six GEMMs and its collectives, each a callable running
    it alone on buffers allocated here (see the module docstring), in the order the step runs
    them: GEMMs forward fc1 and fc2, then backward fc2's input and weight gradients and fc1's;
    collectives as the comments below and :data:`PHASES` list them."""
    m, e, f = batch * seq, hidden, 4 * hidden // tp  # tokens, width, FFN width per rank
    r = torch.randn
    # (out, a, b): out = a @ b for the six GEMMs of fc1 (E -> F) and fc2 (F -> E)
    shapes = [((m, f), (m, e), (e, f)), ((m, e), (m, f), (f, e)),  # forward fc1, fc2
              ((m, f), (m, e), (e, f)), ((e, f), (e, m), (m, f)),  # fc2: grad_x, grad_w
              ((m, e), (m, f), (f, e)), ((f, e), (f, m), (m, e))]  # fmt: skip  # fc1
    gemms = [functools.partial(torch.mm, r(*a), r(*b), out=r(*o)) for o, a, b in shapes]

    full, shard = r(m, e), r(m // tp, e)
    if sequence_parallel:
        # forward: gather x, reduce-scatter y; backward: gather dy, gather x again, reduce-scatter
        ops = [("ag", full, shard), ("rs", shard, full)] + [("ag", full, shard)] * 2
        ops += [("rs", shard, full)]
    else:
        ops = [("ar", full, None)] * 2  # forward: fc2's output; backward: fc1's input gradient

    def collective(kind: str, out: torch.Tensor, inp: torch.Tensor | None) -> None:
        if kind == "ar":
            dist.all_reduce(out, group=group)
        elif kind == "ag":
            _all_gather_base(out, inp, group=group)
        else:
            _reduce_scatter_base(out, inp, group=group)

    return gemms, [functools.partial(collective, *op) for op in ops]


def _run_all(ops) -> None:
    for op in ops:
        op()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _setup(batch, seq, hidden, sequence_parallel, dims) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """The single-device block from seed 0, this rank's input (its sequence shard under sequence
    parallelism; it requires grad, as a block's input inside a model) and output gradient."""
    torch.manual_seed(0)
    mlp = MLP(hidden)
    x = torch.randn(batch, seq, hidden)
    if sequence_parallel:
        x = x.chunk(dims.tp, 1)[dims.tp_rank].contiguous()
    x.requires_grad_()
    return mlp, x, torch.randn_like(x)


def _case_times(batch, seq, hidden, sequence_parallel, dims, iters, warmup) -> dict:
    """One configuration's timed runs: ``{name: [seconds per step]}`` for each variant of ours
    (by its name in :data:`VARIANTS`), DTensor, the floor's GEMMs and collectives, and each
    collective alone (``comm0``, ``comm1``, ..)."""
    mlp, x, dy = _setup(batch, seq, hidden, sequence_parallel, dims)
    ours = {
        name: _ours(mlp, dims.tp_group, sp, overlap)
        for name, sp, overlap in VARIANTS
        if sp == sequence_parallel
    }
    theirs = _dtensor(mlp, dims.tp_mesh, sequence_parallel)
    # Same numbers first: a benchmark of different computations would mean nothing.
    for model in ours.values():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-5, atol=1e-5)
    gemms, collectives = _floor_ops(batch, seq, hidden, dims.tp, sequence_parallel, dims.tp_group)
    runs = {name: functools.partial(_step, model, x, dy) for name, model in ours.items()}
    runs.update({
        "dtensor": functools.partial(_step, theirs, x, dy),
        "gemms": functools.partial(_timed, functools.partial(_run_all, gemms)),
        "comms": functools.partial(_timed, functools.partial(_run_all, collectives)),
    })  # fmt: skip
    runs.update({f"comm{k}": functools.partial(_timed, op) for k, op in enumerate(collectives)})
    times = {k: [] for k in runs}
    for i in range(warmup + iters):
        for name, run in runs.items():
            dist.barrier(dims.tp_group)
            t = run()
            if i >= warmup:
                times[name].append(t)
    return times


def _row(batch, seq, hidden, variant: str, times: list[dict]) -> dict:
    """One variant's row from its configuration's repeats' times: medians over every timed step
    of every repeat, and each repeat's own ratio and overhead (the spread between repeats)."""
    _, sequence_parallel, overlap_comm = next(v for v in VARIANTS if v[0] == variant)
    pooled = {k: [t for rep in times for t in rep[k]] for k in times[0]}
    med = {k: statistics.median(v) for k, v in pooled.items()}
    comm_keys = [k for k in med if k.startswith("comm") and k != "comms"]
    floor = med["gemms"] + med["comms"]
    comms_each = sum(med[k] for k in comm_keys)

    def rep_med(rep: dict, k: str) -> float:
        return statistics.median(rep[k])

    return {
        "batch": batch,
        "seq": seq,
        "hidden": hidden,
        "variant": variant,
        "sequence_parallel": sequence_parallel,
        "overlap_comm": overlap_comm,
        "ours_ms": 1e3 * med[variant],
        "dtensor_ms": 1e3 * med["dtensor"],
        "ratio": med[variant] / med["dtensor"],
        "gemms_ms": 1e3 * med["gemms"],
        "comms_ms": 1e3 * med["comms"],
        "floor_ms": 1e3 * floor,
        "overhead": med[variant] / floor,
        "dtensor_overhead": med["dtensor"] / floor,
        "comms_each_ms": 1e3 * comms_each,
        "overhead_comms_each": med[variant] / (med["gemms"] + comms_each),
        "ratio_per_repeat": [rep_med(r, variant) / rep_med(r, "dtensor") for r in times],
        "overhead_per_repeat": [
            rep_med(r, variant) / (rep_med(r, "gemms") + rep_med(r, "comms")) for r in times
        ],
    }


def _worker(shapes, iters: int, warmup: int, threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    dims = ParallelDims(tp=dist.get_world_size())
    cases = [(*shape, sp) for shape in shapes for sp in (False, True)]
    times: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(repeats):  # each repeat sweeps every case, so slow drifts hit them all
        for case in cases:
            times[case].append(_case_times(*case, dims, iters, warmup))
    return [
        _row(*case[:3], variant, times[case])
        for case in cases
        for variant, sp, _ in VARIANTS
        if sp == case[3]
    ]


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Left: ours / DTensor per size. Right: step / floor, ours and DTensor, with the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys((r["batch"], r["seq"], r["hidden"]) for r in rows))  # grid order
    by_key = {(r["batch"], r["seq"], r["hidden"], r["variant"]): r for r in rows}
    names = {"tp": "plain TP", "sp": "sequence parallel", "sp+overlap": "SP, overlap_comm"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.27
    for k, (variant, _, _) in enumerate(VARIANTS):
        name = names[variant]
        xs = [i + (k - 1) * width for i in range(len(labels))]
        left.bar(xs, [by_key[(*lab, variant)]["ratio"] for lab in labels], width, label=name)
        right.bar(xs, [by_key[(*lab, variant)]["overhead"] for lab in labels], width,
                  label=f"ours, {name}")  # fmt: skip
        # DTensor's own step / floor (for sp+overlap, its sp step again)
        right.scatter(xs, [by_key[(*lab, variant)]["dtensor_overhead"] for lab in labels],
                      marker="_", s=150, color="k", zorder=3, label="DTensor" if k == 0 else None)  # fmt: skip
    ticks = [f"B{b} S{s}\nE{e}" for b, s, e in labels]
    left.axhline(1.0, color="k", lw=0.8)
    left.set_xticks(range(len(labels)), ticks)
    left.set_ylabel("step time, ours / DTensor (below 1: ours faster)")
    left.legend(fontsize=8)
    right.axhline(1.1, color="g", lw=0.8, ls="--", label="goal 1.1 (two larger sizes)")
    right.axhline(1.0, color="k", lw=0.8)
    right.set_xticks(range(len(labels)), ticks)
    right.set_ylabel("step / floor (GEMMs alone + collectives alone)")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _profile(shape: tuple[int, int, int], variant: str, threads: int) -> str:
    """Rank 0's ``torch.profiler`` table (by self CPU time) over 10 steps of ``variant`` (a name
    in :data:`VARIANTS`) at ``shape``."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    dims = ParallelDims(tp=dist.get_world_size())
    _, sequence_parallel, overlap_comm = next(v for v in VARIANTS if v[0] == variant)
    mlp, x, dy = _setup(*shape, sequence_parallel, dims)
    ours = _ours(mlp, dims.tp_group, sequence_parallel, overlap_comm)
    for _ in range(3):
        _step(ours, x, dy)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(10):
            dist.barrier(dims.tp_group)
            _step(ours, x, dy)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25
    )


# The phases of our step that --breakdown times, each with its share of the floor: (name, the
# floor's GEMMs in it, its collectives under sequence parallelism, without), as indices into
# what _floor_ops returns.
PHASES = [
    ("fc1 forward", [0], [0], []),  # SP: x all-gathered first
    ("GELU", [], [], []),
    ("fc2 forward", [1], [1], [0]),  # partial sums reduce-scattered (SP) or all-reduced; the bias
    ("fc2 backward", [2, 3], [2], []),  # SP: the output gradient all-gathered first
    ("GELU backward", [], [], []),
    # SP: x gathered again and dx reduce-scattered, TP: dx all-reduced, beside the GEMMs
    ("fc1 backward", [4, 5], [3, 4], [1]),
]


def _phase_times(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[float]:
    """One of our steps (as :func:`_step`), in seconds per phase of :data:`PHASES`: wall-clock
    marks between the three forward calls, and in the backward when the gradients of GELU's
    output and input arrive (autograd hooks)."""
    marks = [time.perf_counter()]

    def mark(_grad: torch.Tensor | None = None) -> None:
        marks.append(time.perf_counter())

    h = model.fc1(x)  # MLP.forward, one call at a time
    mark()
    a = F.gelu(h)
    mark()
    y = model.fc2(a)
    mark()
    a.register_hook(mark)  # fc2's backward is done
    h.register_hook(mark)  # GELU's backward is done
    y.backward(dy)
    mark()
    _clear_grads(model, x)
    return [end - start for start, end in zip(marks, marks[1:])]


def _breakdown(shape, variant: str, threads: int, iters: int, warmup: int) -> dict:
    """This rank's medians over ``iters`` steps of ``variant`` at ``shape``: seconds per phase
    (``ours``), and per GEMM and collective of the floor, each timed alone after a barrier."""
    torch.set_num_threads(threads)
    dims = ParallelDims(tp=dist.get_world_size())
    _, sequence_parallel, overlap_comm = next(v for v in VARIANTS if v[0] == variant)
    mlp, x, dy = _setup(*shape, sequence_parallel, dims)
    ours = _ours(mlp, dims.tp_group, sequence_parallel, overlap_comm)
    gemms, comms = _floor_ops(*shape, dims.tp, sequence_parallel, dims.tp_group)

    def alone(op) -> float:
        dist.barrier(dims.tp_group)
        return _timed(op)

    times = {"ours": [], "gemms": [], "comms": []}
    for i in range(warmup + iters):
        dist.barrier(dims.tp_group)
        row = {"ours": _phase_times(ours, x, dy)}
        row["gemms"], row["comms"] = [alone(op) for op in gemms], [alone(op) for op in comms]
        if i >= warmup:
            for k, v in row.items():
                times[k].append(v)
    return {k: [statistics.median(c) for c in zip(*v)] for k, v in times.items()}


def breakdown_table(per_rank: list[dict], sequence_parallel: bool) -> str:
    """Our step against its floor phase by phase (ms, the mean of the ranks' medians)."""

    def mean(kind: str, k: int) -> float:
        return 1e3 * statistics.fmean(r[kind][k] for r in per_rank)

    lines = [f"{'phase':<14} {'ours ms':>8} {'floor ms':>9} {'excess ms':>10}"]
    total_ours = total_floor = 0.0
    for k, (name, gemm_ids, sp_comms, tp_comms) in enumerate(PHASES):
        comm_ids = sp_comms if sequence_parallel else tp_comms
        ours = mean("ours", k)
        floor = sum(mean("gemms", g) for g in gemm_ids) + sum(mean("comms", c) for c in comm_ids)
        total_ours, total_floor = total_ours + ours, total_floor + floor
        lines.append(f"{name:<14} {ours:>8.3f} {floor:>9.3f} {ours - floor:>10.3f}")
    lines.append(f"{'step':<14} {total_ours:>8.3f} {total_floor:>9.3f} "
                 f"{total_ours - total_floor:>10.3f}   step / floor {total_ours / total_floor:.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel processes (gloo)")
    parser.add_argument("--iters", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="sweeps of the whole grid (the figures are medians over all of them; each "
        "repeat's ratio and overhead are kept, to show the spread)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--shapes", type=str, default=None, help="e.g. '4x64x128,8x128x512' (BxSxE)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--profile",
        metavar="BxSxE",
        default=None,
        help="instead of the benchmark: profile 10 of our steps at this shape (the variant "
        "--variant names) with torch.profiler and print where the time goes; writes nothing",
    )
    parser.add_argument(
        "--breakdown",
        metavar="BxSxE",
        default=None,
        help="instead of the benchmark: time our step at this shape (the variant --variant "
        "names) phase by phase against the floor's share of each phase (--iters steps); "
        "writes nothing",
    )
    parser.add_argument(
        "--variant",
        "--profile-variant",
        dest="variant",
        choices=[v[0] for v in VARIANTS],
        default="tp",
        help="which of ours --profile and --breakdown look at (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.profile:
        shape = tuple(int(v) for v in args.profile.split("x"))
        print(run_distributed(_profile, args.tp, shape, args.variant, args.threads)[0])
        return {}
    if args.breakdown:
        shape = tuple(int(v) for v in args.breakdown.split("x"))
        per_rank = run_distributed(
            _breakdown, args.tp, shape, args.variant, args.threads, args.iters, args.warmup
        )
        sequence_parallel = next(v[1] for v in VARIANTS if v[0] == args.variant)
        print(f"{machine_name()}, TP={args.tp} on gloo, {args.variant} at {args.breakdown}, "
              f"medians over {args.iters} steps; the floor's GEMMs and collectives each alone")  # fmt: skip
        print(breakdown_table(per_rank, sequence_parallel))
        return {}
    load = os.getloadavg()
    shapes = (
        [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else DEFAULT_SHAPES
    )

    rows = run_distributed(
        _worker, args.tp, shapes, args.iters, args.warmup, args.threads, args.repeats,
        timeout=3600,
    )[0]  # fmt: skip
    result = {
        "benchmark": "tp_mlp_step",
        "machine": machine_name(),
        "backend": "gloo",
        "tp": args.tp,
        "threads_per_rank": args.threads,
        "load_average_1_5_15min_at_start": [round(v, 2) for v in load],
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "iters": args.iters,
        "repeats": args.repeats,
        "rows": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
    }
    print(f"{result['machine']}, torch {torch.__version__}, TP={args.tp} on gloo")
    print(f"load average at start (1, 5, 15 min): {result['load_average_1_5_15min_at_start']}")
    print(f"{'B':>3} {'S':>5} {'E':>5} {'variant':>10} {'ours ms':>9} {'DTensor ms':>11} {'ratio':>7} "
          f"{'GEMMs ms':>9} {'comms ms':>9} {'ours/floor':>10} {'DT/floor':>9} "
          f"{'comms each':>10} {'ours/floor each':>15} {'ours/floor per repeat':>22}")  # fmt: skip
    for r in rows:
        print(
            f"{r['batch']:>3} {r['seq']:>5} {r['hidden']:>5} {r['variant']:>10} "
            f"{r['ours_ms']:>9.3f} {r['dtensor_ms']:>11.3f} {r['ratio']:>7.3f} "
            f"{r['gemms_ms']:>9.3f} {r['comms_ms']:>9.3f} {r['overhead']:>10.3f} "
            f"{r['dtensor_overhead']:>9.3f} {r['comms_each_ms']:>10.3f} "
            f"{r['overhead_comms_each']:>15.3f} "
            f"{' '.join(f'{v:.3f}' for v in r['overhead_per_repeat']):>22}"
        )
    print(f"median ratio ours/DTensor: {result['median_ratio']:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"tp_layers_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, f"TP={args.tp} MLP fwd+bwd step, {result['machine']}", stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
