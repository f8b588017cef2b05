"""Plain (non-autograd) collectives on tensors along any dim, and the communication ledger.

Everything in this package that talks to other ranks goes through these few functions, for two
reasons:

* torch renames its collectives between releases (``all_gather_into_tensor`` became
  ``all_gather_single`` in 2.13, ``reduce_scatter_tensor`` likewise); the entry point the installed
  torch has is picked once, here.
* Every call is recorded in the active :class:`CommLedger`s (kind, dtype, payload bytes, ranks),
  so tests, benchmarks and the trainer's report count exactly what a step moves (and check that an
  overlapped path moves exactly what the plain one does).

**Bytes sent.** The ledger counts, per message, the bytes *one rank sends* under the ring
algorithms NCCL and gloo use for large messages, averaged over the ``p`` ranks of the group (the
factor NCCL's ``busbw`` uses). With a payload of ``n`` bytes per rank:

=================  ======================================  =================================
kind               bytes sent per rank                     ``n`` is
=================  ======================================  =================================
``all_reduce``     ``2 * (p - 1) / p * n``                 the tensor (reduce-scatter, then
                                                           all-gather, of ``p`` chunks)
``all_gather``     ``(p - 1) * n``                         the local shard
``reduce_scatter`` ``(p - 1) / p * n``                     the full input
``broadcast``      ``(p - 1) / p * n``                     the tensor (a pipelined chain: every
                                                           rank but the last sends it once)
``send``           ``n``                                   the message (point to point)
=================  ======================================  =================================

The fractions are kept exact (:class:`fractions.Fraction`) and each kind's total is rounded to
a whole byte once, when read, so a ledger's figures equal the analytic count to the byte.

The point-to-point steps of a decomposed collective (the ring steps of
:mod:`triton_parallel_layers.kernels.collective_matmul`) go through :func:`send_recv` with ``kind`` set to the collective
they implement: ``p - 1`` ring steps of an all-gather each send one shard, those of a
reduce-scatter one ``n / p`` chunk, so a decomposed collective and the plain one count the same
bytes under the same kind (only the call counts differ).

**Copies.** :func:`all_reduce_` reduces in place. :func:`all_gather` and :func:`reduce_scatter`
run the dim-0 collective (``all_gather_into_tensor`` / ``reduce_scatter_tensor``) on a rank-major
buffer ``(p, *shard)``: a contiguous shard is gathered without a copy, and the one layout copy left
(rank-major to ``dim``-major, or back) is skipped when every dim before ``dim`` has size 1 (``dim``
0, or a batch of one), where the two layouts are the same memory.

These live in ``kernels`` (not ``parallel_layers``) because the communication-overlapped matmul
kernels need them and ``kernels`` imports nothing above it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.distributed as dist

__all__ = [
    "CommLedger",
    "CommRecord",
    "all_gather",
    "all_reduce",
    "all_reduce_",
    "broadcast_",
    "group_rank",
    "group_size",
    "is_dense",
    "record",
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
def _ring_bytes(kind: str, nbytes: int, ranks: int | None) -> Fraction:
    """Bytes one rank sends for a ``kind`` message of ``nbytes`` over ``ranks`` ranks (table
    above); ``ranks=None``: a point-to-point message, sent whole."""
    if ranks is None:
        return Fraction(nbytes)
    p = ranks
    factor = {
        "all_reduce": Fraction(2 * (p - 1), p),
        "all_gather": Fraction(p - 1),
        "reduce_scatter": Fraction(p - 1, p),
        "broadcast": Fraction(p - 1, p),
    }[kind]
    return factor * nbytes


@dataclass(frozen=True)
class CommRecord:
    """One message: its ``kind``, the ``dtype`` and bytes of the payload handed to it (``nbytes``,
    see the module table), the group size (``ranks``; ``None`` for point to point) and the bytes
    this rank sends for it (``sent``, exact)."""

    kind: str
    dtype: torch.dtype
    nbytes: int
    ranks: int | None
    sent: Fraction


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class CommLedger:
    """Every message this rank sent while the ledger was active (:func:`record_comm`).

    ``bytes_sent`` and ``calls`` are per kind; :meth:`by_dtype` splits the bytes by dtype too;
    :meth:`summary` is the JSON-ready form the trainer's report writes.
    """

    messages: list[CommRecord] = field(default_factory=list)

    def record(self, kind: str, nbytes: int, dtype: torch.dtype, ranks: int | None = None) -> None:
        """Add one ``kind`` message of ``nbytes`` payload bytes in ``dtype`` over ``ranks`` ranks
        (``None``: point to point)."""
        sent = _ring_bytes(kind, nbytes, ranks)
        self.messages.append(CommRecord(kind, dtype, nbytes, ranks, sent))

    @property
    def bytes_sent(self) -> Counter:
        """``{kind: bytes sent}``, each kind's exact total rounded to a whole byte."""
        exact: dict[str, Fraction] = {}
        for m in self.messages:
            exact[m.kind] = exact.get(m.kind, 0) + m.sent
        return Counter({k: round(v) for k, v in exact.items()})

    @property
    def calls(self) -> Counter:
        """``{kind: number of messages}``."""
        return Counter(m.kind for m in self.messages)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def by_dtype(self) -> dict[tuple[str, str], int]:
        """``{(kind, dtype name): bytes sent}`` (``("send", "bfloat16"): ...``), rounded once."""
        exact: dict[tuple[str, str], Fraction] = {}
        for m in self.messages:
            key = (m.kind, _dtype_name(m.dtype))
            exact[key] = exact.get(key, 0) + m.sent
        return {k: round(v) for k, v in exact.items()}

    def summary(self) -> dict[str, dict]:
        """``{kind: {"bytes": sent, "calls": n, "dtypes": {dtype name: bytes}}}``, sorted."""
        calls = self.calls
        out: dict[str, dict] = {}
        for (kind, dtype), nbytes in sorted(self.by_dtype().items()):
            entry = out.setdefault(kind, {"bytes": 0, "calls": calls[kind], "dtypes": {}})
            entry["dtypes"][dtype] = nbytes
        for kind, nbytes in self.bytes_sent.items():
            out[kind]["bytes"] = nbytes
        return out

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
        print(ledger.by_dtype())   # {('all_gather', 'bfloat16'): ..., ...}

    Ledgers nest: an inner one's traffic is counted by the outer ones too.
    """
    ledger = CommLedger()
    _ledgers.append(ledger)
    try:
        yield ledger
    finally:
        _ledgers.remove(ledger)


def record(kind: str, t: torch.Tensor, ranks: int | None = None) -> None:
    """Add a ``kind`` message carrying ``t`` over ``ranks`` ranks (``None``: point to point) to
    every active ledger (nothing to do when none is)."""
    if _ledgers:
        nbytes = t.numel() * t.element_size()
        for ledger in _ledgers:
            ledger.record(kind, nbytes, t.dtype, ranks)


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------
def group_size(group: dist.ProcessGroup | None) -> int:
    """The number of ranks in ``group``; 1 for ``None`` (no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank within ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def is_dense(x: torch.Tensor) -> bool:
    """Whether a collective can work on ``x``'s memory as it is (one dense block)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def all_reduce_(
    x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """All-reduce ``x`` over ``group`` in place and return it. ``x`` must be dense (contiguous or
    channels_last); see :func:`all_reduce` for a new tensor."""
    p = group_size(group)
    if p == 1:
        return x
    if not is_dense(x):
        raise ValueError(
            f"all_reduce_: a tensor of shape {tuple(x.shape)} and strides {x.stride()} is not "
            "dense: reduce a contiguous tensor (or use all_reduce, which copies)"
        )
    record("all_reduce", x, p)
    dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce(
    x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """All-reduce ``x`` over ``group`` into a new tensor (``x`` itself is left untouched): for a
    tensor someone else still reads. A tensor this caller owns goes through :func:`all_reduce_`."""
    if group_size(group) == 1:
        return x
    return all_reduce_(x.clone(memory_format=torch.preserve_format), group, op)  # dense


def broadcast_(x: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Broadcast ``x`` (contiguous) from global rank ``src`` to every rank of ``group``, in
    place; returns ``x``."""
    p = group_size(group)
    if p > 1:
        record("broadcast", x, p)
        dist.broadcast(x, src=src, group=group)
    return x


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order: ``(.., n, ..) -> (.., p*n, ..)``.

    One dim-0 gather into a rank-major ``(p, *x.shape)`` buffer, then at most one copy (none when
    the dims before ``dim`` all have size 1). The result is contiguous.
    """
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    shard = x.contiguous()
    out = shard.new_empty((p, *shard.shape))  # out[r]: rank r's shard
    record("all_gather", shard, p)
    _all_gather_base(out.view(-1), shard.view(-1), group=group)  # flat: any shard shape
    full = (*shard.shape[:dim], p * shard.shape[dim], *shard.shape[dim + 1 :])
    return out.movedim(0, dim).reshape(full)  # a view when the leading dims are all 1


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 0) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``: ``(.., p*n, ..) -> (.., n, ..)``.

    At most one copy, into the rank-major ``(p, .., n, ..)`` layout the dim-0 collective reads
    (none when the dims before ``dim`` all have size 1); the result is contiguous. ``x.shape[dim]``
    must divide by the group size; callers check that before any rank enters.
    """
    p = group_size(group)
    if p == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % p:
        raise ValueError(
            f"reduce_scatter: size {x.shape[dim]} along dim {dim} is not divisible by {p}"
        )
    lead, n, rest = x.shape[:dim], x.shape[dim] // p, x.shape[dim + 1 :]
    full = x.reshape(*lead, p, n, *rest).movedim(dim, 0).contiguous()  # (p, *lead, n, *rest)
    out = full.new_empty(full.shape[1:])
    record("reduce_scatter", full, p)
    _reduce_scatter_base(out.view(-1), full.view(-1), group=group)  # flat: chunk r is out
    return out


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
    record(kind, send)
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
