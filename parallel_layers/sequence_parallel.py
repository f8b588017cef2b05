"""Replicated modules inside the sequence-parallel region.

With sequence parallelism the activations between the parallel layers are ``(B, S/tp, E)``: a norm
or a dropout there sees only this rank's tokens. :func:`~triton_parallel_layers.parallel_layers.
parallelize.parallelize` swaps them (plan style ``sequence_parallel``) for these:

* :class:`SequenceParallelLayerNorm`, :class:`SequenceParallelRMSNorm`: the same parameters, whose
  gradients hold only this rank's tokens' share until summed over the TP group;
* :class:`SequenceParallelDropout`: drops exactly what the single-device model drops.

**One all-reduce per step.** The gradients of these replicated parameters (the norms', and the
row-parallel bias under sequence parallelism) are partial sums over the TP group. Rather than
all-reduce each of them in every microbatch's backward, :func:`allreduce_sequence_parallel_grads`
sums all of them at once, in one flat buffer per dtype (Megatron-LM's
``_allreduce_layernorm_grads``), after the step's last backward. A module declares such
parameters by the names in its ``sequence_parallel_params`` and the group in its ``tp_group``.
Until the call, those gradients are partial: a training loop that steps an optimizer on a
sequence-parallel model must call it (the trainer and the pipeline schedules do), before clipping.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from triton_parallel_layers.kernels.collectives import all_reduce_, group_rank, group_size
from triton_parallel_layers.parallel_layers.data_parallel import local_tensor

__all__ = [
    "SequenceParallelDropout",
    "SequenceParallelLayerNorm",
    "SequenceParallelRMSNorm",
    "allreduce_sequence_parallel_grads",
]

Group = dist.ProcessGroup | None


@torch.no_grad()
def allreduce_sequence_parallel_grads(
    modules: nn.Module | Iterable[nn.Module], tp_group: Group = None
) -> int:
    """Sum the gradients of the sequence-parallel regions' replicated parameters over the TP
    group: one all-reduce per bucket (parameters of one group, dtype and device, in one flat
    buffer), written back into each ``.grad`` in place (so DDP's bucket views stay views).

    Call it once per step on every rank of the TP group, after the last backward (and the
    deferred weight-gradient passes), before clipping or the optimizer.

    Args:
        modules: a model, or several (a pipeline rank's stages): every submodule whose
            ``sequence_parallel_params`` names parameters is visited, each parameter once.
        tp_group: the group to sum over; default: each module's own ``tp_group``.

    Returns:
        The number of all-reduces made (0 when there is nothing to sum).
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    buckets: dict[tuple, tuple[Group, list[torch.Tensor]]] = {}
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            names = getattr(module, "sequence_parallel_params", ())
            group = (module.tp_group if tp_group is None else tp_group) if names else None
            for name in names:
                param = getattr(module, name)
                if param is None or param.grad is None or id(param) in seen:
                    continue
                seen.add(id(param))
                grad = local_tensor(param.grad)  # FSDP2: this rank's dp shard
                key = (id(group), grad.dtype, grad.device)
                buckets.setdefault(key, (group, []))[1].append(grad)
    for group, grads in buckets.values():
        # (sum of numels,): a new buffer, or a view of the one gradient (then summed in place)
        total = all_reduce_(_flatten_dense_tensors(grads), group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(total, grads)):
            grad.copy_(synced)
    return len(buckets)


def _sequence_parallel_params(module: nn.Module, *names: str) -> tuple[str, ...]:
    """``names`` that ``module`` has a parameter under, when its TP group has several ranks."""
    if group_size(module.tp_group) == 1:
        return ()
    return tuple(n for n in names if getattr(module, n, None) is not None)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on a sequence shard ``(B, S/p, E)``: same parameters (same names), whose
    gradients are this rank's tokens' share until :func:`allreduce_sequence_parallel_grads`."""

    tp_group: Group = None

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm, tp_group: Group) -> SequenceParallelLayerNorm:
        """Wrap ``norm`` sharing its parameter objects (no copy, meta stays meta)."""
        new = cls(norm.normalized_shape, norm.eps, elementwise_affine=False, bias=False)
        new.elementwise_affine = norm.elementwise_affine
        new.weight, new.bias = norm.weight, norm.bias
        new.tp_group = tp_group
        return new

    @property
    def sequence_parallel_params(self) -> tuple[str, ...]:
        """See :func:`allreduce_sequence_parallel_grads`."""
        return _sequence_parallel_params(self, "weight", "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class SequenceParallelRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` on a sequence shard ``(B, S/p, E)``; its weight's gradient is this rank's
    tokens' share until :func:`allreduce_sequence_parallel_grads`."""

    tp_group: Group = None

    @classmethod
    def from_norm(cls, norm: nn.RMSNorm, tp_group: Group) -> SequenceParallelRMSNorm:
        """Wrap ``norm`` sharing its parameter object."""
        new = cls(norm.normalized_shape, norm.eps, elementwise_affine=False)
        new.elementwise_affine = norm.elementwise_affine
        new.weight = norm.weight
        new.tp_group = tp_group
        return new

    @property
    def sequence_parallel_params(self) -> tuple[str, ...]:
        """See :func:`allreduce_sequence_parallel_grads`."""
        return _sequence_parallel_params(self, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


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
