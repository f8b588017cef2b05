"""Cross-entropy over vocabulary-sharded logits, without gathering them.

With the logits split by vocabulary range, ``z = [z_0 | z_1 | ... | z_{p-1}]``, each rank holding
``(N, V/p)``, the loss of a token with target ``t`` is::

    loss = logsumexp(z) - z[t]                                  (no smoothing)
         = (1 - eps) * (logsumexp(z) - z[t]) + eps * (logsumexp(z) - mean(z))   (label smoothing)

and ``logsumexp(z) = m + log(sum_r sum_j exp(z_r[j] - m))`` with ``m = max_r max_j z_r[j]``. So two
collectives suffice: an all-reduce(max) of ``m`` (N floats), then one all-reduce(sum) of the
stacked per-token partials: ``sum exp``, the target logit (non-zero on the one rank owning
``t``), and, with smoothing, ``sum z``. The gradient needs no communication at all::

    dloss/dz = softmax(z) - (1 - eps) * onehot(t) - eps / V

computed from the softmax saved in forward (fp32, ``(N, V/p)``: the one full-size tensor kept).

Everything is computed in fp32 whatever the logits' dtype; the loss is returned in the logits'
dtype, as ``F.cross_entropy`` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import all_reduce, group_rank, group_size
from triton_parallel_layers.parallel_layers.checks import check_values

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss ``(N,)`` (fp32) from logits ``(N, V/p)`` and targets ``(N,)``."""

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index: int, label_smoothing: float):
        p, rank = group_size(group), group_rank(group)
        v_local = logits.shape[-1]
        vocab = v_local * p
        start = rank * v_local

        z = logits.float()
        m = all_reduce(z.amax(dim=-1), group, op=dist.ReduceOp.MAX)  # (N,)
        z = z - m.unsqueeze(-1)  # (N, V/p), <= 0
        softmax = z.exp()  # unnormalized for now

        valid = target != ignore_index
        owned = valid & (target >= start) & (target < start + v_local)
        local_t = (target - start).masked_fill(~owned, 0)
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)

        partials = [softmax.sum(-1), target_z]
        if label_smoothing > 0:
            partials.append(z.sum(-1))
        sums = all_reduce(torch.stack(partials), group)  # (2 or 3, N)
        sum_exp, target_z = sums[0], sums[1]
        lse = sum_exp.log()  # logsumexp(z) - m
        loss = lse - target_z
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sums[2] / vocab)
        loss = loss.masked_fill(~valid, 0.0)

        softmax.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, owned, valid)
        ctx.label_smoothing, ctx.vocab, ctx.logits_dtype = label_smoothing, vocab, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, owned, valid = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax.clone() if ctx.needs_input_grad[0] else None
        if grad is None:
            return None, None, None, None, None
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= (1.0 - eps) * owned.to(grad.dtype)
        if eps > 0:
            grad -= eps / ctx.vocab
        grad *= (grad_loss * valid).unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy`` of the logits gathered over ``tp_group``, computed on the shards.

    Args:
        logits_shard: ``(*, V/p)``, this rank's contiguous vocabulary range (a column-parallel
            output layer's output, not gathered). The class dim is the last one.
        target: ``(*)`` class indices in ``[0, V)`` or ``ignore_index``, replicated over the group.
        tp_group: the tensor-parallel group (``None``: the logits are whole).
        ignore_index, label_smoothing, reduction: as in ``F.cross_entropy``.

    Returns:
        The loss: a scalar for ``"mean"``/``"sum"``, ``(*)`` for ``"none"``, in the logits' dtype.
        Equal to ``F.cross_entropy(gathered.reshape(-1, V), target.reshape(-1), ...)`` (reshaped
        back for ``"none"``); ``"mean"`` averages over the targets that are not ignored.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {_REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a value in [0, 1]")
    if not logits_shard.is_floating_point():
        raise TypeError(f"logits must be floating point, got dtype {logits_shard.dtype}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if logits_shard.dim() < 1 or tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match logits of shape "
            f"{tuple(logits_shard.shape)}: expected target shape {tuple(logits_shard.shape[:-1])} "
            "(the logits without their last, vocabulary, dim)"
        )
    vocab = logits_shard.shape[-1] * group_size(tp_group)
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))  # (*) bool

    def explain() -> str:
        return (
            f"target value {int(target[bad][0])} is outside [0, {vocab}) (the gathered "
            f"vocabulary) and is not ignore_index={ignore_index}"
        )

    check_values(
        ~bad.any(),
        f"a target is outside [0, {vocab}) and is not ignore_index={ignore_index}",
        explain,
    )

    flat_logits = logits_shard.reshape(-1, logits_shard.shape[-1])
    flat_target = target.reshape(-1)
    loss = _VocabParallelCrossEntropy.apply(
        flat_logits, flat_target, tp_group, ignore_index, float(label_smoothing)
    )  # (N,) fp32
    if reduction == "none":
        return loss.reshape(target.shape).to(logits_shard.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(logits_shard.dtype)
    return (total / (flat_target != ignore_index).sum()).to(logits_shard.dtype)
