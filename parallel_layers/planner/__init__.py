"""The automatic hybrid-parallel planner: profile a model and a machine, cost every layout, pick
the fastest that fits.

=============  ==========================================================================
module         holds
=============  ==========================================================================
``profile``    :func:`profile_model` -> :class:`ModelProfile` (per pipeline layer: FLOPs,
               bytes moved, parameters, saved activations, stage outputs, TP traffic)
``hardware``   :class:`HardwareSpec`; built-in A100/H100/H200 nodes (:data:`HARDWARE`);
               :func:`profile_hardware` measures this machine
``cost``       :class:`Layout`, :func:`estimate` -> :class:`Estimate` (step time, bubble,
               communication, peak memory)
``plan``       :func:`plan_parallelism` -> :class:`PlanResult` (ranked, rejected with reasons)
``megatron``   analytic profiles of Narayanan et al. 2021's GPT configurations, and their
               published results
=============  ==========================================================================

::

    with torch.device("meta"):
        model = GPT(GPTConfig(...))
    profile = profile_model(model, torch.zeros(1, seq, dtype=torch.long), plan=GPT_TP_PLAN)
    result = plan_parallelism(profile, "h100", world_size=64, global_batch=512)
    print(result.table())
    best = result.best.layout          # dp, pp, tp, sequence_parallel, schedule, chunks, ...
"""

from triton_parallel_layers.parallel_layers.planner.cost import (
    SCHEDULES,
    Estimate,
    Layout,
    estimate,
)
from triton_parallel_layers.parallel_layers.planner.hardware import (
    HARDWARE,
    HardwareSpec,
    Link,
    get_hardware,
)
from triton_parallel_layers.parallel_layers.planner.plan import PlanResult, plan_parallelism
from triton_parallel_layers.parallel_layers.planner.profile import (
    LayerProfile,
    ModelProfile,
    profile_model,
)

__all__ = [
    "HARDWARE",
    "SCHEDULES",
    "Estimate",
    "HardwareSpec",
    "LayerProfile",
    "Layout",
    "Link",
    "ModelProfile",
    "PlanResult",
    "estimate",
    "get_hardware",
    "plan_parallelism",
    "profile_model",
]
