"""Column- and row-parallel linear layers (Megatron-LM's tensor parallelism, batch-first).

A transformer MLP ``Y = act(X A^T) B^T`` becomes, over a TP group of ``p`` ranks::

    X (B, S, E) --copy--> ColumnParallelLinear A: (4E/p, E) -> act -> RowParallelLinear B: (E, 4E/p)
                                       (B, S, 4E/p)                    (B, S, E) partial --all-reduce-->

one all-reduce forward and one backward per block. With ``sequence_parallel=True`` the activations
outside the block stay sharded along the sequence, ``(B, S/p, E)``: the column layer all-gathers
the sequence on the way in (reduce-scatter of the gradient on the way back) and the row layer
reduce-scatters on the way out (all-gather backward). Same bytes on the wire, and the norms and
dropouts between blocks do ``1/p`` of the work. ``overlap_comm=True`` then hides that gather and
reduce-scatter behind the matmul (:func:`kernels.all_gather_matmul`,
:func:`kernels.matmul_reduce_scatter`).

Initialization: :meth:`reset_parameters` draws the *full* weight exactly as ``nn.Linear`` does,
from the default CPU generator, and keeps this rank's chunk. So a layer built after
``torch.manual_seed(s)`` holds, at any TP size, the chunk of the ``nn.Linear`` built after the same
seed on the CPU (and both consume the generator alike, so the layers after it match too).

Zero-bubble pipeline schedules: the (non-overlapped) matmuls go through
:func:`~parallel_layers.pipeline.weight_grad.deferrable_linear`, which is ``F.linear`` except under
``split_weight_grad()``, where the weight gradient can be deferred to a later ``W`` pass.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from kernels.collectives import group_rank, group_size
from parallel_layers.comm import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tp,
)
from parallel_layers.pipeline.weight_grad import deferrable_linear
from parallel_layers.utils import check_sequence_divisible, check_width, copy_shard_, divide

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "init_linear_"]


@torch.no_grad()
def init_linear_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``nn.Linear``'s (and ``nn.Conv2d``'s) initialization, in place: Kaiming-uniform weight,
    uniform(+-1/sqrt(fan_in)) bias, ``fan_in`` = the weight's size per output row."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _full_linear_init(
    out_features: int, in_features: int, bias: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full weight and bias ``nn.Linear(in, out, bias, dtype=dtype)`` would get on the CPU."""
    w = torch.empty(out_features, in_features, dtype=dtype)
    b = torch.empty(out_features, dtype=dtype) if bias else None
    init_linear_(w, b)
    return w, b


def _check_overlap(overlap_comm: bool, sequence_parallel: bool, name: str) -> None:
    if overlap_comm and not sequence_parallel:
        raise ValueError(
            f"{name}(overlap_comm=True) overlaps the sequence-parallel all-gather/reduce-scatter "
            "with the matmul: it needs sequence_parallel=True"
        )


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A``'s rows (the output features) split over the TP group.

    Args:
        in_features: width of the input, ``E``.
        out_features: total width of the output over all ranks, ``F`` (divisible by ``tp``).
        bias: learn a bias (sharded like the output).
        tp_group: the tensor-parallel group; ``None`` or one rank means no communication.
        gather_output: all-gather the output so every rank holds all ``F`` features.
        sequence_parallel: the input is sharded along the sequence (dim -2) and all-gathered here.
        overlap_comm: with ``sequence_parallel``, overlap that all-gather with the matmul.

    Shapes, with ``p = tp``:
        weight ``(F/p, E)``; bias ``(F/p,)``.
        input ``(*, S, E)``, or ``(*, S/p, E)`` with ``sequence_parallel``.
        output ``(*, S, F/p)``, or ``(*, S, F)`` with ``gather_output``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        tp_group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_overlap(overlap_comm, sequence_parallel, type(self).__name__)
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.out_features_per_partition = divide(out_features, self.tp_size, "out_features")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.overlap_comm = overlap_comm and self.tp_size > 1
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_features_per_partition, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features_per_partition, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the full ``nn.Linear`` initialization on the CPU; keep this rank's rows."""
        if self.weight.is_meta:
            return
        w, b = _full_linear_init(
            self.out_features, self.in_features, self.bias is not None, self.weight.dtype
        )
        copy_shard_(self.weight, w, self.tp_size, self.tp_rank, dim=0)
        if b is not None:
            copy_shard_(self.bias, b, self.tp_size, self.tp_rank, dim=0)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        tp_group: dist.ProcessGroup | None,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
    ) -> ColumnParallelLinear:
        """The column-parallel shard of ``linear`` (its weight rows ``chunk(tp, 0)[tp_rank]``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            tp_group=tp_group,
            gather_output=gather_output,
            sequence_parallel=sequence_parallel,
            overlap_comm=overlap_comm,
            device="meta",
            dtype=linear.weight.dtype,
        ).to_empty(device=linear.weight.device)
        copy_shard_(layer.weight, linear.weight, layer.tp_size, layer.tp_rank, dim=0)
        if linear.bias is not None:
            copy_shard_(layer.bias, linear.bias, layer.tp_size, layer.tp_rank, dim=0)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.in_features, type(self).__name__)
        if self.sequence_parallel:
            check_sequence_divisible(x, 1, type(self).__name__)  # (*, S/p, E): any S/p
            if self.overlap_comm:
                from kernels import all_gather_matmul

                # (*, S/p, E) gathered over the sequence while it is multiplied: (*, S, F/p)
                out = all_gather_matmul(
                    x, self.weight, self.tp_group, gather_dim=x.dim() - 2, bias=self.bias
                )
            else:
                x = gather_from_sequence_parallel(x, self.tp_group, dim=-2)  # (*, S, E)
                out = deferrable_linear(x, self.weight, self.bias)  # (*, S, F/p)
        else:
            x = copy_to_tp(x, self.tp_group)  # gradient all-reduced over the TP group
            out = deferrable_linear(x, self.weight, self.bias)  # (*, S, F/p)
        if self.gather_output:
            out = gather_from_tp(out, self.tp_group, dim=-1)  # (*, S, F)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"({self.out_features_per_partition} per rank, tp={self.tp_size}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}, overlap_comm={self.overlap_comm}"
        )


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A``'s columns (the input features) split over the TP group.

    Each rank multiplies its slice of the input features and the partial results are summed
    (all-reduced, or reduce-scattered along the sequence with ``sequence_parallel``); the bias is
    whole on every rank and added once, after the reduction.

    Args:
        in_features: total width of the input over all ranks, ``F`` (divisible by ``tp``).
        out_features: width of the output, ``E``.
        bias: learn a bias (whole on every rank).
        tp_group: the tensor-parallel group; ``None`` or one rank means no communication.
        input_is_parallel: the input is already split along its features (a column-parallel
            layer's output); when ``False`` this layer keeps its own chunk of a whole input.
        sequence_parallel: reduce-scatter the output along the sequence (dim -2).
        overlap_comm: with ``sequence_parallel``, overlap that reduce-scatter with the matmul.

    Shapes, with ``p = tp``:
        weight ``(E, F/p)``; bias ``(E,)``.
        input ``(*, S, F/p)``, or ``(*, S, F)`` when not ``input_is_parallel``.
        output ``(*, S, E)``, or ``(*, S/p, E)`` with ``sequence_parallel``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        tp_group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_overlap(overlap_comm, sequence_parallel, type(self).__name__)
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_partition = divide(in_features, self.tp_size, "in_features")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.overlap_comm = overlap_comm and self.tp_size > 1
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_partition, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the full ``nn.Linear`` initialization on the CPU; keep this rank's columns."""
        if self.weight.is_meta:
            return
        w, b = _full_linear_init(
            self.out_features, self.in_features, self.bias is not None, self.weight.dtype
        )
        copy_shard_(self.weight, w, self.tp_size, self.tp_rank, dim=1)
        if b is not None:
            copy_shard_(self.bias, b, 1, 0, dim=0)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        tp_group: dist.ProcessGroup | None,
        *,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
    ) -> RowParallelLinear:
        """The row-parallel shard of ``linear`` (its weight columns ``chunk(tp, 1)[tp_rank]``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            tp_group=tp_group,
            input_is_parallel=input_is_parallel,
            sequence_parallel=sequence_parallel,
            overlap_comm=overlap_comm,
            device="meta",
            dtype=linear.weight.dtype,
        ).to_empty(device=linear.weight.device)
        copy_shard_(layer.weight, linear.weight, layer.tp_size, layer.tp_rank, dim=1)
        if linear.bias is not None:
            copy_shard_(layer.bias, linear.bias, 1, 0, dim=0)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if self.input_is_parallel:
            check_width(x, self.in_features_per_partition, f"{name} (input_is_parallel=True)")
        else:
            check_width(x, self.in_features, name)
        if self.sequence_parallel:
            check_sequence_divisible(x, self.tp_size, name)
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group, dim=-1)  # (*, S, F) -> (*, S, F/p)
        if self.sequence_parallel:
            if self.overlap_comm:
                from kernels import matmul_reduce_scatter

                # (*, S, F/p) @ (F/p, E), reduce-scattered over the sequence as it is computed
                out = matmul_reduce_scatter(x, self.weight, self.tp_group, scatter_dim=x.dim() - 2)
            else:
                out = deferrable_linear(x, self.weight)  # (*, S, E) partial sums
                out = reduce_scatter_to_sequence_parallel(out, self.tp_group, dim=-2)  # (*, S/p, E)
            if self.bias is not None:
                # Each rank adds the bias to its own tokens only, so its gradient is a partial
                # sum: copy_to_tp all-reduces it in backward, keeping the replicas equal.
                out = out + copy_to_tp(self.bias, self.tp_group)
            return out
        if self.tp_size == 1:
            return deferrable_linear(x, self.weight, self.bias)  # exactly nn.Linear
        out = reduce_from_tp(deferrable_linear(x, self.weight), self.tp_group)  # (*, S, E)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} ({self.in_features_per_partition} per rank, "
            f"tp={self.tp_size}), out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}, overlap_comm={self.overlap_comm}"
        )
