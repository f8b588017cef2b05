"""A tensor-parallel LSTM: the hidden units sharded over the TP group, drop-in for ``nn.LSTM``.

Each rank owns ``H/p`` of the ``H`` hidden units, and for them the rows of *all four* gates
(``i, f, g, o``), so the gate non-linearities and the cell update of its units need nothing from
the other ranks. Per layer, with ``p`` ranks::

    x (T, B, I) --copy-->  xg = x @ W_ih_local^T + b_local        (T, B, 4H/p)  column-parallel,
                                                                                one GEMM for all T
    for t:  z_t = xg[t] + h_{t-1} @ W_hh_local^T                   (B, 4H/p)     W_hh_local (4H/p, H)
            h_t_local, c_t_local = lstm_cell(z_t, c_{t-1,local})    (B, H/p)      fused Triton cell
            h_t = all_gather(h_t_local)                             (B, H)        one per step

so the recurrent state is all-gathered once per time step (``B H`` elements), and those gathered
``h_t`` *are* the layer's full-width output: no further gather. Backward, the dual: one
reduce-scatter of ``dh_t`` per step (each rank's ``dz_t @ W_hh_local`` is a partial sum over its
gate rows), and one all-reduce of the input gradient per layer (the input projection is
column-parallel). The last cell state is all-gathered once at the end.

**Why the output gradient is divided by p.** ``h_t`` feeds two consumers: the next step's
recurrent GEMM, whose gradient is a per-rank partial sum, and the layer output, whose gradient is
replicated (every rank computes the same loss from the same full-width output, as for every
replicated activation in Megatron-style TP). The all-gather's backward reduce-scatters the *sum*
of both, which would count the replicated part ``p`` times; so the output path passes through
:func:`_share_replicated_grad` (identity forward, gradient ``/ p`` backward). For ``p`` a power of
two the division is exact.

**Parameters** have ``nn.LSTM``'s names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``, ...), with this rank's rows: ``W_ih_local (4H/p, I)`` is the concatenation of the
rank's chunk of each gate's block, ``full.unflatten(0, (4, H)).chunk(p, 1)[rank].flatten(0, 1)``
(not ``full.chunk(p, 0)[rank]``: that would hand one rank whole gates). The shard table
(:mod:`~triton_parallel_layers.parallel_layers.sharding`) records these "four blocks, each
chunked" parameters, so initialization by name and the resharding checkpoints handle them.

**Initialization**: :meth:`ParallelLSTM.reset_parameters` draws the full tensors exactly as
``nn.LSTM`` does (uniform ``+-1/sqrt(H)``, in ``nn.LSTM``'s parameter order, from the default CPU
generator) and keeps this rank's rows: a layer built after ``torch.manual_seed(s)`` holds the
shards of the ``nn.LSTM`` built after the same seed, and leaves the generator in the same state.

**Dropout** between layers (``dropout > 0``, training mode) draws the mask of the full output, so
it is the single-device mask as long as every rank of the TP group holds the same RNG state.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from triton_parallel_layers.kernels._dispatch import autocast_inputs
from triton_parallel_layers.kernels.collectives import group_rank, group_size
from triton_parallel_layers.kernels.lstm import lstm_scan
from triton_parallel_layers.parallel_layers.comm import (
    copy_to_tp,
    gather_from_sequence_parallel,
    gather_from_tp,
    scatter_to_tp,
)
from triton_parallel_layers.parallel_layers.utils import check_positive_int, divide

__all__ = ["GATES", "ParallelLSTM", "gate_shard"]

GATES = 4  # i, f, g, o: the blocks along dim 0 of every LSTM weight and bias


def gate_shard(full: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    """This rank's rows of a gate-blocked ``(4H, *)`` tensor: its chunk of each gate's ``H`` rows,
    ``(4H/parts, *)`` (a copy)."""
    return full.unflatten(0, (GATES, -1)).chunk(parts, 1)[rank].flatten(0, 1).contiguous()


class _ShareReplicatedGrad(torch.autograd.Function):
    """Forward: identity. Backward: the gradient divided by the group size (see the module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, parts: int) -> torch.Tensor:
        ctx.parts = parts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.parts, None


def _share_replicated_grad(x: torch.Tensor, parts: int) -> torch.Tensor:
    return x if parts == 1 else _ShareReplicatedGrad.apply(x, parts)


class ParallelLSTM(nn.Module):
    """A multi-layer unidirectional LSTM with its hidden units sharded over a TP group.

    Called like ``nn.LSTM``: ``out, (h_n, c_n) = lstm(x)`` or ``lstm(x, (h0, c0))``, returning
    ``nn.LSTM``'s full-width results on every rank.

    Args:
        input_size: features of the input, ``I``.
        hidden_size: hidden units over all ranks, ``H`` (divisible by ``tp``).
        num_layers: stacked layers, ``L``.
        tp_group: the tensor-parallel group; ``None`` or one rank means no communication (and
            then this is ``nn.LSTM`` on the fused cell).
        bias: learn ``b_ih`` and ``b_hh``.
        batch_first: inputs and outputs ``(B, T, *)``; otherwise ``(T, B, *)``.
        dropout: dropout on the outputs of every layer but the last, in training mode.

    Shapes, with ``p = tp``: ``weight_ih_l0 (4H/p, I)``, ``weight_ih_l{k>0} (4H/p, H)``,
    ``weight_hh_l{k} (4H/p, H)``, ``bias_*_l{k} (4H/p,)``; input ``(B, T, I)``; ``h0, c0, h_n, c_n``
    ``(L, B, H)`` (whole, replicated); output ``(B, T, H)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        tp_group: dist.ProcessGroup | None = None,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):  # fmt: skip
            check_positive_int(f"ParallelLSTM {name}", value)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"ParallelLSTM dropout={dropout!r}: expected a float in [0, 1)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ParallelLSTM dropout={dropout}: expected a value in [0, 1)")
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.hidden_size_per_partition = divide(hidden_size, self.tp_size, "hidden_size")
        rows = GATES * self.hidden_size_per_partition
        kw = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size
            self.register_parameter(
                f"weight_ih_l{layer}", nn.Parameter(torch.empty(rows, width, **kw))
            )
            self.register_parameter(
                f"weight_hh_l{layer}", nn.Parameter(torch.empty(rows, hidden_size, **kw))
            )
            if bias:
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(rows, **kw)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(rows, **kw)))
        self.reset_parameters()

    # -- parameters ---------------------------------------------------------------------------
    def _names(self, layer: int) -> list[str]:
        """``nn.LSTM``'s parameter names of ``layer``, in its order."""
        names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
        return names + ([f"bias_ih_l{layer}", f"bias_hh_l{layer}"] if self.bias else [])

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The shape of parameter ``name`` in the single-device ``nn.LSTM``."""
        local = getattr(self, name).shape
        return (local[0] * self.tp_size, *local[1:])

    def reset_parameters(self) -> None:
        """Draw ``nn.LSTM``'s full initialization on the CPU (uniform ``+-1/sqrt(H)``, in its
        parameter order); keep this rank's rows."""
        if self.weight_ih_l0.is_meta:
            return
        bound = 1.0 / math.sqrt(self.hidden_size)
        dtype = self.weight_ih_l0.dtype
        for layer in range(self.num_layers):
            for name in self._names(layer):
                full = torch.empty(self.full_shape(name), dtype=dtype).uniform_(-bound, bound)
                self._load_full(name, full)

    @torch.no_grad()
    def _load_full(self, name: str, full: torch.Tensor) -> None:
        getattr(self, name).copy_(gate_shard(full, self.tp_size, self.tp_rank))

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, tp_group: dist.ProcessGroup | None) -> ParallelLSTM:
        """The tensor-parallel shard of ``lstm`` (same sizes, layers, bias, ``batch_first`` and
        dropout; each parameter's gate-blocked rows, :func:`gate_shard`). ``meta`` stays ``meta``.

        Raises:
            TypeError: ``lstm`` is not an ``nn.LSTM``.
            ValueError: a bidirectional ``lstm``, one with ``proj_size > 0``, or a hidden size the
                TP size does not divide.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm expects an nn.LSTM, got {type(lstm).__name__}")
        if lstm.bidirectional:
            raise ValueError(
                "ParallelLSTM.from_lstm: bidirectional=True is not supported (unidirectional "
                "LSTMs only); run two ParallelLSTMs, one on the reversed sequence"
            )
        if lstm.proj_size:
            raise ValueError(
                f"ParallelLSTM.from_lstm: proj_size={lstm.proj_size} is not supported (LSTMs "
                "with projections); expected proj_size=0"
            )
        weight = lstm.weight_ih_l0
        layer = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, tp_group=tp_group,
            bias=lstm.bias, batch_first=lstm.batch_first, dropout=lstm.dropout, device="meta",
            dtype=weight.dtype,
        ).to_empty(device=weight.device)  # fmt: skip
        if not weight.is_meta:
            for k in range(lstm.num_layers):
                for name in layer._names(k):
                    layer._load_full(name, getattr(lstm, name))
        return layer

    # -- forward ------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, hx) -> None:
        """Shape checks, alike on every rank, before any collective."""
        layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
        if x.dim() != 3:
            raise ValueError(
                f"ParallelLSTM: input of shape {tuple(x.shape)}: expected 3 dims {layout}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"ParallelLSTM: input of shape {tuple(x.shape)} has last dim {x.shape[-1]}, "
                f"expected input_size={self.input_size}"
            )
        if x.shape[1 if self.batch_first else 0] == 0:
            raise ValueError(f"ParallelLSTM: input of shape {tuple(x.shape)} has no time steps")
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("ParallelLSTM: hx must be a pair (h0, c0)")
            batch = x.shape[0 if self.batch_first else 1]
            expected = (self.num_layers, batch, self.hidden_size)
            for name, s in zip(("h0", "c0"), hx):
                if tuple(s.shape) != expected:
                    raise ValueError(
                        f"ParallelLSTM: {name} of shape {tuple(s.shape)}: expected {expected} "
                        "(num_layers, B, hidden_size)"
                    )

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x (B, T, I)`` (``(T, B, I)``), ``hx = (h0, c0)`` each ``(L, B, H)`` or ``None``
        (zeros) -> ``(out (B, T, H), (h_n, c_n))``, whole on every rank."""
        self._check_input(x, hx)
        group, parts = self.tp_group, self.tp_size
        xt = x.transpose(0, 1) if self.batch_first else x  # (T, B, I)
        batch, hidden = xt.shape[1], self.hidden_size
        if hx is None:
            zeros = xt.new_zeros(self.num_layers, batch, hidden)
            hx = (zeros, zeros)
        gather_hidden = None
        if parts > 1:  # (B, H/p) -> (B, H); backward: reduce-scatter of the summed gradient
            gather_hidden = lambda h: gather_from_sequence_parallel(h, group, dim=-1)  # noqa: E731
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            params = [getattr(self, n) for n in self._names(layer)]
            w_ih, w_hh, *biases = params
            xt, w_ih, w_hh, h0, c0, *biases = autocast_inputs(
                xt, w_ih, w_hh, hx[0][layer], hx[1][layer], *biases
            )
            bias = biases[0] + biases[1] if biases else None
            # (T, B, I) @ (I, 4H/p): the input projection of every step, column-parallel
            xg = F.linear(copy_to_tp(xt, group), w_ih, bias)  # (T, B, 4H/p)
            h0 = copy_to_tp(h0, group)  # each rank's recurrent GEMM adds a partial gradient
            c0 = scatter_to_tp(c0, group, dim=-1)  # (B, H/p), gradient gathered back
            hs, c_last = lstm_scan(xg, w_hh, h0, c0, gather_hidden=gather_hidden)
            hs = [_share_replicated_grad(h, parts) for h in hs]  # (B, H) each
            xt = torch.stack(hs)  # (T, B, H): the layer's output, whole
            h_n.append(hs[-1])
            c_n.append(gather_from_tp(c_last, group, dim=-1))  # (B, H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                xt = F.dropout(xt, self.dropout, training=True)
        out = xt.transpose(0, 1) if self.batch_first else xt
        return out, (torch.stack(h_n), torch.stack(c_n))

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size} ({self.hidden_size_per_partition} per rank, "
            f"tp={self.tp_size}), num_layers={self.num_layers}, bias={self.bias}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}"
        )
