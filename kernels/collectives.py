"""Plain (non-autograd) collectives on tensors along any dim, and the communication ledger.

Everything in this package that talks to other ranks goes through these few functions, for two
reasons:

* torch renames its collectives between releases (``all_gather_into_tensor`` became
  ``all_gather_single`` in 2.13, ``reduce_scatter_tensor`` likewise); the entry point the installed
  torch has is picked once, here.
* Every call is recorded in the active :class:`CommLedger`, so tests and benchmarks can count the
  bytes a step moves (and check that an overlapped path moves exactly what the plain one does).

Ledger byte counts are *bytes this rank sends* under the ring algorithms NCCL and gloo use for
large messages, with ``p`` ranks and a per-rank payload of ``n`` bytes:

=================  ======================================
all-reduce         ``2 * (p - 1) / p * n`` (reduce-scatter then all-gather)
all-gather         ``(p - 1) * n``      (``n`` = the local shard)
reduce-scatter     ``(p - 1) / p * n``  (``n`` = the full input)
send               ``n``
=================  ======================================

The point-to-point steps of a decomposed collective (the ring steps of
:mod:`triton_parallel_layers.kernels.collective_matmul`) go through :func:`send_recv` with ``kind`` set to the collective
they implement: ``p - 1`` ring steps of an all-gather each send one shard, those of a
reduce-scatter one ``n / p`` chunk, so a decomposed collective and the plain one count the same
bytes under the same kind (only the call counts differ).

These live in ``kernels`` (not ``parallel_layers``) because the communication-overlapped matmul
kernels need them and ``kernels`` imports nothing above it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommLedger",
    "all_gather",
    "all_reduce",
    "group_rank",
    "group_size",
    "record_comm",
    "reduce_scatter",
    "send_recv",
    "wait_all",
]

# The collective entry points of the installed torch (names changed in 2.13).
_all_gather_base = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_base = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------
@dataclass
class CommLedger:
    """Bytes sent and calls made by this rank, per collective kind, while the ledger is active."""

    bytes_sent: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def record(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] += int(round(nbytes))
        self.calls[kind] += 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def __str__(self) -> str:
        rows = ", ".join(
            f"{k}: {v} B in {self.calls[k]} call(s)" for k, v in self.bytes_sent.items()
        )
        return f"CommLedger({rows or 'nothing sent'})"


_ledgers: list[CommLedger] = []


@contextlib.contextmanager
def record_comm() -> Iterator[CommLedger]:
    """Count what this rank sends inside the ``with`` block::

        with record_comm() as ledger:
            loss = model(x).sum(); loss.backward()
        print(ledger.bytes_sent)   # Counter({'all_reduce': ..., 'all_gather': ...})

    Ledgers nest: an inner one's traffic is counted by the outer ones too.
    """
    ledger = CommLedger()
    _ledgers.append(ledger)
    try:
        yield ledger
    finally:
        _ledgers.remove(ledger)


def record(kind: str, nbytes: float) -> None:
    """Add ``nbytes`` sent by a ``kind`` operation to every active ledger (no-op when none is)."""
    for ledger in _ledgers:
        ledger.record(kind, nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------
def group_size(group: dist.ProcessGroup | None) -> int:
    """The number of ranks in ``group``; 1 for ``None`` (no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank within ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce(
    x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """All-reduce ``x`` over ``group`` into a new tensor (``x`` itself is left untouched)."""
    p = group_size(group)
    if p == 1:
        return x
    out = x.clone(memory_format=torch.preserve_format)  # keeps channels_last; dense
    record("all_reduce", 2 * (p - 1) / p * _nbytes(out))
    dist.all_reduce(out, op=op, group=group)
    return out


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order: ``(.., n, ..) -> (.., p*n, ..)``."""
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    shard = x.movedim(dim, 0).contiguous()  # the collective concatenates along dim 0
    out = shard.new_empty((p * shard.shape[0], *shard.shape[1:]))
    record("all_gather", (p - 1) * _nbytes(shard))
    _all_gather_base(out, shard, group=group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``: ``(.., p*n, ..) -> (.., n, ..)``.

    ``x.shape[dim]`` must divide by the group size; callers check that before any rank enters.
    """
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    full = x.movedim(dim, 0).contiguous()
    if full.shape[0] % p:
        raise ValueError(
            f"reduce_scatter: size {full.shape[0]} along dim {dim} is not divisible by {p}"
        )
    out = full.new_empty((full.shape[0] // p, *full.shape[1:]))
    record("reduce_scatter", (p - 1) / p * _nbytes(full))
    _reduce_scatter_base(out, full, group=group)
    return out.movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------
# Point-to-point
# ---------------------------------------------------------------------------------------------
def send_recv(
    send: torch.Tensor,
    dst: int,
    recv: torch.Tensor,
    src: int,
    group: dist.ProcessGroup,
    *,
    kind: str = "send",
) -> list[dist.Work]:
    """Post an asynchronous exchange: ``send`` to group rank ``dst``, ``recv`` from group rank ``src``.

    Both tensors must be contiguous. Returns the works to :func:`wait_all` on; until then neither
    buffer may be touched. Both operations go in one ``batch_isend_irecv``, so on NCCL they
    form one group and a ring of such exchanges cannot deadlock; on gloo they progress on gloo's
    own threads while the caller computes. ``send``'s bytes are recorded under ``kind`` (see the
    module docstring).
    """
    record(kind, _nbytes(send))
    ops = [
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, dst), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, src), group),
    ]
    return dist.batch_isend_irecv(ops)


def wait_all(works: list[dist.Work] | None) -> None:
    """Wait for every work in ``works`` (``None`` or empty: nothing to wait for).

    On NCCL this makes the current CUDA stream wait (the host does not block); on gloo it blocks
    until the transfer is done.
    """
    for work in works or ():
        work.wait()
