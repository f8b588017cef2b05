"""Point-to-point transport between pipeline stages: activations forward, gradients backward.

Virtual stage ``s`` lives on pipeline rank ``s % p`` (see :mod:`.actions`), so stage ``s`` sends its
output to rank ``(s + 1) % p`` and its input gradient to rank ``(s - 1) % p``; with ``p >= 2`` these
are always other ranks, and with ``p == 1`` (all chunks on one rank) the tensors are handed over in
memory.

Messages travel in groups: :meth:`StageTransport.post` sends and receives a list of
:class:`~.actions.Message` s with one ``batch_isend_irecv`` on the ``pp`` group (this rank's
pipeline: same ``dp`` and ``tp`` coordinates, so each tensor-parallel rank exchanges its own shard
or replica with its peer). The schedules (:mod:`.schedules`) post, before each action, the group
:func:`~.actions.p2p_plan` assigns to it; that plan orders every rank's operations by one global
key, so the traffic completes under NCCL's rule (a large message moves only while the groups
holding it on both sides are current; each rank runs its groups in posting order): checked on CPU
by recording the groups on gloo and replaying them (:mod:`.p2p_check`). The same order runs on
every backend. NCCL ignores tags and matches messages between two ranks in order; the plan's
order is the same on both sides, and the replay checks that matched messages agree in size and
tag (the tags below are what gloo matches by).

===================  ==========  ===========================================
stream               tag         shape
===================  ==========  ===========================================
activation into s    ``s``       exchanged once (below), then cached
gradient into s      ``S + s``   that of stage ``s``'s own output
metadata into s      ``2S + s``  ``(3 + MAX_DIMS,)`` int64
===================  ==========  ===========================================

Shapes and dtypes are exchanged once: the first activation a stage sends is preceded, in the same
group, by a small metadata message (dtype, whether it needs a gradient, shape), which the receiver
caches. The receiver cannot size the activation's buffer before the metadata has arrived: it posts
the operations before that point with the metadata receive, waits for it, and posts the activation
receive with the rest (same order on both sides, so NCCL's matching holds). So stages whose
activation shapes change from stage to stage (a CNN's ``(B, C, H, W)`` shrinking spatially) need
no declared shapes. If the microbatch shape changes later (a different batch or sequence length),
call :meth:`StageTransport.reset_shapes` on every rank before the next step.

Every tensor this transport sends, receives or allocates is on ``device`` (the stage's device,
from the mesh: :attr:`~triton_parallel_layers.parallel_layers.ParallelDims.device`).

Sends are not waited for when posted: a send buffer is kept until the caller calls
:meth:`StageTransport.release` (the executor does so one action later, before posting the next
group, and then frees the output it carried: see :mod:`.schedules`), and
:meth:`StageTransport.finish` waits for the rest at the end of the step. (Gloo cannot tell whether
a send has completed without blocking, its works report ``is_completed() == False`` until waited
on, and completes a send only once the receiver has posted its receive; NCCL's ``wait`` only
orders the streams.)

**Dtype.** Under ``torch.autocast`` a floating-point activation or gradient is sent in the
autocast dtype (bf16), never a wider copy: the send buffer is the cast of the stage's (possibly
fp32) output, the metadata names that dtype, so the receiver's buffers, and the gradient it sends
back, are in it too (the sender's backward takes the bf16 gradient of its fp32 output; autograd
casts it). Without autocast, or with ``p == 1`` (handed over in memory), tensors go as they are.

Every message sent, the metadata headers included, is recorded in the active
:func:`triton_parallel_layers.kernels.collectives.record_comm` ledgers as ``"send"``, with its
dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels._dispatch import autocast_inputs
from triton_parallel_layers.kernels.collectives import group_rank, group_size, record
from triton_parallel_layers.parallel_layers.pipeline.actions import Message

__all__ = [
    "MAX_DIMS",
    "PendingRecv",
    "StageTransport",
    "decode_meta",
    "encode_meta",
    "message_tag",
]

MAX_DIMS = 8
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def message_tag(stream: str, stage: int, num_stages: int) -> int:
    """The tag of ``stream`` (``"act"``, ``"grad"``, ``"meta"``) into virtual ``stage`` (table
    above)."""
    return {"act": 0, "grad": 1, "meta": 2}[stream] * num_stages + stage


def encode_meta(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    requires_grad: bool,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[requires_grad, dtype code, ndim, *shape, 0 ..]``: ``(3 + MAX_DIMS,)`` int64 on
    ``device``."""
    if len(shape) > MAX_DIMS or dtype not in _DTYPES:
        raise ValueError(
            f"a stage output of shape {shape} and dtype {dtype} cannot be sent: expected at "
            f"most {MAX_DIMS} dims and one of {_DTYPES}"
        )
    values = [int(requires_grad), _DTYPES.index(dtype), len(shape), *shape]
    values += [0] * (3 + MAX_DIMS - len(values))
    return torch.tensor(values, dtype=torch.int64, device=device)


def decode_meta(meta: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, bool]:
    """``(shape, dtype, requires_grad)`` of an :func:`encode_meta` header (on any device)."""
    meta = meta.cpu()
    ndim = int(meta[2])
    return tuple(int(d) for d in meta[3 : 3 + ndim]), _DTYPES[int(meta[1])], bool(meta[0])


class PendingRecv:
    """A posted receive; :meth:`wait` waits for it and returns the tensor. ``buffer`` is the
    tensor it receives into (``None`` for a hand-over in memory at ``p == 1``), allocated when
    the receive is posted: memory from then on, whether or not the message has arrived."""

    def __init__(
        self, finish: Callable[[], torch.Tensor], buffer: torch.Tensor | None = None
    ) -> None:
        self._finish = finish
        self.buffer = buffer
        self.works: list[dist.Work] = []
        self._value: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._value is None:
            for w in self.works:
                w.wait()
            self._value = self._finish()
        return self._value


class StageTransport:
    """Sends and receives between this rank's virtual stages and their neighbours.

    Args:
        pp_group: the pipeline group (``ParallelDims.pp_group``); ``None`` means one rank.
        num_chunks: model chunks per rank, ``v``; there are ``S = p * v`` virtual stages.
        device: the stage's device: every buffer is allocated there and every tensor sent is
            moved there first (NCCL sends and receives device tensors only).
    """

    def __init__(
        self,
        pp_group: dist.ProcessGroup | None,
        num_chunks: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.group = pp_group
        self.pp = group_size(pp_group)
        self.pp_rank = group_rank(pp_group)
        self.num_stages = self.pp * num_chunks
        self.device = torch.device(device)
        self._in_meta: dict[int, tuple[tuple[int, ...], torch.dtype, bool]] = {}
        self._out_meta: dict[int, tuple[tuple[int, ...], torch.dtype, bool]] = {}
        # (stream, sending stage, microbatch) -> the works and the buffers they read (kept alive)
        self._sends: dict[tuple[str, int, int], tuple[list[dist.Work], list[torch.Tensor]]] = {}
        self._local: dict[Message, torch.Tensor] = {}  # p == 1 hand-over
        if self.pp > 2 and dist.get_backend(pp_group) == "nccl":
            # NCCL sets up batched p2p lazily, and needs every rank of the group in the first
            # call; a barrier makes it so before the first pairwise exchange.
            dist.barrier(group=pp_group)

    # -- addressing -------------------------------------------------------------------------------
    def _peer(self, stage: int) -> int:
        """The global rank holding virtual stage ``stage``."""
        return dist.get_global_rank(self.group, stage % self.pp)

    def _tag(self, stream: str, stage: int) -> int:
        return message_tag(stream, stage, self.num_stages)

    # -- metadata -----------------------------------------------------------------------------
    def knows_input(self, stage: int) -> bool:
        """Whether stage ``stage``'s input shape is known here (its receive needs no metadata)."""
        return self.pp == 1 or stage in self._in_meta

    def output_meta(self, stage: int) -> tuple[tuple[int, ...], torch.dtype, bool] | None:
        """(shape, dtype, requires_grad) of what stage ``stage`` sent forward, once it has."""
        return self._out_meta.get(stage)

    def reset_shapes(self) -> None:
        """Forget the exchanged shapes; the next step exchanges them again (call on every rank)."""
        self._in_meta.clear()
        self._out_meta.clear()

    # -- one group ------------------------------------------------------------------------------
    def post(
        self, ops: Sequence[tuple[str, Message, torch.Tensor | None]]
    ) -> dict[Message, PendingRecv]:
        """Post ``ops`` as one group (one ``batch_isend_irecv``), in order; return the receives.

        Args:
            ops: ``("send", message, tensor)`` (``message.stream`` ``"act"``: the output of
                stage ``message.stage - 1``, any shape; ``"grad"``: the gradient of stage
                ``message.stage``'s output, of that output's shape) or
                ``("recv", message, None)`` (a message into one of this rank's stages).

        Returns:
            ``{message: PendingRecv}`` for the receives; ``wait()`` gives the tensor (an
            activation arrives as a leaf that requires grad when the sender's output did).

        A receive of an activation whose shape is not known yet splits the group (module
        docstring): the operations before it go out with its metadata receive, which is waited
        for; the rest follow in a second group.
        """
        batch: list[_Op] = []
        recvs: dict[Message, PendingRecv] = {}
        for kind, msg, tensor in ops:
            if kind == "send":
                self._add_send(msg, tensor, batch)
            elif self.pp == 1:
                recvs[msg] = PendingRecv(lambda key=msg: self._local.pop(key))
            else:
                if msg.stream == "act" and msg.stage not in self._in_meta:
                    header = torch.empty(3 + MAX_DIMS, dtype=torch.int64, device=self.device)
                    batch.append(_Op(dist.irecv, header, msg.stage - 1, "meta", msg.stage))
                    for w in self._flush(batch)[-1].works:
                        w.wait()
                    self._in_meta[msg.stage] = decode_meta(header)
                recvs[msg] = self._add_recv(msg, batch)
        self._flush(batch)
        return recvs

    def _add_send(self, msg: Message, t: torch.Tensor, batch: list[_Op]) -> None:
        requires_grad = t.requires_grad
        t = t.detach()
        if self.pp > 1:  # (handed over in memory: left as it is)
            t = autocast_inputs(t.to(self.device))[0]  # the compute dtype (module docstring)
        t = t.contiguous()
        meta = (tuple(t.shape), t.dtype, requires_grad)
        if msg.stream == "grad":
            src, header = msg.stage + 1, None
        else:
            src = msg.stage - 1
            known = self._out_meta.get(src)
            if known is not None and known != meta:
                raise ValueError(
                    f"stage {src} produced an output of shape {meta[0]} and dtype {meta[1]} "
                    f"after sending {known[0]}/{known[1]} earlier: call reset_shapes() on every "
                    "rank when the microbatch shape changes"
                )
            self._out_meta[src] = meta
            t = t.requires_grad_(meta[2]) if self.pp == 1 else t
            # the first message of this stream carries its shape first
            header = None if known is not None else encode_meta(*meta, device=self.device)
        if self.pp == 1:
            self._local[msg] = t
            return
        entry: tuple[list[dist.Work], list[torch.Tensor]] = ([], [])
        if header is not None:
            batch.append(_Op(dist.isend, header, msg.stage, "meta", msg.stage, entry))
            record("send", header)
        batch.append(_Op(dist.isend, t, msg.stage, msg.stream, msg.stage, entry))
        record("send", t)
        self._sends[(msg.stream, src, msg.microbatch)] = entry

    def _add_recv(self, msg: Message, batch: list[_Op]) -> PendingRecv:
        if msg.stream == "act":
            shape, dtype, requires_grad = self._in_meta[msg.stage]
            peer_stage = msg.stage - 1
        else:
            shape, dtype, _ = self._out_meta[msg.stage]
            requires_grad, peer_stage = False, msg.stage + 1
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        pending = PendingRecv(lambda: buf.requires_grad_(requires_grad), buf)
        batch.append(_Op(dist.irecv, buf, peer_stage, msg.stream, msg.stage, pending))
        return pending

    def _flush(self, batch: list[_Op]) -> list[_Op]:
        """Post ``batch`` as one group, hand each operation's work to its owner, empty it;
        returns the operations posted."""
        if not batch:
            return []
        p2p = [
            dist.P2POp(
                o.op, o.tensor, self._peer(o.peer_stage), self.group, self._tag(o.stream, o.stage)
            )
            for o in batch
        ]
        works = dist.batch_isend_irecv(p2p)
        # gloo: one work per operation; NCCL: one work for the coalesced group
        per_op = works if len(works) == len(batch) else [works] * len(batch)
        posted = list(batch)
        for o, w in zip(posted, per_op):
            o.works = w if isinstance(w, list) else [w]
            if isinstance(o.owner, PendingRecv):
                o.owner.works = o.works
            elif o.owner is not None:  # a send's (works, buffers) entry
                o.owner[0].extend(o.works)
                o.owner[1].append(o.tensor)
        batch.clear()
        return posted

    # -- completion ------------------------------------------------------------------------------
    def release(self, stream: str, stage: int, microbatch: int) -> None:
        """Wait for (and free) the send of ``stream`` (``"act"`` or ``"grad"``) from stage
        ``stage`` for ``microbatch``; call it once that message is known to have arrived."""
        entry = self._sends.pop((stream, stage, microbatch), None)
        if entry is not None:
            for w in entry[0]:
                w.wait()

    def send_buffers(self) -> list[torch.Tensor]:
        """The tensors of the sends still held (for memory accounting)."""
        return [t for _, buffers in self._sends.values() for t in buffers]

    @property
    def pending_sends(self) -> int:
        """Sends whose buffers are still held."""
        return len(self._sends)

    def finish(self) -> None:
        """Wait for every outstanding send (end of step)."""
        for works, _ in self._sends.values():
            for w in works:
                w.wait()
        self._sends.clear()
        self._local.clear()


class _Op:
    """One operation of a group being built: ``op`` (``dist.isend``/``dist.irecv``), the tensor,
    the peer's virtual stage, the stream and stage that name its tag, and who gets its work."""

    __slots__ = ("op", "tensor", "peer_stage", "stream", "stage", "owner", "works")

    def __init__(self, op, tensor, peer_stage, stream, stage, owner=None) -> None:
        self.op, self.tensor, self.peer_stage = op, tensor, peer_stage
        self.stream, self.stage, self.owner = stream, stage, owner
        self.works: list[dist.Work] = []
