"""Point-to-point transport between pipeline stages: activations forward, gradients backward.

Virtual stage ``s`` lives on pipeline rank ``s % p`` (see :mod:`.actions`), so stage ``s`` sends its
output to rank ``(s + 1) % p`` and its input gradient to rank ``(s - 1) % p``; with ``p >= 2`` these
are always other ranks, and with ``p == 1`` (all chunks on one rank) the tensors are handed over in
memory.

Messages travel with ``batch_isend_irecv`` on the ``pp`` group (this rank's pipeline: same ``dp``
and ``tp`` coordinates, so each tensor-parallel rank exchanges its own shard or replica with its
peer). Each stream has its own tag, so gloo matches messages by (peer, tag) in posting order and
the order between streams does not matter there. NCCL ignores tags and runs a group's p2p in
order on one stream: the schedules then post no receive ahead of an earlier send to the same peer
(``lookahead=0``). Pipelines over NCCL have not been run yet (no multi-GPU machine so far); two
ranks sending to each other in separate batches could still block on large messages, which
pairing each send with the next receive in one batch (as Megatron-LM does) would rule out.

===================  ==========  ===========================================
stream               tag         shape
===================  ==========  ===========================================
activation into s    ``s``       exchanged once (below), then cached
gradient into s      ``S + s``   that of stage ``s``'s own output
metadata into s      ``2S + s``  ``(3 + MAX_DIMS,)`` int64
===================  ==========  ===========================================

Shapes and dtypes are exchanged once: the first activation a stage sends is preceded by a small
metadata message (dtype, whether it needs a gradient, shape), which the receiver caches. So stages
whose activation shapes change from stage to stage (a CNN's ``(B, C, H, W)`` shrinking spatially)
need no declared shapes. If the microbatch shape changes later (a different batch or sequence
length), call :meth:`StageTransport.reset_shapes` on every rank before the next step.

Sends never block. Gloo cannot tell whether a send has completed without blocking (its works
report ``is_completed() == False`` until waited on), so a send buffer is kept until the caller
knows it has arrived and calls :meth:`StageTransport.release` (the executor does so when the
gradient of that activation comes back, or when the receiver has provably moved past the receive:
waiting then costs nothing), and :meth:`StageTransport.finish` waits for the rest at the end of
the step.

Every byte sent is recorded in the active :func:`triton_parallel_layers.kernels.collectives.record_comm` ledger as
``"send"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import group_rank, group_size, record

__all__ = ["MAX_DIMS", "PendingRecv", "StageTransport", "decode_meta", "encode_meta"]

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


def encode_meta(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    """``[requires_grad, dtype code, ndim, *shape, 0 ..]``: ``(3 + MAX_DIMS,)`` int64."""
    if len(shape) > MAX_DIMS or dtype not in _DTYPES:
        raise ValueError(
            f"a stage output of shape {shape} and dtype {dtype} cannot be sent: expected at "
            f"most {MAX_DIMS} dims and one of {_DTYPES}"
        )
    meta = torch.zeros(3 + MAX_DIMS, dtype=torch.int64)
    meta[0] = int(requires_grad)
    meta[1] = _DTYPES.index(dtype)
    meta[2] = len(shape)
    meta[3 : 3 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    return meta


def decode_meta(meta: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, bool]:
    """``(shape, dtype, requires_grad)`` of an :func:`encode_meta` header (on any device)."""
    meta = meta.cpu()
    ndim = int(meta[2])
    return tuple(int(d) for d in meta[3 : 3 + ndim]), _DTYPES[int(meta[1])], bool(meta[0])


class PendingRecv:
    """A posted receive; :meth:`wait` returns the tensor (a leaf that requires grad when the
    sender's tensor did and ``grad_leaf`` was asked)."""

    def __init__(self, finish: Callable[[], torch.Tensor]) -> None:
        self._finish = finish
        self._value: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._finish()
        return self._value


class StageTransport:
    """Sends and receives between this rank's virtual stages and their neighbours.

    Args:
        pp_group: the pipeline group (``ParallelDims.pp_group``); ``None`` means one rank.
        num_chunks: model chunks per rank, ``v``; there are ``S = p * v`` virtual stages.
        device: where received tensors are allocated.
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
        # (stream, stage, microbatch) -> the works and the buffers they read (kept alive)
        self._sends: dict[tuple[str, int, int], tuple[list[dist.Work], list[torch.Tensor]]] = {}
        self._local: dict[tuple[str, int, int], torch.Tensor] = {}  # p == 1 hand-over
        if self.pp > 2 and dist.get_backend(pp_group) == "nccl":
            # NCCL sets up batched p2p lazily, and needs every rank of the group in the first
            # call; a barrier makes it so before the first pairwise exchange.
            dist.barrier(group=pp_group)

    # -- addressing -------------------------------------------------------------------------------
    def _peer(self, stage: int) -> int:
        """The global rank holding virtual stage ``stage``."""
        return dist.get_global_rank(self.group, stage % self.pp)

    def _tag(self, stream: str, stage: int) -> int:
        return {"act": 0, "grad": 1, "meta": 2}[stream] * self.num_stages + stage

    def _post(self, ops: list[tuple[Callable, torch.Tensor, int, int]]) -> list[dist.Work]:
        p2p = [dist.P2POp(op, t, self._peer(stage), self.group, tag) for op, t, stage, tag in ops]
        return dist.batch_isend_irecv(p2p)

    # -- metadata -----------------------------------------------------------------------------
    def knows_input(self, stage: int) -> bool:
        """Whether stage ``stage``'s input shape is known here (a receive can be posted early)."""
        return self.pp == 1 or stage in self._in_meta

    def output_meta(self, stage: int) -> tuple[tuple[int, ...], torch.dtype, bool] | None:
        """(shape, dtype, requires_grad) of what stage ``stage`` sent forward, once it has."""
        return self._out_meta.get(stage)

    def reset_shapes(self) -> None:
        """Forget the exchanged shapes; the next step exchanges them again (call on every rank)."""
        self._in_meta.clear()
        self._out_meta.clear()

    # -- forward: activations -------------------------------------------------------------------
    def send_activation(self, stage: int, microbatch: int, y: torch.Tensor) -> None:
        """Send stage ``stage``'s output ``y`` (any shape) to stage ``stage + 1``."""
        meta = (tuple(y.shape), y.dtype, y.requires_grad)
        y = y.detach().contiguous()
        known = self._out_meta.get(stage)
        if known is not None and known != meta:
            raise ValueError(
                f"stage {stage} produced an output of shape {meta[0]} and dtype {meta[1]} after "
                f"sending {known[0]}/{known[1]} earlier: call reset_shapes() on every rank when "
                "the microbatch shape changes"
            )
        self._out_meta[stage] = meta
        dst = stage + 1
        if self.pp == 1:
            self._local[("act", dst, microbatch)] = y.requires_grad_(meta[2])
            return
        ops = []
        if known is None:  # first message of this stream: its shape goes first
            header = encode_meta(*meta).to(self.device)  # NCCL sends device tensors only
            ops.append((dist.isend, header, dst, self._tag("meta", dst)))
        ops.append((dist.isend, y, dst, self._tag("act", dst)))
        record("send", y.numel() * y.element_size())
        self._sends[("act", stage, microbatch)] = (self._post(ops), [t for _, t, _, _ in ops])

    def recv_activation(self, stage: int, microbatch: int) -> PendingRecv:
        """Post the receive of stage ``stage``'s input (from stage ``stage - 1``)."""
        if self.pp == 1:
            key = ("act", stage, microbatch)
            return PendingRecv(lambda: self._local.pop(key))
        if stage in self._in_meta:
            return self._post_recv_act(stage)
        meta_buf = torch.zeros(3 + MAX_DIMS, dtype=torch.int64, device=self.device)
        works = self._post([(dist.irecv, meta_buf, stage - 1, self._tag("meta", stage))])

        def finish() -> torch.Tensor:
            for w in works:
                w.wait()
            self._in_meta[stage] = decode_meta(meta_buf)
            return self._post_recv_act(stage).wait()

        return PendingRecv(finish)

    def _post_recv_act(self, stage: int) -> PendingRecv:
        shape, dtype, requires_grad = self._in_meta[stage]
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        works = self._post([(dist.irecv, buf, stage - 1, self._tag("act", stage))])

        def finish() -> torch.Tensor:
            for w in works:
                w.wait()
            return buf.requires_grad_(requires_grad)

        return PendingRecv(finish)

    # -- backward: gradients -----------------------------------------------------------------
    def send_grad(self, stage: int, microbatch: int, dx: torch.Tensor) -> None:
        """Send the gradient of stage ``stage``'s input to stage ``stage - 1``."""
        dx = dx.detach().contiguous()
        if self.pp == 1:
            self._local[("grad", stage - 1, microbatch)] = dx
            return
        record("send", dx.numel() * dx.element_size())
        works = self._post([(dist.isend, dx, stage - 1, self._tag("grad", stage - 1))])
        self._sends[("grad", stage, microbatch)] = (works, [dx])

    def recv_grad(self, stage: int, microbatch: int) -> PendingRecv:
        """Post the receive of the gradient of stage ``stage``'s output (from ``stage + 1``)."""
        if self.pp == 1:
            key = ("grad", stage, microbatch)
            return PendingRecv(lambda: self._local.pop(key))
        shape, dtype, _ = self._out_meta[stage]
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        works = self._post([(dist.irecv, buf, stage + 1, self._tag("grad", stage))])

        def finish() -> torch.Tensor:
            for w in works:
                w.wait()
            return buf

        return PendingRecv(finish)

    # -- completion ------------------------------------------------------------------------------
    def release(self, stream: str, stage: int, microbatch: int) -> None:
        """Wait for (and free) the send of ``stream`` (``"act"`` or ``"grad"``) from stage
        ``stage`` for ``microbatch``; call it once that message is known to have arrived."""
        entry = self._sends.pop((stream, stage, microbatch), None)
        if entry is not None:
            for w in entry[0]:
                w.wait()

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
