"""Cross-entropy over vocabulary-sharded logits, without gathering them, holding one buffer.

With the logits split by vocabulary range, ``z = [z_0 | z_1 | ... | z_{p-1}]``, each rank holding
``(N, V/p)``, the loss of a token with target ``t`` is::

    loss = logsumexp(z) - z[t]                                  (no smoothing)
         = (1 - eps) * (logsumexp(z) - z[t]) + eps * (logsumexp(z) - mean(z))   (label smoothing)

and ``logsumexp(z) = m + log(sum_r sum_j exp(z_r[j] - m))`` with ``m = max_r max_j z_r[j]``. So two
collectives suffice: an all-reduce(max) of ``m`` (N floats), then one all-reduce(sum) of the
stacked per-token partials: ``sum exp(z - m)``, the target logit (non-zero on the one rank owning
``t``), and, with smoothing, ``sum (z - m)``. The gradient needs no communication at all::

    dloss/dz = softmax(z) - (1 - eps) * onehot(t) - eps / V

Memory (the trade-off of this file). ``F.cross_entropy`` saves ``log_softmax(z)`` (one
logits-sized tensor) and its backward makes two more (the NLL gradient, then the log-softmax
gradient). Here, as in Megatron-LM and Liger-Kernel, the gradient is computed in the forward,
while the softmax is at hand, into one logits-sized buffer in the logits' dtype; the backward
scales its rows by the incoming per-token gradient in place and returns it. So a rank holds one
``(N, V/p)`` buffer from forward to backward and nothing else logits-sized:

- fp32 logits: the gradient buffer is also the fp32 scratch ``exp(z - m)`` is written into.
- bf16/fp16 logits: the arithmetic stays fp32 in a scratch of ``chunk_size`` tokens ``(C, V/p)``,
  reused chunk after chunk (two passes: the sums, then after the all-reduce the gradient), and
  each chunk's gradient is rounded once into the low-precision buffer.

The price is the in-place backward: the graph can be backpropagated once (``retain_graph=True``
and a second backward raise autograd's "modified by an inplace operation" error), and the forward
spends the gradient's FLOPs even when no backward follows (with grad disabled, or logits that do
not require grad, no gradient is computed and only the chunked scratch is used).

Everything is computed in fp32 whatever the logits' dtype; the loss is returned in the logits'
dtype, as ``F.cross_entropy`` does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import all_reduce_, group_rank, group_size
from triton_parallel_layers.parallel_layers.checks import check_values
from triton_parallel_layers.parallel_layers.utils import check_positive_int

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
# Default fp32 scratch for low-precision logits: at most a quarter of the logits' rows, and at most
# this many elements (64 MiB), whichever is smaller.
_MAX_SCRATCH_ELEMENTS = 1 << 24


def _default_chunk_size(n: int, v_local: int) -> int:
    return max(1, min(math.ceil(n / 4), _MAX_SCRATCH_ELEMENTS // v_local))


def _shifted_exp(logits: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = exp(logits - m[:, None])`` in fp32, with no other ``(C, V/p)`` temporary."""
    torch.sub(logits, m.unsqueeze(-1), out=out)
    return out.exp_()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss ``(N,)`` (fp32) from logits ``(N, V/p)`` and targets ``(N,)``; with
    ``need_grad`` it also fills, and saves, the per-token gradient ``dloss_i/dz_i``."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: dist.ProcessGroup | None,
        ignore_index: int,
        label_smoothing: float,
        chunk_size: int,
        need_grad: bool,
    ) -> torch.Tensor:
        p, rank = group_size(group), group_rank(group)
        n, v_local = logits.shape
        vocab, start = v_local * p, rank * v_local
        eps = label_smoothing

        valid = target != ignore_index  # (N,)
        owned = valid & (target >= start) & (target < start + v_local)
        local_t = (target - start).masked_fill(~owned, 0).unsqueeze(-1)  # (N, 1)

        # amax is exact in any dtype, so it needs no fp32 copy; reduced in place (a fresh tensor)
        m = all_reduce_(logits.amax(dim=-1).float(), group, op=dist.ReduceOp.MAX)  # (N,)
        target_z = (logits.gather(-1, local_t).squeeze(-1).float() - m).masked_fill_(~owned, 0.0)

        grad = (
            torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None
        )
        # fp32 logits: the gradient buffer is the scratch, one chunk; otherwise a reused fp32 chunk
        in_place = grad is not None and grad.dtype == torch.float32
        rows = n if in_place else min(chunk_size, n)
        scratch = grad if in_place else logits.new_empty((rows, v_local), dtype=torch.float32)
        chunks = [(0, n)] if rows >= n else [(i, min(i + rows, n)) for i in range(0, n, rows)]

        sum_exp = logits.new_empty(n, dtype=torch.float32)
        sum_z = logits.new_empty(n, dtype=torch.float32) if eps > 0 else None  # sum_j (z_j - m)
        for i, j in chunks:
            w = scratch[: j - i]
            torch.sub(logits[i:j], m[i:j].unsqueeze(-1), out=w)  # (C, V/p) fp32, <= 0
            if sum_z is not None:
                torch.sum(w, dim=-1, out=sum_z[i:j])
            torch.sum(w.exp_(), dim=-1, out=sum_exp[i:j])

        partials = [sum_exp, target_z] + ([sum_z] if sum_z is not None else [])
        sums = all_reduce_(torch.stack(partials), group)  # (2 or 3, N), fresh: in place
        lse = sums[0].log()  # logsumexp(z) - m
        loss = lse - sums[1]
        if sum_z is not None:
            loss = (1 - eps) * loss + eps * (lse - sums[2] / vocab)
        loss = loss.masked_fill(~valid, 0.0)

        if grad is not None:
            # ignored tokens get a zero row: their softmax scale, smoothing and one-hot are all 0
            scale = valid / sums[0]  # (N,)
            for i, j in chunks:
                w = scratch[: j - i]
                if not in_place:
                    _shifted_exp(logits[i:j], m[i:j], out=w)
                w.mul_(scale[i:j].unsqueeze(-1))  # softmax
                if eps > 0:
                    w.sub_((eps / vocab) * valid[i:j].unsqueeze(-1))
                hit = (-(1.0 - eps) * owned[i:j]).to(w.dtype).unsqueeze(-1)  # (C, 1)
                w.scatter_add_(-1, local_t[i:j], hit)
                if not in_place:
                    grad[i:j].copy_(w)  # the one rounding to the logits' dtype
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_loss.unsqueeze(-1))  # in place: the buffer is this backward's to spend
        return grad, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy`` of the logits gathered over ``tp_group``, computed on the shards.

    Holds one logits-sized buffer per rank (the gradient, computed in the forward; see the module
    docstring), against ``F.cross_entropy``'s three.

    Args:
        logits_shard: ``(*, V/p)``, this rank's contiguous vocabulary range (a column-parallel
            output layer's output, not gathered). The class dim is the last one.
        target: ``(*)`` class indices in ``[0, V)`` or ``ignore_index``, replicated over the group.
        tp_group: the tensor-parallel group (``None``: the logits are whole).
        ignore_index, label_smoothing, reduction: as in ``F.cross_entropy``.
        chunk_size: tokens per fp32 scratch chunk when the logits are not fp32 (bf16, fp16);
            ``None`` takes a quarter of the tokens, at most ``2**24 / (V/p)`` (a 64 MiB scratch).
            fp32 logits need no scratch beyond the gradient buffer, so ignore it.

    Returns:
        The loss: a scalar for ``"mean"``/``"sum"``, ``(*)`` for ``"none"``, in the logits' dtype,
        or fp32 under autocast, as ``F.cross_entropy`` (an autocast fp32 op): a bf16 loss has 2-3
        significant digits (a loss near 3 moves in steps of 1/64).
        Equal to ``F.cross_entropy(gathered.reshape(-1, V), target.reshape(-1), ...)`` (reshaped
        back for ``"none"``); ``"mean"`` averages over the targets that are not ignored.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {_REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a value in [0, 1]")
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
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

    flat_logits = logits_shard.reshape(-1, logits_shard.shape[-1])  # (N, V/p)
    flat_target = target.reshape(-1)  # (N,)
    if chunk_size is None:
        chunk_size = _default_chunk_size(*flat_logits.shape)
    need_grad = torch.is_grad_enabled() and logits_shard.requires_grad
    loss = _VocabParallelCrossEntropy.apply(
        flat_logits,
        flat_target,
        tp_group,
        ignore_index,
        float(label_smoothing),
        chunk_size,
        need_grad,
    )  # (N,) fp32
    autocast = torch.is_autocast_enabled(logits_shard.device.type)
    out_dtype = torch.float32 if autocast else logits_shard.dtype
    if reduction == "none":
        return loss.reshape(target.shape).to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return (total / (flat_target != ignore_index).sum()).to(out_dtype)
