"""Pipeline stages: this rank's model chunks, optionally data-parallel through PyTorch's DDP.

A :class:`PipelineStage` is one virtual stage: a slice of the model's layer sequence run as a
``nn.Sequential``, with its place in the pipeline (``stage_index`` of ``num_stages``) and the
``pp`` group. :func:`build_stages` cuts a layer list by a :class:`~.partition.Partition` and
returns the stages this rank holds: one per chunk, virtual stage ``chunk * pp + pp_rank``.

Data parallelism over the ``dp`` axis is PyTorch's ``DistributedDataParallel``, one instance per
chunk over the ``dp`` group; this module writes no gradient all-reduce. Gradients are synchronized
once per step, not once per microbatch:

1. every forward and backward of the step runs under DDP's ``no_sync()``, so each microbatch's
   gradients only accumulate locally (DDP's documented gradient-accumulation mode);
2. after the last backward (and the deferred weight-gradient passes of zero-bubble schedules),
   :meth:`PipelineStage.sync_gradients` runs one synchronized DDP forward/backward of a probe
   that touches every parameter with a zero gradient; DDP's reducer then all-reduces (averages)
   the accumulated gradients in its buckets, as it does in any synchronized backward.

The probe adds zeros, so it changes no gradient; its cost is one pass over the parameters.
(Synchronizing inside the last microbatch's real backward instead would need DDP's reducer to
expect a backward other than the one after its latest forward, which 1F1B's order breaks.)

Shared parameters: a parameter used by layers in stages on different ranks (a GPT's token
embedding tied to its output head) exists once per rank that holds one of those stages. Each copy
gets only its own stage's gradient, so after every step :class:`SharedParameters` sums them over
the pipeline group (as Megatron-LM sums the tied embedding's gradient over its "embedding group"),
and the copies, equal at the start, stay equal. Use :func:`pipeline_parameters` for the optimizer
(each parameter once, also where one rank holds both stages).

Device: each stage has one :attr:`PipelineStage.device`, where the schedule allocates, sends and
receives every tensor of the stage (activations, gradients, metadata headers, the loss). It comes
from the mesh, not from the parameters (a stage may have none): pass ``device=dims.device``, or
leave it to :func:`stage_device`, which reads the pipeline group's backend (NCCL: this process's
current GPU, as :class:`~triton_parallel_layers.parallel_layers.ParallelDims` sets it; gloo, or no
process group: the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from triton_parallel_layers.kernels.collectives import all_reduce_, group_rank, group_size
from triton_parallel_layers.parallel_layers.data_parallel import (
    dp_shard_shape,
    gradient_sync,
    local_tensor,
    shard_data_parallel,
)
from triton_parallel_layers.parallel_layers.pipeline.partition import Partition

__all__ = [
    "PipelineStage",
    "SharedParameters",
    "build_stages",
    "pipeline_parameters",
    "stage_device",
]


def stage_device(
    device: torch.device | str | None = None, pp_group: dist.ProcessGroup | None = None
) -> torch.device:
    """The device of a stage: ``device`` when given; else from the process group's backend (NCCL:
    ``cuda:<current device>``; gloo: CPU; no process group: CPU)."""
    if device is not None:
        return torch.device(device)
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend(pp_group))
        if "nccl" in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StageModule(nn.Module):
    """A stage's layers in sequence; ``forward(grad_sync_probe=True)`` returns the zero-valued
    scalar that touches every trainable parameter (for DDP's once-per-step synchronization)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor | None = None, *, grad_sync_probe: bool = False):
        if grad_sync_probe:
            params = [p for p in self.parameters() if p.requires_grad]
            # a 0-dim tensor depending on one element of each parameter, times zero: its
            # backward adds exactly 0 to every parameter's gradient
            return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0
        return self.layers(x)


class SharedParameters:
    """Parameters that appear in stages on more than one pipeline rank, and the gradient sum that
    keeps their copies equal (see the module docstring).

    Every rank lists the same parameters in the same order (computed from the whole layer list),
    with ``held`` telling which ones this rank holds; :meth:`sync_grads` is a collective over the
    pipeline group (ranks that do not hold a parameter contribute zeros).
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, nn.Parameter, bool]],
        pp_group: dist.ProcessGroup | None,
        device: torch.device | str | None = None,
        *,
        dp_shards: tuple[int, int] | None = None,
    ) -> None:
        self.entries = list(entries)
        self.pp_group = pp_group
        self.device = stage_device(device, pp_group)
        self.dp_shards = dp_shards
        """``(dp, dp_rank)`` when the stages are FSDP-sharded: each rank holds (and sums) its
        ``torch.chunk(grad, dp, 0)[dp_rank]``."""

    def _local_shape(self, param: nn.Parameter) -> torch.Size:
        if isinstance(param, DTensor):
            return param.to_local().shape
        if self.dp_shards is None:
            return param.shape
        return dp_shard_shape(param.shape, *self.dp_shards)

    def __len__(self) -> int:
        return len(self.entries)

    def sync_grads(self) -> None:
        """Sum each shared parameter's gradient over the pipeline ranks."""
        if group_size(self.pp_group) == 1:
            return
        for _, param, held in self.entries:
            grad = param.grad if held else None
            local = local_tensor(grad) if grad is not None else None  # FSDP: this dp shard
            if local is None:
                local = torch.zeros(self._local_shape(param), dtype=param.dtype, device=self.device)
                if held:
                    param.grad = local if not isinstance(param, DTensor) else DTensor.from_local(
                        local, param.device_mesh, param.placements, shape=param.shape,
                        stride=param.stride(),
                    )  # fmt: skip
            # (shape of local), summed over pp in place: a gradient that is a view into DDP's
            # buckets (gradient_as_bucket_view=True) or a DTensor's shard stays one
            all_reduce_(local, self.pp_group)

    def __repr__(self) -> str:
        names = [f"{n}{'' if held else ' (not here)'}" for n, _, held in self.entries]
        return f"SharedParameters({names})"


def pipeline_parameters(stages: Sequence[PipelineStage]) -> list[nn.Parameter]:
    """The parameters of this rank's stages, each once (for the optimizer)."""
    seen: dict[int, nn.Parameter] = {}
    for stage in stages:
        for p in stage.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


class PipelineStage:
    """One virtual stage of a pipeline, as held by this rank.

    Args:
        layers: the stage's layers, run in order (or one module).
        stage_index: virtual stage ``s`` in ``[0, num_stages)``; this rank must be ``s % pp``.
        num_stages: ``S = pp * v``.
        pp_group: the pipeline group (``ParallelDims.pp_group``); ``None`` for one rank.
        dp_group: the data-parallel group; with more than one rank the stage is wrapped in DDP.
        layer_range: ``(start, stop)`` of the layers in the whole model, for reports and tests.
        ddp_kwargs: extra keyword arguments for ``DistributedDataParallel``.
        device: where the stage's tensors live (``dims.device``); default :func:`stage_device`
            (from the pipeline group's backend, never from the parameters).

    Shapes: whatever the layers take and return; the first stage takes the model input
    (a microbatch of it), the last returns the logits.
    """

    def __init__(
        self,
        layers: nn.Module | Sequence[nn.Module],
        stage_index: int,
        num_stages: int,
        pp_group: dist.ProcessGroup | None = None,
        *,
        dp_group: dist.ProcessGroup | None = None,
        layer_range: tuple[int, int] | None = None,
        ddp_kwargs: dict | None = None,
        dp_mesh: DeviceMesh | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        pp = group_size(pp_group)
        if not 0 <= stage_index < num_stages or num_stages % pp:
            raise ValueError(
                f"stage_index={stage_index}, num_stages={num_stages}: expected "
                f"0 <= stage_index < num_stages and num_stages a multiple of pp={pp}"
            )
        if stage_index % pp != group_rank(pp_group):
            raise ValueError(
                f"stage_index={stage_index} belongs to pipeline rank {stage_index % pp}, "
                f"not to this rank ({group_rank(pp_group)})"
            )
        layers = [layers] if isinstance(layers, nn.Module) else list(layers)
        self.stage_index, self.num_stages = stage_index, num_stages
        self.pp_group, self.pp, self.dp_group = pp_group, pp, dp_group
        self.layer_range = layer_range
        self.device = stage_device(device, pp_group)
        """Where this stage's activations, gradients and messages live (module docstring)."""
        self.shared = SharedParameters([], pp_group, self.device)
        """Parameters shared with stages on other ranks (set by :func:`build_stages`)."""
        self.inner = StageModule(layers)
        self.module: nn.Module = self.inner
        self.ddp: DistributedDataParallel | None = None
        self.fsdp = dp_mesh is not None
        if dp_mesh is not None and dp_group is not None and dp_group != dp_mesh.get_group():
            raise ValueError("dp_group and dp_mesh name different groups: pass one of them")
        if self.fsdp:
            # one FSDP unit per stage, its parameters kept gathered from forward to backward
            # (torchtitan's choice for pipeline stages: no all-gather per microbatch)
            self.dp_group = dp_mesh.get_group()
            shard_data_parallel(self.inner, dp_mesh, reshard_after_forward=False)
        elif group_size(dp_group) > 1 and any(p.requires_grad for p in self.inner.parameters()):
            kwargs = dict(ddp_kwargs or {})
            if self.device.type == "cuda":
                kwargs.setdefault("device_ids", [self.device.index])
            self.ddp = DistributedDataParallel(self.inner, process_group=dp_group, **kwargs)
            self.module = self.ddp

    # -- place in the pipeline ----------------------------------------------------------------
    @property
    def chunk(self) -> int:
        """Which of this rank's chunks this stage is: ``stage_index // pp``."""
        return self.stage_index // self.pp

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def layers(self) -> nn.Sequential:
        """The stage's layers (unwrapped), for inspecting and comparing parameters."""
        return self.inner.layers

    # -- running --------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.inner.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.inner.layers.named_parameters()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync()`` or FSDP2's ``set_requires_gradient_sync(False)`` (gradients
        accumulate locally), or nothing without data parallelism."""
        if self.ddp is not None:
            return self.ddp.no_sync()
        return gradient_sync(self.inner, False)

    def sync_gradients(self) -> None:
        """Average the gradients accumulated this step over the ``dp`` group, by DDP (an
        all-reduce) or FSDP2 (a reduce-scatter into the shards); see the module docstring. A
        no-op without data parallelism."""
        if self.ddp is not None or self.fsdp:
            self.module(grad_sync_probe=True).backward()

    def __repr__(self) -> str:
        where = f", layers {self.layer_range}" if self.layer_range else ""
        kind = "DDP" if self.ddp is not None else "FSDP" if self.fsdp else None
        dp = f", {kind} over {group_size(self.dp_group)}" if kind else ""
        return f"PipelineStage({self.stage_index}/{self.num_stages}{where}{dp})"


def build_stages(
    layers: Sequence[nn.Module],
    partition: Partition,
    pp_group: dist.ProcessGroup | None = None,
    *,
    dp_group: dist.ProcessGroup | None = None,
    ddp_kwargs: dict | None = None,
    dp_mesh: DeviceMesh | None = None,
    device: torch.device | str | None = None,
) -> list[PipelineStage]:
    """This rank's stages of ``layers`` cut by ``partition``: chunk ``c`` is virtual stage
    ``c * pp + pp_rank``. With ``ParallelDims`` ``dims``::

        stages = build_stages(model.pipeline_layers(), partition, dims.pp_group,
                              dp_group=dims.dp_group, device=dims.device)

    ``device``: the stages' device (default :func:`stage_device`: from the pipeline group).
    ``dp_mesh`` instead of ``dp_group``: shard each stage with FSDP2 over it (not with ZB-H1).

    Raises:
        ValueError: the partition does not fit the layers or the pipeline size (every rank alike).
    """
    layers = list(layers)
    pp, pp_rank = group_size(pp_group), group_rank(pp_group)
    if partition.num_layers != len(layers):
        raise ValueError(
            f"the partition covers {partition.num_layers} layers, but {len(layers)} were given"
        )
    if partition.num_stages % pp:
        raise ValueError(
            f"the partition has {partition.num_stages} stages, expected a multiple of pp={pp} "
            "(pp * chunks per rank)"
        )
    device = stage_device(device, pp_group)
    entries = _shared_entries(layers, partition, pp, pp_rank)
    # where this rank uses each parameter, to find it again once FSDP2 has replaced it
    mine = {
        id(q): (j, name)
        for s in range(pp_rank, partition.num_stages, pp)
        for j in range(*partition.bounds[s])
        for name, q in layers[j].named_parameters()
    }
    stages = []
    for s in range(pp_rank, partition.num_stages, pp):
        a, b = partition.bounds[s]
        stages.append(
            PipelineStage(
                layers[a:b],
                s,
                partition.num_stages,
                pp_group,
                dp_group=dp_group,
                layer_range=(a, b),
                ddp_kwargs=ddp_kwargs,
                dp_mesh=dp_mesh,
                device=device,
            )
        )
    if dp_mesh is not None:  # FSDP2 has replaced this rank's parameters with sharded ones
        entries = [
            (name, layers[mine[id(q)][0]].get_parameter(mine[id(q)][1]) if held else q, held)
            for name, q, held in entries
        ]
    dp_shards = (dp_mesh.size(), dp_mesh.get_local_rank()) if dp_mesh is not None else None
    shared = SharedParameters(entries, pp_group, device, dp_shards=dp_shards)
    for stage in stages:
        stage.shared = shared
    return stages


def _shared_entries(
    layers: Sequence[nn.Module], partition: Partition, pp: int, pp_rank: int
) -> list[tuple[str, nn.Parameter, bool]]:
    """``(name, parameter, held here)`` for each parameter used by stages on several ranks, in
    order of first use (the same list on every rank)."""
    ranks: dict[int, set[int]] = {}
    first: dict[int, tuple[str, nn.Parameter]] = {}
    for s, (a, b) in enumerate(partition.bounds):
        for j in range(a, b):
            for name, p in layers[j].named_parameters():
                ranks.setdefault(id(p), set()).add(s % pp)
                first.setdefault(id(p), (f"{j}.{name}", p))
    return [
        (name, p, pp_rank in ranks[id(p)])
        for pid, (name, p) in first.items()
        if len(ranks[pid]) > 1
    ]
