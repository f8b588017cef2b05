"""Data-parallel gradient reduction in a chosen dtype, counted by the communication ledger.

``DistributedDataParallel`` averages gradient buckets over the ``dp`` group in the gradients' own
dtype: fp32 under autocast, whose master weights (and so gradients) are fp32. Its built-in
reduction also bypasses :mod:`triton_parallel_layers.kernels.collectives`, so no ledger would see
it. :func:`register_grad_reduce_hook` installs a DDP comm hook that

* reduces each bucket in ``dtype``: ``"fp32"`` (the default) is exactly DDP's own averaging
  (divide by ``p``, then sum); ``"bf16"`` halves the bytes on the wire as PyTorch's
  ``bf16_compress_hook`` does: the fp32 bucket is cast to bf16, divided by ``p`` (before the sum,
  so it cannot overflow), all-reduced, and copied back into the fp32 bucket, where the optimizer
  reads it (the sum is rounded to bf16: about 3 significant digits per gradient element);
* records every bucket's all-reduce in the active ledgers (kind ``all_reduce``, its dtype).

Megatron-Core's ``DistributedDataParallelConfig.grad_reduce_in_fp32`` and torchtitan's FSDP
``reduce_dtype`` make the same choice. The trainer's flag is ``--grad-reduce-dtype {fp32,bf16}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from triton_parallel_layers.kernels.collectives import group_size, record

__all__ = ["GRAD_REDUCE_DTYPES", "GradReduceState", "register_grad_reduce_hook"]

GRAD_REDUCE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The gradient reduction dtypes by name (the trainer's ``--grad-reduce-dtype``)."""


@dataclass
class GradReduceState:
    """The state of the hook :func:`register_grad_reduce_hook` installs (``ddp.grad_reduce``):
    the group, the wire dtype, and callables run before each bucket's all-reduce (fault
    injection kills a rank there: DDP takes one comm hook only)."""

    group: dist.ProcessGroup
    dtype: torch.dtype
    before_bucket: list[Callable[[], None]] = field(default_factory=list)


def _reduce_bucket(state, bucket):  # no annotations: DDP checks them against the real types
    """Average the ``dist.GradBucket`` ``bucket`` over ``state.group`` in ``state.dtype`` (module
    docstring); returns the future of the averaged fp32 bucket."""
    for fn in state.before_bucket:
        fn()
    buf = bucket.buffer()  # the flat fp32 gradients of the bucket's parameters
    p = group_size(state.group)
    wire = buf if buf.dtype == state.dtype else buf.to(state.dtype)
    wire.div_(p)
    record("all_reduce", wire, p)
    fut = dist.all_reduce(wire, group=state.group, async_op=True).get_future()
    if wire is buf:
        return fut.then(lambda f: f.value()[0])

    def copy_back(f: torch.futures.Future) -> torch.Tensor:
        return buf.copy_(f.value()[0])

    return fut.then(copy_back)


def register_grad_reduce_hook(ddp: DistributedDataParallel, dtype: str = "fp32") -> GradReduceState:
    """Make ``ddp`` reduce its gradients in ``dtype`` (``"fp32"`` or ``"bf16"``) through the
    ledger (module docstring). Call it once, before the first backward; the hook's state is
    returned and kept as ``ddp.grad_reduce``."""
    if dtype not in GRAD_REDUCE_DTYPES:
        raise ValueError(
            f"gradient reduction dtype {dtype!r}: expected one of {list(GRAD_REDUCE_DTYPES)}"
        )
    state = GradReduceState(ddp.process_group, GRAD_REDUCE_DTYPES[dtype])
    ddp.register_comm_hook(state, _reduce_bucket)
    ddp.grad_reduce = state
    return state
