"""``plan_parallelism``: rank every feasible layout of a job by predicted step time.

The search space: ``tp`` among the divisors of the world size that divide every size the model's
plan shards (heads, widths, vocabulary), at most a node wide unless a node cannot hold the rest;
``pp`` among the divisors of what is left, at most one layer per stage; ``dp`` the rest, dividing
the global batch; every microbatch size in ``micro_batch_sizes`` that divides a replica's batch;
each schedule (GPipe, 1F1B, interleaved with 2 or more chunks, ZB-H1) where its constraints hold;
sequence parallelism on and off. Every candidate is costed (:func:`.cost.estimate`); those over
the memory limit are rejected with their peak. The space is enumerated exhaustively: it is small
(a 1,024-GPU GPT job is about a thousand candidates, planned in about a second) because only
divisors are tried and the long pipelines are costed in closed form.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from triton_parallel_layers.parallel_layers.planner.cost import (
    SCHEDULES,
    Estimate,
    Layout,
    estimate,
)
from triton_parallel_layers.parallel_layers.planner.hardware import HardwareSpec, get_hardware
from triton_parallel_layers.parallel_layers.planner.profile import ModelProfile

__all__ = ["PlanResult", "plan_parallelism"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class PlanResult:
    """The ranked feasible layouts (fastest first) and the rejected ones with their reasons."""

    ranked: list[Estimate]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """``(layout or layout family, reason)``."""

    @property
    def best(self) -> Estimate:
        return self.ranked[0]

    def table(self, top: int = 10) -> str:
        """The ``top`` layouts as an aligned text table."""
        head = (
            f"{'#':>3}  {'layout':<44} {'step s':>9} {'tok/s':>11} {'TFLOP/s/GPU':>11} "
            f"{'bubble':>7} {'TP comm s':>9} {'DP comm s':>9} {'peak GB':>8}"
        )
        lines = [head, "-" * len(head)]
        for i, e in enumerate(self.ranked[:top], 1):
            lines.append(
                f"{i:>3}  {str(e.layout):<44} {e.step_time:>9.4g} {e.tokens_per_s:>11.4g} "
                f"{e.model_flops_per_gpu / 1e12:>11.4g} {e.bubble_fraction:>7.1%} "
                f"{e.tp_comm_time:>9.3g} {e.dp_comm_time:>9.3g} {e.peak_memory / 1e9:>8.3g}"
            )
        return "\n".join(lines)

    def rejection_summary(self) -> str:
        """How many layouts were rejected for each kind of reason."""
        kinds = Counter(reason.split(":")[0] for _, reason in self.rejected)
        return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"plan_parallelism: {name}={value!r}: expected a positive int")
    return value


def _candidates(
    profile: ModelProfile,
    hardware: HardwareSpec,
    world_size: int,
    global_batch: int,
    schedules: Sequence[str],
    micro_batch_sizes: Sequence[int],
    max_chunks: int,
    sequence_parallel: Sequence[bool],
    fsdp: Sequence[bool],
    recompute: Sequence[bool],
    rejected: list[tuple[str, str]],
) -> Iterable[Layout]:
    n_layers = profile.num_layers
    for tp in _divisors(world_size):
        bad = {k: v for k, v in profile.tp_divides.items() if v % tp}
        if bad:
            name, size = next(iter(bad.items()))
            rejected.append((f"tp={tp}", f"does not divide: tp={tp} does not divide {name}={size}"))
            continue
        if tp > hardware.gpus_per_node and world_size >= hardware.gpus_per_node:
            rejected.append(
                (f"tp={tp}", f"pruned: tp={tp} spans nodes ({hardware.gpus_per_node} GPUs a node)")
            )
            continue
        seq = profile.tokens_per_sample
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            if pp > n_layers:
                rejected.append(
                    (f"pp={pp}", f"does not divide: pp={pp} > {n_layers} pipeline layers")
                )
                continue
            if global_batch % dp:
                rejected.append(
                    (f"dp={dp} pp={pp} tp={tp}",
                     f"does not divide: global batch {global_batch} by dp={dp}")
                )  # fmt: skip
                continue
            per_replica = global_batch // dp
            for mb in micro_batch_sizes:
                if per_replica % mb:
                    continue
                m = per_replica // mb
                for sp in sequence_parallel:
                    if sp and (tp == 1 or seq % tp):
                        continue
                    for sharded in fsdp:
                        if sharded and dp == 1:
                            continue
                        for rc in recompute:
                            base = dict(dp=dp, pp=pp, tp=tp, sequence_parallel=sp,
                                        microbatches=m, micro_batch_size=mb, fsdp=sharded,
                                        recompute=rc)  # fmt: skip
                            if pp == 1:
                                yield Layout(schedule="none", **base)
                                continue
                            for schedule in schedules:
                                if schedule != "interleaved":
                                    yield Layout(schedule=schedule, **base)
                                    continue
                                for v in range(2, max_chunks + 1):
                                    if m < pp or m % pp or pp * v > n_layers:
                                        break
                                    yield Layout(schedule=schedule, chunks=v, **base)


def plan_parallelism(
    model_profile: ModelProfile,
    hardware: HardwareSpec | str,
    world_size: int,
    global_batch: int,
    memory_limit: float | None = None,
    *,
    schedules: Sequence[str] = SCHEDULES,
    micro_batch_sizes: Sequence[int] = (1, 2, 4, 8),
    max_chunks: int = 2,
    sequence_parallel: Sequence[bool] = (False, True),
    fsdp: Sequence[bool] = (False,),
    recompute: Sequence[bool] = (False,),
    dtype: str | None = None,
    bytes_per_param: float = 16.0,
) -> PlanResult:
    """Every feasible layout of ``world_size`` ranks for ``global_batch`` samples per step,
    fastest first.

    Args:
        model_profile: from :func:`~triton_parallel_layers.parallel_layers.planner.profile_model`.
        hardware: a :class:`HardwareSpec`, a built-in name (``a100``, ``h100``, ``h200``) or a
            saved spec's path.
        world_size: ranks (GPUs).
        global_batch: samples per optimizer step, over all data-parallel replicas.
        memory_limit: bytes per rank; default the hardware's device memory.
        schedules, micro_batch_sizes, max_chunks, sequence_parallel, fsdp, recompute: the options
            searched.
        dtype: matmul dtype (default the profile's); ``bytes_per_param`` as in
            :func:`~.cost.estimate`.

    Raises:
        ValueError: bad arguments; or no layout is feasible, with what would fit (the smallest
            memory any layout needs, or the world sizes near ``world_size`` that have layouts).
    """
    hw = get_hardware(hardware)
    _check_int("world_size", world_size)
    _check_int("global_batch", global_batch)
    for name in schedules:
        if name not in SCHEDULES:
            raise ValueError(f"plan_parallelism: schedule {name!r}; expected some of {SCHEDULES}")
    limit = hw.memory_bytes if memory_limit is None else float(memory_limit)
    if limit <= 0:
        raise ValueError(f"plan_parallelism: memory_limit={memory_limit!r}: expected bytes > 0")
    rejected: list[tuple[str, str]] = []
    ranked: list[Estimate] = []
    over_memory: list[Estimate] = []
    for layout in _candidates(
        model_profile, hw, world_size, global_batch, schedules, micro_batch_sizes, max_chunks,
        sequence_parallel, fsdp, recompute, rejected,
    ):  # fmt: skip
        est = estimate(model_profile, hw, layout, dtype=dtype, bytes_per_param=bytes_per_param)
        if est.peak_memory > limit:
            over_memory.append(est)
            rejected.append(
                (str(layout),
                 f"does not fit: peak {est.peak_memory / 1e9:.3g} GB > {limit / 1e9:.3g} GB")
            )  # fmt: skip
            continue
        ranked.append(est)
    ranked.sort(key=lambda e: (e.step_time, e.peak_memory))
    result = PlanResult(ranked=ranked, rejected=rejected)
    if ranked:
        return result
    if over_memory:
        least = min(over_memory, key=lambda e: e.peak_memory)
        raise ValueError(
            f"plan_parallelism: no layout of {world_size} ranks fits in {limit / 1e9:.3g} GB per "
            f"rank: the smallest peak is {least.peak_memory / 1e9:.3g} GB ({least.layout}); "
            f"raise the memory limit to that, use more ranks, or try fsdp=(True,) or "
            f"recompute=(True,)"
        )
    below = next(
        (
            n
            for n in range(world_size - 1, 0, -1)
            if _has_layout(model_profile, hw, n, global_batch)
        ),
        None,
    )
    above = next(
        (n for n in range(world_size + 1, 2 * world_size + 1)
         if _has_layout(model_profile, hw, n, global_batch)),
        None,
    )  # fmt: skip
    nearest = ", ".join(
        f"{n} ({side})" for n, side in ((below, "fewer ranks"), (above, "more ranks")) if n
    )
    # One example of each kind of reason (the same text up to its numbers).
    kinds: dict[str, str] = {}
    for _, reason in rejected:
        kinds.setdefault(re.sub(r"\d+", "N", reason), reason)
    reasons = list(kinds.values())
    raise ValueError(
        f"plan_parallelism: no (dp, pp, tp) layout of world size {world_size} fits the model and "
        f"global batch {global_batch}: {'; '.join(reasons) or 'no candidates'}; the nearest "
        f"world sizes with layouts: {nearest or 'none'}"
    )


def _has_layout(profile: ModelProfile, hw: HardwareSpec, world_size: int, batch: int) -> bool:
    """Whether some layout of ``world_size`` ranks divides the model and batch (memory aside)."""
    for _ in _candidates(profile, hw, world_size, batch, ("1f1b",), (1,), 1, (False,), (False,),
                         (False,), []):  # fmt: skip
        return True
    return False
