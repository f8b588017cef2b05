"""Column- and row-parallel linear layers (Megatron-LM's tensor parallelism, batch-first).

A transformer MLP ``Y = act(X A^T) B^T`` becomes, over a TP group of ``p`` ranks::

    X (B, S, E) --copy--> ColumnParallelLinear A: (4E/p, E) -> act -> RowParallelLinear B: (E, 4E/p)
                                       (B, S, 4E/p)                    (B, S, E) partial --all-reduce-->

one all-reduce forward and one backward per block. With ``sequence_parallel=True`` the activations
outside the block stay sharded along the sequence, ``(B, S/p, E)``: the column layer all-gathers
the sequence on the way in (reduce-scatter of the gradient on the way back) and the row layer
reduce-scatters on the way out (all-gather backward). Same bytes on the wire, and the norms and
dropouts between blocks do ``1/p`` of the work. ``overlap_comm=True`` then hides that gather and
reduce-scatter behind the matmul (:func:`triton_parallel_layers.kernels.all_gather_matmul`,
:func:`triton_parallel_layers.kernels.matmul_reduce_scatter`).

Initialization: :meth:`reset_parameters` draws the *full* weight exactly as ``nn.Linear`` does,
from the default CPU generator, and keeps this rank's chunk. So a layer built after
``torch.manual_seed(s)`` holds, at any TP size, the chunk of the ``nn.Linear`` built after the same
seed on the CPU (and both consume the generator alike, so the layers after it match too).

**Backward, as Megatron-LM.** The sequence-parallel column layer saves its input *shard*
``(*, S/p, E)``, not the gathered input, and gathers it again in the backward: asynchronously,
while ``grad_out @ W`` runs, then the input gradient is reduce-scattered while the weight-gradient
GEMM runs (with ``overlap_comm``, both inside one ring pass). Without sequence parallelism the
column layer's input-gradient all-reduce likewise runs while its weight-gradient GEMM does.
These are the :class:`~triton_parallel_layers.kernels.collective_matmul.LinearComm` ops of
:mod:`triton_parallel_layers.kernels.collective_matmul`.

**Sequence-parallel layout.** The sequence-parallel column layer returns ``(*, S, F/p)`` stored
sequence-major (a contiguous ``(S, *, F/p)``, Megatron-LM's ``(S, B, F)`` layout, kept internal
so the public tensors stay batch-first): the gathered rows arrive rank by rank, so that is the
layout the dim-0 all-gather writes. Elementwise ops (GELU, dropout) keep it, and the
sequence-parallel row layer multiplies such an input in that order, so its reduce-scatter runs
along dim 0: with a batch > 1 neither side of the MLP copies an activation to change its layout,
forward or backward (the backward's gradients come out in the same layout). A batch-first input
(the attention's) takes the batch-first path, whose reduce-scatter makes its one layout copy.

**Sequence-parallel bias.** The row layer's bias under sequence parallelism is added by each rank
to its own tokens, so its gradient is a partial sum; it is summed over the TP group once per step,
together with the sequence-parallel norms', by
:func:`~triton_parallel_layers.parallel_layers.sequence_parallel.allreduce_sequence_parallel_grads`
(Megatron-LM's coalesced all-reduce): call it after the backward, before clipping. The trainer
and the pipeline schedules do.

Zero-bubble pipeline schedules: every matmul but the row layer's overlapped one goes through
:func:`~triton_parallel_layers.parallel_layers.weight_grad.deferrable_linear`, whose weight gradient can be deferred to a
later ``W`` pass under ``split_weight_grad()``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from triton_parallel_layers.kernels import matmul_reduce_scatter
from triton_parallel_layers.kernels.collective_matmul import (
    ALL_GATHER,
    ALL_GATHER_RING,
    ALLREDUCE_DGRAD,
)
from triton_parallel_layers.kernels.collectives import group_rank, group_size
from triton_parallel_layers.parallel_layers.comm import (
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tp,
)
from triton_parallel_layers.parallel_layers.utils import (
    check_sequence_divisible,
    check_width,
    copy_shard_,
    divide,
)
from triton_parallel_layers.parallel_layers.weight_grad import deferrable_linear

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


def _sequence_major(x: torch.Tensor) -> bool:
    """Whether ``x (*, S, F)`` with a batch (``* != ()``) is stored sequence-major, as a contiguous
    ``(S, *, F)`` (what the sequence-parallel gathers return; see the module docstring)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(-2, 0).is_contiguous()


class _ParallelLinear(nn.Module):
    """What the column- and row-parallel layers share: arguments, parameters, initialization."""

    _shard_dim: int  # the weight dim split over the group: 0 (output features) or 1 (input)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp_group: dist.ProcessGroup | None,
        sequence_parallel: bool,
        overlap_comm: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        if overlap_comm and not sequence_parallel:
            raise ValueError(
                f"{type(self).__name__}(overlap_comm=True) overlaps the sequence-parallel "
                "all-gather/reduce-scatter with the matmul: it needs sequence_parallel=True"
            )
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.overlap_comm = overlap_comm and self.tp_size > 1
        shape = [out_features, in_features]
        what = ("out_features", "in_features")[self._shard_dim]
        shape[self._shard_dim] = divide(shape[self._shard_dim], self.tp_size, what)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        # The bias follows the output features: sharded with them (column), whole (row).
        bias_param = nn.Parameter(torch.empty(shape[0], **kw)) if bias else None
        self.register_parameter("bias", bias_param)  # registered even when None, as nn.Linear
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the full ``nn.Linear`` initialization on the CPU; keep this rank's shard."""
        if self.weight.is_meta:
            return
        self._load_full(
            *_full_linear_init(
                self.out_features, self.in_features, self.bias is not None, self.weight.dtype
            )
        )

    def _load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Copy this rank's shards of a full single-device weight and bias."""
        copy_shard_(self.weight, weight, self.tp_size, self.tp_rank, dim=self._shard_dim)
        if bias is not None:
            if self._shard_dim == 0:
                copy_shard_(self.bias, bias, self.tp_size, self.tp_rank, dim=0)
            else:
                copy_shard_(self.bias, bias, 1, 0, dim=0)

    @classmethod
    def _from_linear(cls, linear: nn.Linear, tp_group: dist.ProcessGroup | None, **options):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            tp_group=tp_group,
            device="meta",
            dtype=linear.weight.dtype,
            **options,
        ).to_empty(device=linear.weight.device)
        layer._load_full(linear.weight, linear.bias)
        return layer


class ColumnParallelLinear(_ParallelLinear):
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

    _shard_dim = 0

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
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, tp_group, sequence_parallel,
                         overlap_comm, device, dtype)  # fmt: skip

    @property
    def out_features_per_partition(self) -> int:
        return self.weight.shape[0]

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
        return cls._from_linear(linear, tp_group, gather_output=gather_output,
                                sequence_parallel=sequence_parallel, overlap_comm=overlap_comm)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.in_features, type(self).__name__)
        if self.sequence_parallel:
            check_sequence_divisible(x, 1, type(self).__name__)  # (*, S/p, E): any S/p
            # (*, S/p, E) gathered over the sequence: (*, S, F/p). Saves the shard; its backward
            # gathers it again (overlapped with grad_out @ W, or inside the ring).
            comm = ALL_GATHER_RING if self.overlap_comm else ALL_GATHER
            args = (self.tp_group.group_name, x.dim() - 2)
            out = deferrable_linear(x, self.weight, self.bias, comm, *args)
        elif self.tp_size > 1:
            # (*, S, E) replicated -> (*, S, F/p); backward: the input gradient all-reduced
            # over the TP group while the weight-gradient GEMM runs
            out = deferrable_linear(
                x, self.weight, self.bias, ALLREDUCE_DGRAD, self.tp_group.group_name
            )
        else:
            out = deferrable_linear(x, self.weight, self.bias)  # exactly nn.Linear
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


class RowParallelLinear(_ParallelLinear):
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

    _shard_dim = 1

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
        self.input_is_parallel = input_is_parallel
        super().__init__(in_features, out_features, bias, tp_group, sequence_parallel,
                         overlap_comm, device, dtype)  # fmt: skip

    @property
    def in_features_per_partition(self) -> int:
        return self.weight.shape[1]

    @property
    def sequence_parallel_params(self) -> tuple[str, ...]:
        """The bias under sequence parallelism: whole on every rank, but each rank adds it to its
        own tokens only, so its gradient here is a partial sum; see
        :func:`~triton_parallel_layers.parallel_layers.sequence_parallel.allreduce_sequence_parallel_grads`."""
        return ("bias",) if self.sequence_parallel and self.bias is not None else ()

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
        return cls._from_linear(linear, tp_group, input_is_parallel=input_is_parallel,
                                sequence_parallel=sequence_parallel, overlap_comm=overlap_comm)  # fmt: skip

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
                # (*, S, F/p) @ (F/p, E), reduce-scattered over the sequence as it is computed
                out = matmul_reduce_scatter(x, self.weight, self.tp_group, scatter_dim=x.dim() - 2)
            elif _sequence_major(x):
                # x is the sequence-gathering column layer's output (through elementwise ops),
                # stored sequence-major: (S, *, F/p) @ (F/p, E) -> (S, *, E) partial sums on a
                # view, reduce-scattered along dim 0: no layout copy on either side
                out = deferrable_linear(x.movedim(-2, 0), self.weight)
                out = reduce_scatter_to_sequence_parallel(out, self.tp_group, dim=0)
                out = out.movedim(0, -2)  # (*, S/p, E), stored sequence-major
            else:
                out = deferrable_linear(x, self.weight)  # (*, S, E) partial sums
                out = reduce_scatter_to_sequence_parallel(out, self.tp_group, dim=-2)  # (*, S/p, E)
            # Each rank adds the bias to its own tokens only, so its gradient is a partial sum:
            # allreduce_sequence_parallel_grads sums it over the group once per step.
            return out if self.bias is None else out + self.bias
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
