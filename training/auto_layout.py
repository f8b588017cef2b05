"""``--layout auto``: let the planner pick (dp, pp, tp, schedule, chunks, microbatches, sequence
parallelism) for this world size.

On every rank, after the process group exists: profile the task's model on one sample microbatch
(on ``meta`` where the model allows it, else on the CPU), measure the machine
(:func:`~triton_parallel_layers.parallel_layers.planner.profile_hardware`, a collective; on a GPU
whose name is a built-in spec, that spec instead), rank every layout with
:func:`~triton_parallel_layers.parallel_layers.planner.plan_parallelism`, and take the fastest one
the task accepts. Every rank computes the same plan from the same inputs (the measurements are
rank 0's, broadcast). Rank 0 prints the top layouts and the choice.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_parallel_layers.parallel_layers.planner import (
    HARDWARE,
    HardwareSpec,
    plan_parallelism,
    profile_model,
)
from triton_parallel_layers.parallel_layers.planner.measure import profile_hardware
from triton_parallel_layers.training.config import ParallelConfig

__all__ = ["choose_layout", "machine_spec"]

TOP = 5  # layouts printed


def machine_spec() -> HardwareSpec:
    """The built-in spec of this GPU (A100, H100, H200) when it is one, else a measurement."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for key in ("h200", "h100", "a100"):
            if key in name:
                return HARDWARE[key]
    return profile_hardware()


def _profile(task, dtype: str):
    sample = task.sample_input(1)
    try:
        with torch.device("meta"):
            model = task.build_model()
        return profile_model(model, sample, plan=task.plan, dtype=dtype)
    except (RuntimeError, NotImplementedError):  # a model whose forward reads tensor values
        return profile_model(task.build_model(), sample, plan=task.plan, dtype=dtype)


def choose_layout(
    task, parallel: ParallelConfig, world_size: int, *, verbose: bool = True
) -> tuple[ParallelConfig, dict]:
    """The fastest layout of ``world_size`` ranks the task accepts, and what the planner said.

    Returns the new :class:`ParallelConfig` (``layout="auto"`` kept, ``--overlap`` kept when the
    choice uses sequence parallelism) and a summary for ``summary.json``.

    Raises:
        ValueError: no layout fits (the planner's message), or none the task accepts.
    """
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    profile = _profile(task, dtype)
    hardware = machine_spec()
    sequence_parallel = (False, True) if profile.tokens_per_sample > 1 else (False,)
    result = plan_parallelism(
        profile,
        hardware,
        world_size,
        task.batch_size,
        micro_batch_sizes=tuple(b for b in (1, 2, 4, 8, 16, 32) if task.batch_size % b == 0),
        sequence_parallel=sequence_parallel,
        dtype=dtype,
    )
    refused = []
    for estimate in result.ranked:
        lay = estimate.layout
        try:
            chosen = dataclasses.replace(
                parallel,
                dp=lay.dp,
                pp=lay.pp,
                tp=lay.tp,
                schedule=lay.schedule if lay.pp > 1 else "1f1b",
                chunks=lay.chunks,
                microbatches=lay.microbatches,
                sequence_parallel=lay.sequence_parallel,
                overlap=parallel.overlap and lay.sequence_parallel,
            )
            task.validate(chosen, world_size)
        except ValueError as e:
            refused.append(f"{lay}: {e}")
            continue
        break
    else:
        raise ValueError(
            f"--layout auto: the planner found {len(result.ranked)} layouts of {world_size} ranks "
            f"but the task accepts none (first: {refused[0] if refused else '-'})"
        )
    if verbose:
        print(
            f"--layout auto: {len(result.ranked)} feasible layouts of {world_size} ranks on "
            f"{hardware.name} ({result.rejection_summary() or 'none rejected'}); the best:\n"
            f"{result.table(TOP)}\nchosen: {chosen.describe()} (predicted {estimate.step_time:.3g} "
            f"s/step)",
            flush=True,
        )
    info = {
        "chosen": chosen.describe(),
        "predicted_step_s": estimate.step_time,
        "predicted_peak_memory_gb": estimate.peak_memory / 1e9,
        "hardware": hardware.name,
        "feasible": len(result.ranked),
        "rejected": len(result.rejected),
        "top": [e.row() for e in result.ranked[:TOP]],
    }
    return chosen, info
