"""Autograd collectives for tensor and sequence parallelism.

Each communication step is one ``torch.autograd.Function`` whose backward is its dual, and each
takes its process group explicitly. With ``group=None`` or a group of one rank every function
returns its input untouched, so one code path serves TP=1 and TP>1.

================================  ===============================  ===============================
function                          forward                          backward
================================  ===============================  ===============================
``copy_to_tp``                    identity                         all-reduce
``reduce_from_tp``                all-reduce                       identity
``scatter_to_tp``                 keep this rank's chunk of dim    all-gather along dim
``gather_from_tp``                all-gather along dim             keep this rank's chunk of dim
``gather_from_sequence_parallel`` all-gather along dim             reduce-scatter along dim
``reduce_scatter_to_sequence_...``reduce-scatter along dim         all-gather along dim
================================  ===============================  ===============================

Shapes, with ``p`` ranks: the all-gathers map ``n -> p*n`` along ``dim``, the scatters and
reduce-scatters ``p*n -> n``; all-reduce and copy keep the shape. Sequence parallelism shards the
sequence dimension, which for the batch-first ``(B, S, E)`` activations of this package is
``dim=-2`` (the dimension just before the features); that is the default here.

The sizes that must divide by ``p`` are checked by the layers before any rank communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import (
    all_gather,
    all_reduce,
    group_rank,
    group_size,
    reduce_scatter,
)

__all__ = [
    "copy_to_tp",
    "gather_from_sequence_parallel",
    "gather_from_tp",
    "reduce_from_tp",
    "reduce_scatter_to_sequence_parallel",
    "scatter_to_tp",
    "split_along",
]

Group = dist.ProcessGroup | None


def split_along(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk ``torch.chunk(x, p, dim)[rank]`` (no communication)."""
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[dim] % p:
        raise ValueError(f"size {x.shape[dim]} along dim {dim} is not divisible by {p} ranks")
    return x.chunk(p, dim)[group_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) the gradient over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's chunk along ``dim``. Backward: all-gather along ``dim``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: keep this rank's chunk along ``dim``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return split_along(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequenceParallel(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: reduce-scatter along ``dim``.

    The dual of :class:`_ReduceScatterToSequenceParallel`: used where sequence-sharded
    activations enter a tensor-parallel region whose ranks each produce a partial gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Forward: reduce-scatter (sum) along ``dim``. Backward: all-gather along ``dim``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient all-reduced backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """``(.., p*n, ..) -> (.., n, ..)``: keep this rank's chunk; gradient all-gathered."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group, dim)


def gather_from_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """``(.., n, ..) -> (.., p*n, ..)``: all-gather; gradient split back to this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group, dim)


def gather_from_sequence_parallel(x: torch.Tensor, group: Group, dim: int = -2) -> torch.Tensor:
    """``(B, S/p, E) -> (B, S, E)``: all-gather the sequence; gradient reduce-scattered."""
    return x if group_size(group) == 1 else _GatherFromSequenceParallel.apply(x, group, dim)


def reduce_scatter_to_sequence_parallel(
    x: torch.Tensor, group: Group, dim: int = -2
) -> torch.Tensor:
    """``(B, S, E) -> (B, S/p, E)``: sum partial results, keep this rank's sequence chunk."""
    return x if group_size(group) == 1 else _ReduceScatterToSequenceParallel.apply(x, group, dim)
