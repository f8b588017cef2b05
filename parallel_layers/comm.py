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

**Dtype: communication moves the compute dtype.** Under ``torch.autocast`` every function here
first casts its (fp32) input to the autocast dtype, as the matmul on the other side of the
collective would anyway (:func:`~triton_parallel_layers.kernels._dispatch.autocast_inputs`), so
the forward collective and its backward dual both move bf16, never a wider copy; the cast is an
ordinary autograd op, so the gradient handed back is cast to the input's dtype again. Outputs are
in the compute dtype, like a matmul's under autocast: downstream of the first collective the
residual stream of a Transformer is bf16 (as in Megatron-LM's bf16 training). Parameters passed
to :func:`copy_to_tp` (the replicated norm weights and biases of a sequence-parallel region) are
not cast: their gradient all-reduce is a gradient reduction and keeps the parameter's dtype.

**In place.** :func:`reduce_from_tp` sums its input in place (the partial result of a row-parallel
matmul, which only this call consumes; Megatron-LM does the same) and returns it; autograd's
version counter turns any other use of the overwritten partial sum in backward into an error, not
a wrong gradient. It copies only where autograd forbids writing into the input (a leaf that
requires grad, a view) or the input is not one dense block. The backward all-reduce of
:func:`copy_to_tp` does copy: autograd may hand the same gradient tensor to several inputs (both
operands of an ``add``), so overwriting it would corrupt the other branch's gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from triton_parallel_layers.kernels._dispatch import autocast_inputs
from triton_parallel_layers.kernels.collectives import (
    all_gather,
    all_reduce,
    all_reduce_,
    group_rank,
    group_size,
    is_dense,
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
    """Forward: all-reduce (sum) over the group, in place where autograd allows (module
    docstring). Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        if (x.is_leaf and x.requires_grad) or x._base is not None or not is_dense(x):
            return all_reduce(x, group)
        ctx.mark_dirty(x)
        return all_reduce_(x, group)

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


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on for its device (module docstring): an
    autograd cast, whose backward casts the gradient back to ``x``'s dtype."""
    return autocast_inputs(x)[0]


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient all-reduced backward.

    Under autocast an activation enters in the compute dtype (so its gradient is all-reduced in
    it); a parameter keeps its dtype (its gradient reduction does too)."""
    if group_size(group) == 1:
        return x
    return _CopyToTP.apply(x if isinstance(x, nn.Parameter) else _compute_dtype(x), group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward, in place
    (``x`` is overwritten with the sum unless autograd forbids it; see the module docstring)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(_compute_dtype(x), group)


def scatter_to_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """``(.., p*n, ..) -> (.., n, ..)``: keep this rank's chunk; gradient all-gathered."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(_compute_dtype(x), group, dim)


def gather_from_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """``(.., n, ..) -> (.., p*n, ..)``: all-gather; gradient split back to this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(_compute_dtype(x), group, dim)


def gather_from_sequence_parallel(x: torch.Tensor, group: Group, dim: int = -2) -> torch.Tensor:
    """``(B, S/p, E) -> (B, S, E)``: all-gather the sequence; gradient reduce-scattered."""
    if group_size(group) == 1:
        return x
    return _GatherFromSequenceParallel.apply(_compute_dtype(x), group, dim)


def reduce_scatter_to_sequence_parallel(
    x: torch.Tensor, group: Group, dim: int = -2
) -> torch.Tensor:
    """``(B, S, E) -> (B, S/p, E)``: sum partial results, keep this rank's sequence chunk."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallel.apply(_compute_dtype(x), group, dim)
