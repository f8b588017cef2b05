"""Replicated modules inside the sequence-parallel region.

With sequence parallelism the activations between the parallel layers are ``(B, S/tp, E)``: a norm
or a dropout there sees only this rank's tokens. :func:`~triton_parallel_layers.parallel_layers.
parallelize.parallelize` swaps them (plan style ``sequence_parallel``) for these:

* :class:`SequenceParallelLayerNorm`, :class:`SequenceParallelRMSNorm`: the same parameters, whose
  gradients are summed over the TP group (each rank saw only its own tokens);
* :class:`SequenceParallelDropout`: drops exactly what the single-device model drops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from triton_parallel_layers.kernels.collectives import group_rank, group_size
from triton_parallel_layers.parallel_layers.comm import copy_to_tp

__all__ = ["SequenceParallelDropout", "SequenceParallelLayerNorm", "SequenceParallelRMSNorm"]

Group = dist.ProcessGroup | None


class SequenceParallelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on a sequence shard ``(B, S/p, E)``: same parameters (same names), whose
    gradients are summed over the TP group (each rank saw only its own tokens)."""

    tp_group: Group = None

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm, tp_group: Group) -> SequenceParallelLayerNorm:
        """Wrap ``norm`` sharing its parameter objects (no copy, meta stays meta)."""
        new = cls(norm.normalized_shape, norm.eps, elementwise_affine=False, bias=False)
        new.elementwise_affine = norm.elementwise_affine
        new.weight, new.bias = norm.weight, norm.bias
        new.tp_group = tp_group
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else copy_to_tp(self.weight, self.tp_group)
        b = None if self.bias is None else copy_to_tp(self.bias, self.tp_group)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class SequenceParallelRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` on a sequence shard ``(B, S/p, E)``; its weight's gradient is summed over
    the TP group."""

    tp_group: Group = None

    @classmethod
    def from_norm(cls, norm: nn.RMSNorm, tp_group: Group) -> SequenceParallelRMSNorm:
        """Wrap ``norm`` sharing its parameter object."""
        new = cls(norm.normalized_shape, norm.eps, elementwise_affine=False)
        new.elementwise_affine = norm.elementwise_affine
        new.weight = norm.weight
        new.tp_group = tp_group
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else copy_to_tp(self.weight, self.tp_group)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


class SequenceParallelDropout(nn.Dropout):
    """``nn.Dropout`` on a sequence shard ``(*, S/p, E)`` that drops what the single-device model
    drops: it draws the dropout mask of the whole ``(*, S, E)`` activation (the same draw
    ``nn.Dropout`` makes on it, from the same generator state) and keeps this rank's chunk.

    That needs every rank of the TP group to hold the same RNG state (seed the ranks alike, which
    the initialization rule asks anyway), and costs a transient full-size mask per call. If the
    ranks' generators differ, each chunk still gets a valid, independent dropout mask, just not
    the single-device one.
    """

    tp_group: Group = None

    @classmethod
    def from_dropout(cls, drop: nn.Dropout, tp_group: Group) -> SequenceParallelDropout:
        new = cls(drop.p, drop.inplace)
        new.tp_group = tp_group
        new.train(drop.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = group_size(self.tp_group)
        if not self.training or self.p == 0 or p == 1:
            return super().forward(x)
        full = (*x.shape[:-2], x.shape[-2] * p, x.shape[-1])
        # F.dropout of ones is the scaled mask nn.Dropout multiplies the full activation by.
        mask = F.dropout(x.new_ones(full), self.p, True)
        return x * mask.chunk(p, -2)[group_rank(self.tp_group)]
