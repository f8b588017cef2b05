"""Exact memory accounting on any device, CPU included: live tensor bytes and per-rank state bytes.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no peak, and the process's
RSS counts the allocator's caching and the interpreter. Both figures here count tensor storages
instead, so they are exact, the same on every machine, and comparable with analytic formulas:

- :class:`LiveBytes` follows every storage an op allocates while it is active (a
  ``TorchDispatchMode`` sees each op, forward and backward) and drops it when the storage is freed
  (a weak reference's callback), so ``peak`` is the most bytes of tensors created inside the
  block that were alive at once. Storages that existed before the block (inputs, parameters) are
  not counted; views, in-place and ``out=`` ops allocate nothing. It counts requested bytes, not
  an allocator's rounding (CUDA's caching allocator rounds each block up to 512 bytes).
- :func:`state_bytes` adds up the parameter, gradient and optimizer-state bytes this rank holds:
  for a ``DTensor`` (FSDP2's sharded parameters) its local shard.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from triton_parallel_layers.parallel_layers.data_parallel import local_tensor

__all__ = ["LiveBytes", "local_bytes", "state_bytes"]


def _storages(tree: object) -> dict[int, torch.UntypedStorage]:
    return {
        t.untyped_storage()._cdata: t.untyped_storage()
        for t in tree_flatten(tree)[0]
        if isinstance(t, torch.Tensor)
    }


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the ``with`` block that are still alive:
    ``now``, and the most at any point, ``peak``. ::

        with LiveBytes() as mem:
            loss_fn(logits, target).backward()
        mem.peak  # bytes; mem.now: what is left (e.g. logits.grad)
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # storage key -> (bytes, weak ref)

    def _freed(self, key: int) -> None:
        nbytes, _ = self._live.pop(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        old = _storages((args, kwargs))  # views, in-place and out= ops return these
        for key, storage in _storages(out).items():
            if key in old or key in self._live:
                continue
            ref = weakref.ref(storage, lambda _, key=key: self._freed(key))
            self._live[key] = (storage.nbytes(), ref)
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        return out


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` held on this rank: a ``DTensor``'s local shard, else the tensor itself."""
    local = local_tensor(t)
    return local.numel() * local.element_size()


def state_bytes(
    params: torch.nn.Module | Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes this rank holds: ``param_bytes``,
    ``grad_bytes`` (the ``.grad`` s now: measure after a backward) and ``optimizer_bytes`` (every
    tensor of the optimizer's state: measure after its first step, which allocates it).

    ``params`` is a module or its parameters; each tensor counts once (tied parameters),
    ``meta`` ones (pipeline stages another rank owns) not at all, a ``DTensor`` by its local
    shard (FSDP2)."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    held = list({id(p): p for p in params if not p.is_meta}.values())
    state = optimizer.state.values() if optimizer is not None else ()
    return {
        "param_bytes": sum(local_bytes(p) for p in held),
        "grad_bytes": sum(local_bytes(p.grad) for p in held if p.grad is not None),
        "optimizer_bytes": sum(
            local_bytes(v) for s in state for v in s.values() if isinstance(v, torch.Tensor)
        ),
    }
