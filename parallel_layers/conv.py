"""Channel-parallel 2-D convolutions: a conv pair in a CNN block made tensor-parallel like an MLP.

A convolution is a matmul over channels (per output pixel, ``K x (C KH KW)``), so Megatron's
split carries over with channels in place of features::

    x (N, C, H, W) --copy--> ColumnParallelConv2d: weight (K/p, C, kh, kw), bias + ReLU fused
        --> (N, K/p, H', W') --> RowParallelConv2d: weight (K2, K/p, kh, kw) --> partial sums
        --all-reduce--> + bias --> (N, K2, H'', W'')

one all-reduce forward and one backward per block, and the activation between the two convs
never leaves its rank. The column conv runs :func:`triton_parallel_layers.kernels.conv2d_bias_act` (bias and ReLU in the
kernel's epilogue); the row conv runs it without bias or activation, since both must come after
the sum over ranks. Activations may be contiguous or channels_last; the layers keep the format.

Initialization draws the full ``nn.Conv2d`` weight (Kaiming-uniform) on the CPU and keeps this
rank's chunk, so shards at any TP size are chunks of the single-device weights (same seed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from triton_parallel_layers.kernels import conv2d_bias_act
from triton_parallel_layers.kernels.collectives import group_rank, group_size
from triton_parallel_layers.kernels.conv import int_pair
from triton_parallel_layers.parallel_layers.comm import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
)
from triton_parallel_layers.parallel_layers.linear import init_linear_
from triton_parallel_layers.parallel_layers.utils import copy_shard_, divide

__all__ = ["ColumnParallelConv2d", "RowParallelConv2d"]

IntPair = int | tuple[int, int]


def _conv_args(conv: nn.Conv2d) -> dict:
    """The constructor arguments of ``conv``, or a ``ValueError`` for what the layers lack."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"groups={conv.groups} is not supported: channel-parallel convs need groups=1"
        )
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported: expected 'zeros'")
    padding = conv.padding
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1): explicit symmetric padding
        span = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if padding == "valid":
            padding = (0, 0)
        elif all(s % 2 == 0 for s in span):
            padding = (span[0] // 2, span[1] // 2)
        else:
            raise ValueError(
                f"padding='same' with kernel {conv.kernel_size} needs asymmetric padding"
            )
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": padding,
        "dilation": conv.dilation,
        "bias": conv.bias is not None,
    }


class _ParallelConv2d(nn.Module):
    """What the two layers share: arguments, parameters, initialization."""

    # Which weight dim is sharded: 0 (output channels) or 1 (input channels).
    _shard_dim: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        bias: bool,
        groups: int,
        tp_group: dist.ProcessGroup | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"groups={groups} is not supported: channel-parallel convs need groups=1"
            )
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride, self.padding = int_pair(stride, "stride", 1), int_pair(padding, "padding", 0)
        self.dilation = int_pair(dilation, "dilation", 1)
        shape = [out_channels, in_channels, *self.kernel_size]
        what = ("out_channels", "in_channels")[self._shard_dim]
        shape[self._shard_dim] = divide(shape[self._shard_dim], self.tp_size, what)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        bias_size = out_channels // self.tp_size if self._shard_dim == 0 else out_channels
        bias_param = nn.Parameter(torch.empty(bias_size, **kw)) if bias else None
        self.register_parameter("bias", bias_param)  # registered even when None, as nn.Conv2d
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the full ``nn.Conv2d`` initialization on the CPU; keep this rank's chunk."""
        if self.weight.is_meta:
            return
        w = torch.empty(
            self.out_channels, self.in_channels, *self.kernel_size, dtype=self.weight.dtype
        )
        b = (
            torch.empty(self.out_channels, dtype=self.weight.dtype)
            if self.bias is not None
            else None
        )
        init_linear_(w, b)
        self._load_full(w, b)

    def _load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        copy_shard_(self.weight, weight, self.tp_size, self.tp_rank, dim=self._shard_dim)
        if bias is not None:
            bias_parts = self.tp_size if self._shard_dim == 0 else 1
            copy_shard_(self.bias, bias, bias_parts, self.tp_rank if bias_parts > 1 else 0, dim=0)

    @classmethod
    def _from_conv(cls, conv: nn.Conv2d, tp_group, **kwargs):
        layer = cls(**_conv_args(conv), tp_group=tp_group, device="meta", dtype=conv.weight.dtype,
                    **kwargs)  # fmt: skip
        layer = layer.to_empty(device=conv.weight.device)
        layer._load_full(conv.weight, conv.bias)
        return layer

    def _check_input(self, x: torch.Tensor, channels: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(
                f"{type(self).__name__}: expected input (N, {channels}, H, W), got shape "
                f"{tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, tp={self.tp_size}, weight per rank={tuple(self.weight.shape)}"
        )


class ColumnParallelConv2d(_ParallelConv2d):
    """``act(conv2d(x, W) + b)`` with the output channels split over the TP group.

    Args: as ``nn.Conv2d`` (``groups`` must be 1), plus
        tp_group: the tensor-parallel group; ``None`` or one rank: no communication.
        relu: fuse a ReLU after the bias (in the kernel's epilogue).
        gather_output: all-gather the output channels so every rank holds all ``K``.

    Shapes, with ``p = tp``: weight ``(K/p, C, kh, kw)``, bias ``(K/p,)``; input
    ``(N, C, H, W)`` (replicated); output ``(N, K/p, H', W')``, or ``(N, K, H', W')`` with
    ``gather_output``.
    """

    _shard_dim = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        *,
        tp_group: dist.ProcessGroup | None = None,
        relu: bool = False,
        gather_output: bool = False,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.relu, self.gather_output = relu, gather_output
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         groups, tp_group, device, dtype)  # fmt: skip

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        tp_group: dist.ProcessGroup | None,
        *,
        relu: bool = False,
        gather_output: bool = False,
    ) -> ColumnParallelConv2d:
        """The output-channel shard of ``conv`` (weight ``chunk(tp, 0)[tp_rank]``)."""
        return cls._from_conv(conv, tp_group, relu=relu, gather_output=gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.in_channels)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = copy_to_tp(x, self.tp_group)  # gradient all-reduced over the TP group
        out = conv2d_bias_act(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                              activation="relu" if self.relu else None)  # (N, K/p, H', W')  # fmt: skip
        if self.gather_output:
            out = gather_from_tp(out, self.tp_group, dim=1)  # (N, K, H', W')
            if channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
        return out


class RowParallelConv2d(_ParallelConv2d):
    """``conv2d(x, W) + b`` with the input channels split over the TP group.

    Each rank convolves its slice of the input channels; the partial outputs are all-reduced and
    the bias (whole on every rank) is added once, after the sum.

    Args: as ``nn.Conv2d`` (``groups`` must be 1), plus
        tp_group: the tensor-parallel group; ``None`` or one rank: no communication.
        input_is_parallel: the input is already split along its channels (a column-parallel
            conv's output); when ``False`` this layer keeps its own chunk of a whole input.

    Shapes, with ``p = tp``: weight ``(K, C/p, kh, kw)``, bias ``(K,)``; input
    ``(N, C/p, H, W)`` (or ``(N, C, H, W)`` when not ``input_is_parallel``); output
    ``(N, K, H', W')`` on every rank.
    """

    _shard_dim = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        *,
        tp_group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.input_is_parallel = input_is_parallel
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         groups, tp_group, device, dtype)  # fmt: skip

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        tp_group: dist.ProcessGroup | None,
        *,
        input_is_parallel: bool = True,
    ) -> RowParallelConv2d:
        """The input-channel shard of ``conv`` (weight ``chunk(tp, 1)[tp_rank]``)."""
        return cls._from_conv(conv, tp_group, input_is_parallel=input_is_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:
            self._check_input(x, self.in_channels // self.tp_size)
        else:
            self._check_input(x, self.in_channels)
            x = scatter_to_tp(x, self.tp_group, dim=1)  # (N, C/p, H, W)
        if self.tp_size == 1:  # exactly nn.Conv2d: bias in the kernel
            return conv2d_bias_act(x, self.weight, self.bias, self.stride, self.padding,
                                   self.dilation, activation=None)  # fmt: skip
        out = conv2d_bias_act(x, self.weight, None, self.stride, self.padding, self.dilation,
                              activation=None)  # (N, K, H', W') partial sums  # fmt: skip
        out = reduce_from_tp(out, self.tp_group)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
