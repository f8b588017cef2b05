"""Pipeline parallelism: stage partitioning, point-to-point transport, schedules (GPipe, 1F1B,
interleaved 1F1B, ZB-H1), hybrid with tensor and data parallelism, and instrumentation.

=================  =====================================================================
module             holds
=================  =====================================================================
``partition``      :func:`partition_layers` -> :class:`Partition` (by params/FLOPs/time/list)
``stage``          :class:`PipelineStage`, :func:`build_stages` (DDP over ``dp`` per chunk),
                   :func:`stage_device` (every stage tensor's device, from the mesh)
``p2p``            :class:`StageTransport`: batched isend/irecv, shapes exchanged once
``actions``        schedules as per-rank :class:`Action` lists; :func:`simulate`
``schedules``      :class:`ScheduleGPipe`, :class:`Schedule1F1B`,
                   :class:`ScheduleInterleaved1F1B`, :class:`ScheduleZBH1`: one executor;
                   :class:`ScheduleForwardOnly` for evaluation and sampling
``weight_grad``    deferred weight gradients for zero-bubble schedules
``synthetic``      :class:`TimedLayer`: known F/B/W costs, for measuring schedules
``timeline``       per-rank :class:`Timeline`, :func:`bubble_fraction`, ASCII/PNG rendering,
                   :class:`ActivationMemoryTracker`
``wavefront``      :class:`WavefrontPipeline`: stacked recurrent layers pipelined over time
                   chunks (a single long sequence fills the pipeline)
``p2p_check``      test tool: :func:`~.p2p_check.record_p2p` logs every rank's p2p groups on
                   gloo, :func:`~.p2p_check.replay_nccl` replays them under NCCL's ordering
                   rule (deadlock or completion); not imported here
=================  =====================================================================

A whole hybrid (dp, pp, tp) step (every rank builds the model from the same seed, or on
``meta``, and keeps its stages' layers)::

    dims = ParallelDims(dp=2, pp=2, tp=2)
    torch.manual_seed(0)
    model = parallelize(GPT(config), GPT_TP_PLAN, dims)
    layers = model.pipeline_layers()                      # [embed, blocks..., head]
    partition = partition_layers(layers, dims.pp, "params")
    print(partition.report(pp=dims.pp))
    stages = build_stages(layers, partition, dims.pp_group, dp_group=dims.dp_group,
                          device=dims.device)
    schedule = Schedule1F1B(stages, n_microbatches=8, loss_fn=model.loss)
    optimizer = torch.optim.AdamW(pipeline_parameters(stages))
    loss = schedule.step(tokens, targets)                 # the batch of this dp replica
    optimizer.step(); optimizer.zero_grad()
"""

from triton_parallel_layers.parallel_layers.pipeline.actions import (
    Action,
    forward_actions,
    gpipe_actions,
    ideal_bubble_fraction,
    interleaved_actions,
    one_f_one_b_actions,
    simulate,
    validate_actions,
    zb_h1_actions,
)
from triton_parallel_layers.parallel_layers.pipeline.p2p import StageTransport
from triton_parallel_layers.parallel_layers.pipeline.partition import (
    Partition,
    layer_costs,
    partition_layers,
)
from triton_parallel_layers.parallel_layers.pipeline.schedules import (
    SCHEDULES,
    PipelineSchedule,
    Schedule1F1B,
    ScheduleForwardOnly,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBH1,
    get_schedule,
)
from triton_parallel_layers.parallel_layers.pipeline.stage import (
    PipelineStage,
    SharedParameters,
    build_stages,
    pipeline_parameters,
    stage_device,
)
from triton_parallel_layers.parallel_layers.pipeline.synthetic import TimedLayer
from triton_parallel_layers.parallel_layers.pipeline.timeline import (
    ActivationMemoryTracker,
    Event,
    Timeline,
    bubble_fraction,
    gather_timelines,
    render_ascii,
    render_png,
)
from triton_parallel_layers.parallel_layers.pipeline.wavefront import (
    WavefrontPipeline,
    wavefront_bubble_fraction,
)
from triton_parallel_layers.parallel_layers.weight_grad import (
    WeightGradStore,
    defer_weight_grad,
    deferrable_linear,
    split_weight_grad,
    splitting,
)

__all__ = [
    "SCHEDULES",
    "Action",
    "ActivationMemoryTracker",
    "Event",
    "Partition",
    "PipelineSchedule",
    "PipelineStage",
    "Schedule1F1B",
    "ScheduleForwardOnly",
    "ScheduleGPipe",
    "ScheduleInterleaved1F1B",
    "ScheduleZBH1",
    "SharedParameters",
    "StageTransport",
    "TimedLayer",
    "WavefrontPipeline",
    "Timeline",
    "WeightGradStore",
    "bubble_fraction",
    "build_stages",
    "defer_weight_grad",
    "deferrable_linear",
    "forward_actions",
    "gather_timelines",
    "get_schedule",
    "gpipe_actions",
    "ideal_bubble_fraction",
    "interleaved_actions",
    "layer_costs",
    "one_f_one_b_actions",
    "partition_layers",
    "pipeline_parameters",
    "render_ascii",
    "render_png",
    "simulate",
    "split_weight_grad",
    "splitting",
    "stage_device",
    "validate_actions",
    "wavefront_bubble_fraction",
    "zb_h1_actions",
]
