"""Sharded data parallelism: PyTorch's FSDP2 (``fully_shard``) over the ``dp`` axis, beside TP.

DDP keeps a whole copy of the parameters, gradients and optimizer state on every ``dp`` rank.
FSDP2 keeps ``1/dp`` of each: every parameter becomes a ``DTensor`` sharded along its dim 0 over
the ``dp`` mesh (``torch.chunk`` semantics, the last shard padded), all-gathered before a
module's forward and backward and freed after, its gradient reduce-scattered (averaged, as DDP
does) into the shard; the optimizer then only ever sees shards.

**With tensor parallelism.** The TP modules hold plain local tensors (this rank's TP shard), not
DTensors, so FSDP2 sees one ordinary model per TP rank and shards *that* over the ``dp`` group of
the same TP rank: the parameter a rank holds is ``chunk(chunk(full, tp, tp_dim)[tp_rank], dp,
0)[dp_rank]``. Nothing in the TP layers changes; TP collectives still run over the ``tp`` group.
(:mod:`~triton_parallel_layers.parallel_layers.checkpoint` saves these two-level shards by their
global offsets, so checkpoints stay layout-free.)

**Units.** Each layer of ``model.pipeline_layers()`` (a GPT block, the embedding, the head) is
its own FSDP unit, so one layer's parameters are whole at a time; the root unit holds the rest.
A parameter used by two layers (tied embeddings) must belong to one unit, so layers that share a
parameter are left to the enclosing unit.

**Gradient accumulation.** Under :func:`gradient_sync` ``(module, False)`` FSDP2 accumulates
unsharded gradients locally (like DDP's ``no_sync``); the first backward with sync on
reduce-scatters the sum.

**Communication ledger.** Every unit's all-gathers and reduce-scatters are counted by the active
:func:`~triton_parallel_layers.kernels.collectives.record_comm` ledgers (the step report's bytes
per collective kind), as FSDP2 issues them: each unit runs FSDP2's own default collectives
through a subclass that records the message first (``FSDPModule.set_custom_all_gather`` /
``set_custom_reduce_scatter``); the payload of an all-gather is this rank's padded flat shard of
the unit, that of a reduce-scatter the unit's padded flat gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    DefaultAllGather,
    DefaultReduceScatter,
)
from torch.distributed.tensor import DTensor

from triton_parallel_layers.kernels.collectives import group_size, record

__all__ = ["dp_shard_shape", "gradient_sync", "is_fsdp", "local_tensor", "shard_data_parallel"]


def _private_units(units: Sequence[nn.Module]) -> list[nn.Module]:
    """The units whose parameters no other unit uses (a tied parameter stays with the root)."""
    owners: dict[int, int] = {}
    for u in units:
        for p in u.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [u for u in units if all(owners[id(p)] == 1 for p in u.parameters())]


def shard_data_parallel(
    module: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    units: Sequence[nn.Module] = (),
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each of ``units`` (sub-modules of ``module``) and then ``module`` itself over
    the 1-D ``dp_mesh``, in place; returns ``module`` (now also an ``FSDPModule``).

    Args:
        module: materialized (not ``meta``), already tensor-parallel where it is.
        dp_mesh: the data-parallel mesh (``ParallelDims.dp_mesh``).
        units: sub-modules to shard as units of their own (e.g. the transformer blocks).
        reshard_after_forward: free the gathered parameters after each forward (re-gathered in
            backward); ``False`` keeps them until the backward, trading memory for one all-gather
            per microbatch less (what torchtitan does for pipeline stages).
    """
    for unit in [
        *_private_units([u for u in units if any(True for _ in u.parameters())]),
        module,
    ]:
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
        unit.set_custom_all_gather(_RecordedAllGather())
        unit.set_custom_reduce_scatter(_RecordedReduceScatter())
    return module


class _RecordedAllGather(DefaultAllGather):
    """FSDP2's default all-gather, counted in the comm ledger (payload: this rank's shard)."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        record("all_gather", input_tensor, group_size(group))
        return super().__call__(output_tensor, input_tensor, group, async_op)


class _RecordedReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter, counted in the comm ledger (payload: the unit's padded
    flat gradients)."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        record("reduce_scatter", input_tensor, group_size(group))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def dp_shard_shape(shape: Sequence[int], dp: int, dp_rank: int) -> torch.Size:
    """The shape of FSDP2's shard on ``dp_rank``: ``torch.chunk(t, dp, 0)[dp_rank]`` of a tensor of
    ``shape`` (empty along dim 0 where the chunks run out)."""
    pieces = torch.empty(shape, device="meta").chunk(dp, 0)
    rows = pieces[dp_rank].shape[0] if dp_rank < len(pieces) else 0
    return torch.Size([rows, *shape[1:]])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a ``DTensor``'s local shard (a view: writing it writes ``t``),
    else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """For an FSDP2 module, whether the backwards inside reduce-scatter their gradients
    (``enabled``) or accumulate them unsharded on this rank; restored on exit. Nothing for any
    other module."""
    if not is_fsdp(module) or enabled:
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
