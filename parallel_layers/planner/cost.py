"""The cost model: step time and peak memory per rank of one parallel layout.

For a :class:`Layout` ``(dp, pp, tp, sequence parallel, schedule, chunks, microbatches, microbatch
size)`` and a model profile (:mod:`.profile`) on a machine (:mod:`.hardware`):

* **Stages.** The layers are cut into ``pp x chunks`` contiguous stages balanced by parameters,
  as the training engine cuts them.
* **Compute per microbatch and stage.** Forward: matmul FLOPs / tp at the GEMM rate, plus the
  bytes the memory-bound ops move at the memory rate (their sharded share / tp; the rest / tp only
  under sequence parallelism). Backward: twice both; for zero-bubble schedules split into ``B``
  (input gradient, one matmul share plus the memory-bound work) and ``W`` (weight gradient, one
  matmul share). With activation recomputation the backward also redoes the forward. A profile
  with measured layer times (``profile_model(..., time_layers=True)``) replaces the counted times:
  each measured pass (forward; backward, split into ``B`` and ``W`` by the counted shares unless
  the profile gives ``W``) is its measured fixed part (the per-op overhead of kernel launches and
  Python and autograd dispatch, from the layer timed at two row counts) plus a part proportional
  to the rows, and only the latter is scaled by the microbatch size and by the ratio of the
  pass's counted time in the layout to its counted time unsharded (so tp divides what it shards).
  The fixed part is paid whole by every rank of a tensor-parallel group and by every microbatch:
  this is why tensor parallelism and small microbatches gain less than linearly on a small model.
  That is how the CPU's per-op overheads and small-GEMM rates enter, from two timings per layer
  and no constant fitted to step times. (A profile without the fixed parts, saved before they
  were measured, scales the whole pass.)
* **Tensor-parallel communication** (on the critical path, as the layers run it): each recorded
  collective moves ``(tp-1)/tp`` of its activation per step of the ring, twice for an all-reduce;
  all-gather + reduce-scatter under sequence parallelism move the same bytes, and the backward
  gathers each column-parallel input once more (only its shard is saved).
* **Pipeline.** The package's own per-rank action lists run through its simulator
  (:func:`~triton_parallel_layers.parallel_layers.pipeline.simulate`) with the slowest stage's
  ``F``/``B``/``W`` and the point-to-point time of one activation as the cross-rank latency; for
  long lists (more than ``SIMULATE_LIMIT`` actions) the closed forms the simulator reproduces.
* **Data parallelism.** One ring all-reduce of the gradients per step (fp32 by default), not
  overlapped with the backward (conservative; DDP overlaps part of it); FSDP instead reduce-scatters
  gradients and all-gathers parameters twice.
* **Optimizer.** Adam reads and writes about 28 bytes per parameter held, or, on a measured
  spec, takes the measured time of an AdamW step per parameter (several passes over the state on
  a CPU, about 4 times the 28 bytes' streaming time).
* **Memory** of the busiest rank: its parameters (a parameter two of its layers share, once),
  gradients and Adam moments (``bytes_per_param``, 16 for fp32 weights under autocast; divided by
  dp under FSDP), plus the activations it holds for backward: per (microbatch, chunk) in flight
  (counted from its action list) its stage's saved tensors (each set of elements once; at pp > 1
  with the stage input the schedule keeps), under ZB-H1 the inputs and output gradients each
  deferred weight-gradient pass keeps, the output being sent and the buffers of receives posted
  ahead of the action needing them (counted from the posting plan); sharded as above. This is what
  :class:`~triton_parallel_layers.parallel_layers.pipeline.ActivationMemoryTracker` measures
  (``bench/bench_planner_cpu.py`` compares the two).

Links: a tensor-parallel group of ``tp`` neighbouring ranks uses the intra-node link when it fits
in a node, else the network; the same for the data-parallel group (``dp x tp`` ranks apart at
most) and for pipeline neighbours (``dp x tp`` ranks apart).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from triton_parallel_layers.parallel_layers.pipeline.actions import (
    Message,
    action_messages,
    gpipe_actions,
    ideal_bubble_fraction,
    interleaved_actions,
    one_f_one_b_actions,
    p2p_plan,
    simulate,
    zb_h1_actions,
)
from triton_parallel_layers.parallel_layers.pipeline.partition import balanced_bounds
from triton_parallel_layers.parallel_layers.planner.hardware import HardwareSpec
from triton_parallel_layers.parallel_layers.planner.profile import DTYPE_BYTES, ModelProfile

__all__ = [
    "SCHEDULES",
    "SIMULATE_LIMIT",
    "Estimate",
    "Layout",
    "estimate",
    "in_flight",
    "in_flight_by_rank",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
SIMULATE_LIMIT = 4096  # actions; longer schedules use the closed forms


@dataclass(frozen=True)
class Layout:
    """One way to run the job. ``schedule`` is ``"none"`` at ``pp == 1``, where ``microbatches``
    means gradient accumulation."""

    dp: int
    pp: int
    tp: int
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    chunks: int = 1
    microbatches: int = 1
    """Microbatches per data-parallel replica per step."""
    micro_batch_size: int = 1
    """Samples per microbatch."""
    fsdp: bool = False
    recompute: bool = False

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def __str__(self) -> str:
        parts = [f"dp={self.dp}", f"pp={self.pp}", f"tp={self.tp}"]
        if self.sequence_parallel:
            parts.append("sp")
        if self.pp > 1:
            parts.append(self.schedule + (f"x{self.chunks}" if self.chunks > 1 else ""))
        parts.append(f"m={self.microbatches}x{self.micro_batch_size}")
        if self.fsdp:
            parts.append("fsdp")
        if self.recompute:
            parts.append("recompute")
        return " ".join(parts)


@dataclass
class Estimate:
    """The predicted cost of one step of ``layout`` (seconds, bytes per rank)."""

    layout: Layout
    step_time: float
    compute_time: float
    """Busy time of the slowest pipeline rank (its F/B/W, TP communication included)."""
    bubble_fraction: float
    """Idle share of the pipeline's ``pp x makespan`` (0 at pp = 1)."""
    tp_comm_time: float
    """Tensor-parallel communication on the slowest rank per step."""
    pp_comm_time: float
    """Point-to-point time of one microbatch's activation (forward) and gradient (backward)."""
    dp_comm_time: float
    optimizer_time: float
    peak_memory: float
    """Bytes on the busiest rank: parameters, gradients, optimizer state, activations in flight."""
    samples_per_s: float
    tokens_per_s: float
    model_flops_per_gpu: float
    """Model FLOP/s per GPU (the profile's count, no recomputation counted)."""
    stage_bounds: list[tuple[int, int]] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "layout": str(self.layout),
            "step_s": self.step_time,
            "tokens_per_s": self.tokens_per_s,
            "bubble": self.bubble_fraction,
            "tp_comm_s": self.tp_comm_time,
            "dp_comm_s": self.dp_comm_time,
            "peak_gb": self.peak_memory / 1e9,
            "tflops_per_gpu": self.model_flops_per_gpu / 1e12,
        }


@functools.lru_cache(maxsize=256)
def _stage_bounds(params: tuple[int, ...], stages: int) -> list[tuple[int, int]]:
    return balanced_bounds([float(p) for p in params], stages)


@functools.lru_cache(maxsize=64)
def _actions(schedule: str, pp: int, m: int, v: int):
    if schedule == "gpipe":
        return gpipe_actions(pp, m)
    if schedule == "1f1b":
        return one_f_one_b_actions(pp, m)
    if schedule == "interleaved":
        return interleaved_actions(pp, m, v)
    if schedule == "zb-h1":
        return zb_h1_actions(pp, m)
    raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")


@functools.lru_cache(maxsize=64)
def _plan(schedule: str, pp: int, m: int, v: int):
    return p2p_plan(_actions(schedule, pp, m, v), v)


def in_flight_by_rank(schedule: str, pp: int, m: int, v: int = 1) -> list[int]:
    """Per pipeline rank, the most (microbatch, chunk) activations it holds at once.

    Counted from the action lists when short; the closed forms otherwise (GPipe ``m``; 1F1B and
    ZB-H1 ``min(m, pp - r)`` on rank ``r``; interleaved, on every rank, rank 0's
    ``min(m v, (v - 1) pp + 2 (pp - 1) + 1)``), which the tests check against the lists."""
    if pp == 1:
        return [1]
    if pp * m * v * 3 <= SIMULATE_LIMIT:
        out = []
        for acts in _actions(schedule, pp, m, v):
            live = most = 0
            for a in acts:
                live += {"F": 1, "B": -1}.get(a.kind, 0)
                most = max(most, live)
            out.append(most)
        return out
    if schedule == "gpipe":
        return [m] * pp
    if schedule in ("1f1b", "zb-h1"):
        return [min(m, pp - r) for r in range(pp)]
    return [min(m * v, (v - 1) * pp + 2 * (pp - 1) + 1)] * pp


def _held_peak(
    schedule: str,
    pp: int,
    m: int,
    v: int,
    rank: int,
    act: list[float],
    wgt: list[float],
    recv: dict[str, list[float]],
) -> float:
    """Most bytes ``rank`` holds at once: ``act[c]`` per microbatch in flight on its chunk ``c``,
    under ZB-H1 ``wgt[c]`` per weight-gradient pass deferred (its layers' inputs and output
    gradients, kept from ``B`` to ``W``), and the buffers of the receives posted ahead of the
    action needing them (``recv["act"][c]``: chunk ``c``'s input, ``recv["grad"][c]``: its
    output's gradient), from their posting (:func:`p2p_plan`) to that action. From the action
    lists and their plan when short, else each count's maximum times the largest chunk's bytes
    and one receive buffer."""
    if pp * m * v * 3 > SIMULATE_LIMIT:
        pending = pp - rank if schedule == "zb-h1" else 0
        buffer = max(max(recv["act"]), max(recv["grad"]))
        return in_flight_by_rank(schedule, pp, m, v)[rank] * max(act) + pending * max(wgt) + buffer
    plan = _plan(schedule, pp, m, v)[rank]

    def received(msg: Message) -> float:
        return recv[msg.stream][msg.stage // pp]

    now = most = 0.0
    for k, a in enumerate(_actions(schedule, pp, m, v)[rank]):
        now += sum(received(msg) for kind, msg in plan[k] if kind == "recv")
        most = max(most, now)
        needed, _ = action_messages(a, rank, pp, pp * v)
        if needed is not None:  # its buffer becomes the kept input, or is spent by the backward
            now -= received(needed)
        c = a.chunk
        sign = {"F": 1, "B": -1}.get(a.kind, 0)
        now += sign * act[c]
        if schedule == "zb-h1":
            now += {"B": wgt[c], "W": -wgt[c]}.get(a.kind, 0.0)
        most = max(most, now)
    return most


def in_flight(schedule: str, pp: int, m: int, v: int = 1) -> int:
    """Most (microbatch, chunk) activations any rank holds at once under ``schedule``."""
    return max(in_flight_by_rank(schedule, pp, m, v))


def _pipeline_time(
    schedule: str, pp: int, m: int, v: int, f: float, b: float, w: float, comm: float
) -> tuple[float, float]:
    """(makespan, bubble fraction) of one step with per-chunk costs ``f, b, w``."""
    if pp == 1:
        total = m * v * (f + b + w)
        return total, 0.0
    split = schedule == "zb-h1"
    if pp * m * v * 3 <= SIMULATE_LIMIT:
        costs = {"F": f, "B": b, "W": w} if split else {"F": f, "B": b + w, "W": 0.0}
        timeline = simulate(_actions(schedule, pp, m, v), v=v, costs=costs, comm=comm)
        span = max(e.end for row in timeline for e in row)
        return span, ideal_bubble_fraction(timeline)
    busy = m * v * (f + b + w)
    if split:
        idle = (pp - 1) * max(f + b - w, 0.0) + 2 * (pp - 1) * comm
    else:
        idle = (pp - 1) * (f + b + w) + 2 * (pp - 1) * comm
    span = busy + idle
    return span, idle / span


def _measured(
    layer, f: float, b: float, w: float, scale: float, gemm: float, stream: float
) -> tuple[float, float, float]:
    """A layer's (F, B, W) from its measured times (at the profile's batch, tp = 1) in this
    layout. Each measured pass is its fixed part (per-op overhead, paid whatever the rows) plus
    the rest, which scales with the microbatch (``scale``) and is sharded as the counts are: times
    the ratio of the pass's counted time in this layout to its counted time unsharded (``f, b,
    w``: the counted times here). The backward's fixed part is shared by ``B`` and ``W`` in
    proportion to their times."""
    f1 = (layer.matmul_flops / gemm + layer.other_bytes / stream) * scale
    b1 = layer.matmul_flops / gemm * scale + 2 * layer.other_bytes / stream * scale
    w1 = layer.matmul_flops / gemm * scale
    forward = layer.forward_seconds if layer.forward_seconds is not None else layer.seconds / 3
    backward = layer.seconds - forward
    if layer.weight_grad_seconds is not None:
        weight = layer.weight_grad_seconds
    else:  # the counted share of the backward
        weight = backward * w1 / (b1 + w1) if b1 + w1 > 0 else 0.0
    fixed_f = min(layer.fixed_forward_seconds or 0.0, forward)
    fixed_b = min(max((layer.fixed_seconds or 0.0) - fixed_f, 0.0), backward)
    fixed_share_b = fixed_b / backward if backward > 0 else 0.0

    def shrink(seconds: float, fixed_share: float, here: float, whole: float) -> float:
        sharded = here / whole if whole > 0 else 1.0
        return seconds * (fixed_share + (1 - fixed_share) * scale * sharded)

    return (
        shrink(forward, fixed_f / forward if forward > 0 else 0.0, f, f1),
        shrink(backward - weight, fixed_share_b, b, b1),
        shrink(weight, fixed_share_b, w, w1),
    )


def _collective(hardware: HardwareSpec, kind: str, nbytes: float, n: int, span: int) -> float:
    """Seconds for collective ``kind`` (``all_reduce``, ``all_gather``, ``reduce_scatter``) of a
    ``nbytes`` tensor (the full one) over ``n`` ranks within ``span`` consecutive ranks.

    A measured spec's fit for (kind, n) when it has one (``profile_hardware``); else a ring over
    the link: all-reduce moves ``2 (n-1)/n`` of the tensor in ``2 (n-1)`` steps, all-gather and
    reduce-scatter half that."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    fit = hardware.measured.get("collectives", {}).get(kind, {}).get(str(n))
    if fit is not None:
        return fit["alpha"] + nbytes / fit["beta"]
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return hardware.link(span).time(nbytes * steps / n, steps)


def _p2p(hardware: HardwareSpec, nbytes: float, span: int) -> float:
    fit = hardware.measured.get("collectives", {}).get("p2p", {}).get("2")
    if fit is not None:
        return fit["alpha"] + nbytes / fit["beta"]
    return hardware.link(span).time(nbytes)


def estimate(
    profile: ModelProfile,
    hardware: HardwareSpec,
    layout: Layout,
    *,
    dtype: str | None = None,
    bytes_per_param: float = 16.0,
    grad_reduce_bytes: int = 4,
) -> Estimate:
    """Predict one training step of ``layout`` (global batch ``dp x microbatches x
    micro_batch_size`` samples).

    Args:
        profile: the model's per-layer profile.
        hardware: the machine.
        layout: the parallel layout (assumed valid: see ``plan_parallelism`` for the checks).
        dtype: the matmul dtype; default the profile's.
        bytes_per_param: bytes held per parameter for weights, gradients and optimizer state
            (16: fp32 weights and gradients and two Adam moments; 18 for Megatron's bf16 weights
            with fp32 master weights and gradients).
        grad_reduce_bytes: bytes per gradient element in the data-parallel reduction.
    """
    dtype = dtype or profile.dtype
    itemsize = DTYPE_BYTES[dtype]
    scale_bytes = itemsize / DTYPE_BYTES[profile.dtype]
    tp, pp, dp, v, m = layout.tp, layout.pp, layout.dp, layout.chunks, layout.microbatches
    sp = layout.sequence_parallel and tp > 1
    scale = layout.micro_batch_size / profile.batch
    gemm = hardware.flops(dtype)
    stream = hardware.memory_bandwidth * hardware.memory_efficiency

    layers = profile.layers
    bounds = _stage_bounds(tuple(layer.params for layer in layers), pp * v)

    def held(nbytes: float) -> float:
        """Bytes of a boundary activation (a layer's input or output, profiled) in this layout."""
        return nbytes * scale * scale_bytes / (tp if sp else 1)

    def stage_costs(lo: int, hi: int) -> tuple[float, float, float, float, float, float]:
        """(F, B, W, tp comm per microbatch, saved bytes, params held) of one stage."""
        f = b = w = comm_f = comm_b = saved = 0.0
        params = 0.0
        for layer in layers[lo:hi]:
            sharded = layer.sharded_other_bytes
            rest = layer.other_bytes - sharded
            t_mm = layer.matmul_flops * scale / tp / gemm
            t_mem = (sharded / tp + (rest / tp if sp else rest)) * scale * scale_bytes / stream
            lf, lb, lw = t_mm + t_mem, t_mm + 2 * t_mem, t_mm
            if layer.seconds is not None:
                lf, lb, lw = _measured(layer, lf, lb, lw, scale, gemm, stream)
            f, b, w = f + lf, b + lb, w + lw
            ssaved = layer.sharded_saved_bytes
            rsaved = layer.saved_bytes - ssaved
            saved += (ssaved / tp + (rsaved / tp if sp else rsaved)) * scale * scale_bytes
            params += layer.sharded_params / tp + (layer.params - layer.sharded_params)
            if tp > 1 and layer.tp_collectives:
                n_in = layer.tp_in_bytes * scale * scale_bytes
                n_out = layer.tp_out_bytes * scale * scale_bytes
                per = layer.tp_collectives
                # ``per`` collectives a direction: all-gather inputs and reduce-scatter outputs
                # under SP, else all-reduce outputs (forward) and input gradients (backward);
                # costed as ``per`` equal messages. Under SP the backward also gathers each
                # column-parallel input again for its weight gradient (Megatron's sequence-
                # parallel backward keeps only the input's shard).
                if sp:
                    gather = _collective(hardware, "all_gather", 2 * n_in / per, tp, tp)
                    scatter = _collective(hardware, "reduce_scatter", 2 * n_out / per, tp, tp)
                    comm_f += per / 2 * (gather + scatter)
                    comm_b += per / 2 * (2 * gather + scatter)
                else:
                    comm_f += per / 2 * _collective(hardware, "all_reduce", 2 * n_out / per, tp, tp)
                    comm_b += per / 2 * _collective(hardware, "all_reduce", 2 * n_in / per, tp, tp)
        # a stage holds its input for backward when its first layer saves it or, at pp > 1,
        # always (the schedule keeps it); a layer's saved input within the stage adds nothing
        # when the layer before saved its own output (the same elements)
        saved += held(layers[lo].in_bytes if pp > 1 else layers[lo].input_saved_bytes)
        for prev, layer in zip(layers[lo : hi - 1], layers[lo + 1 : hi]):
            saved += 0.0 if prev.saves_output else held(layer.input_saved_bytes)
        f += comm_f
        b += comm_b
        if layout.recompute:
            b += f
        return f, b, w, comm_f + comm_b, saved, params

    per_stage = [stage_costs(lo, hi) for lo, hi in bounds]
    # The slowest stage sets the pace; with chunks, a rank runs v stages (chunk c = stage c*pp + r).
    rank_work = []
    for r in range(pp):
        mine = [per_stage[c * pp + r] for c in range(v)]
        rank_work.append(mine)
    worst = max(range(pp), key=lambda r: sum(s[0] + s[1] + s[2] for s in rank_work[r]))
    mine = rank_work[worst]
    f = max(s[0] for s in mine)
    b = max(s[1] for s in mine)
    w = max(s[2] for s in mine)
    if layout.schedule != "zb-h1":
        b, w = b + w, 0.0
    boundary = layers[bounds[0][1] - 1].out_bytes if pp > 1 else 0.0
    p2p_bytes = boundary * scale * scale_bytes / (tp if sp else 1)
    p2p = _p2p(hardware, p2p_bytes, dp * tp + 1) if pp > 1 else 0.0
    span, bubble = _pipeline_time(layout.schedule, pp, m, v, f, b, w, p2p)
    tp_comm = m * sum(s[3] for s in mine)

    params_by_rank = [sum(s[5] for s in rank) for rank in rank_work]
    for indices, numel, sharded in profile.shared_params:  # held once by a rank using it twice
        for r in range(pp):
            held_stages = [bounds[c * pp + r] for c in range(v)]
            uses = sum(any(lo <= i < hi for lo, hi in held_stages) for i in indices)
            params_by_rank[r] -= max(uses - 1, 0) * (numel / tp if sharded else numel)
    params_held = max(params_by_rank)
    shards = dp if layout.fsdp else 1
    if layout.fsdp:
        dp_comm = 3 * _collective(
            hardware, "reduce_scatter", params_held * grad_reduce_bytes, dp, dp * tp
        )
    else:
        dp_comm = _collective(hardware, "all_reduce", params_held * grad_reduce_bytes, dp, dp * tp)
    per_param = hardware.measured.get("optimizer_s_per_param", 28 / stream)
    optimizer = params_held / shards * per_param

    # Per rank: its state, plus its (microbatch, chunk) pairs in flight, each holding at most its
    # largest stage's activations (with recomputation: its stages' layer inputs, and one stage's
    # activations being recomputed).
    # At pp > 1 also: the output being sent (kept until its send completes), the buffers of the
    # receives posted ahead, and under ZB-H1 the deferred weight-gradient passes.
    peak = 0.0
    for r in range(pp):
        stages = [c * pp + r for c in range(v)]
        act = [per_stage[s][4] for s in stages]
        if pp == 1:
            peak = max(peak, params_by_rank[r] * bytes_per_param / shards + act[0])
            continue
        base = 0.0
        if layout.recompute:  # each chunk keeps its layers' inputs; one recomputes at a time
            base = max(act)
            act = [held(sum(layers[i].out_bytes for i in range(*bounds[s]))) for s in stages]
        wgt = [
            sum(held(layers[i].in_bytes + layers[i].out_bytes) for i in range(*bounds[s])
                if layers[i].params)
            for s in stages
        ]  # fmt: skip
        sending = max(
            (held(layers[bounds[s][1] - 1].out_bytes) for s in stages if s < pp * v - 1),
            default=0.0,
        )
        recv = {  # what a receive into chunk c posts a buffer of (nothing at the pipe's ends)
            "act": [held(layers[bounds[s][0]].in_bytes) if s > 0 else 0.0 for s in stages],
            "grad": [
                held(layers[bounds[s][1] - 1].out_bytes) if s < pp * v - 1 else 0.0 for s in stages
            ],
        }
        activations = base + _held_peak(layout.schedule, pp, m, v, r, act, wgt, recv) + sending
        peak = max(peak, params_by_rank[r] * bytes_per_param / shards + activations)

    step = span + dp_comm + optimizer
    samples = dp * m * layout.micro_batch_size
    return Estimate(
        layout=layout,
        step_time=step,
        compute_time=m * sum(s[0] + s[1] + s[2] for s in mine),
        bubble_fraction=bubble,
        tp_comm_time=tp_comm,
        pp_comm_time=2 * p2p,
        dp_comm_time=dp_comm,
        optimizer_time=optimizer,
        peak_memory=peak,
        samples_per_s=samples / step,
        tokens_per_s=samples * profile.tokens_per_sample / step,
        model_flops_per_gpu=profile.flops_per_sample() * samples / step / layout.world_size,
        stage_bounds=list(bounds),
    )
