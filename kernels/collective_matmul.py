"""Communication-overlapped matmuls: all-gather + GEMM and GEMM + reduce-scatter.

Sequence parallelism (Megatron-LM) keeps activations sharded along the sequence between the
tensor-parallel blocks, so every column-parallel layer starts with an all-gather of its input and
every row-parallel layer ends with a reduce-scatter of its output. Done plainly, the collective
and the matmul run one after the other. Done here, each is cut into ``p`` steps (``p`` = ranks)
and the matmul of the chunk that has arrived runs while the next chunk travels (Wang et al.,
"Overlap communication with dependent computation via decomposition", ASPLOS 2023; PyTorch's
async tensor parallel and ByteDance's Flux do the same with fused kernels)::

    all_gather_matmul(x_shard, W, group, gather_dim, bias) == F.linear(cat(all_gather(x_shard),
                                                                         gather_dim), W, bias)
    matmul_reduce_scatter(x, W, group, scatter_dim)         == reduce_scatter(F.linear(x, W),
                                                                              scatter_dim)

Design trade-offs
-----------------
* **A ring of point-to-point exchanges, not chunked collectives.** Splitting the all-gather into
  ``p`` smaller asynchronous all-gathers would also move the same bytes, but every piece of the
  result would still need every rank's data, each small collective pays the full ``p - 1`` hops
  of latency, and how a backend schedules its internal ring (gloo runs async collectives on a
  small thread pool, NCCL on one stream) stays invisible. A ring makes the schedule explicit and
  identical on gloo and NCCL: at step ``s`` each rank passes the chunk it just received to its
  next neighbour (all-gather), or the partial sum it just computed to its previous one
  (reduce-scatter), exactly the messages of the ring algorithms themselves, so the ledger of
  :mod:`triton_parallel_layers.kernels.collectives` counts the same bytes as the plain collectives by construction.
  Only neighbours talk, which suits rings, PCIe chains and TCP as well as NVSwitch. The cost:
  ``p - 1`` sequential hops of latency, so tiny messages are better sent plainly.
* **One exchange in flight.** Step ``s + 1``'s exchange is posted right before step ``s``'s
  matmul and waited right after it, so the two run side by side and never more than one transfer
  competes with the matmul for bandwidth (posting all at once would make every chunk arrive
  late, at the end of the shared transfer). Each exchange is one ``batch_isend_irecv`` of a send
  and a receive: NCCL then groups the pair, which is what keeps a ring of them deadlock-free.
* **Where the communication runs.** On CUDA/NCCL the sends and receives run on
  ProcessGroupNCCL's own stream, ordered after the work already queued on the compute stream
  when they are posted; ``wait()`` makes the compute stream wait and never blocks the host. On
  gloo (CPU) they progress on gloo's transport threads while the main thread multiplies. Either
  way the order "post, multiply, wait" is what overlaps them.
* **Reduce-scatter adds after the matmul.** The partial sum coming in from the next rank
  travels while this rank computes its own term of the same chunk, so the two can only be
  summed after both are done (one elementwise add per step). Summing it in the GEMM epilogue
  (``partial=``) would make the matmul wait for the message, which is what overlap avoids.
* **Dim-major chunks.** The gathered/scattered dim is moved to the front (a free view when the
  dims before it have size 1, e.g. ``gather_dim=0`` or batch 1, one copy of the shard
  otherwise), so each rank's chunk is a contiguous block of rows: it is sent without a copy and
  written by the GEMM straight into its rows of a preallocated output. The output is returned
  as a view back to the caller's dim order: with dims of size > 1 before ``gather_dim`` it is not
  contiguous (it is dense, with ``gather_dim`` outermost), and a following
  ``matmul_reduce_scatter`` along the same dim reads it without a copy. This is Megatron's
  ``(S, B, E)`` layout, kept internal so the public tensors stay batch-first.
* **Backward: save the shard, gather again.** ``all_gather_matmul`` saves its input *shard*, not
  the gathered input (``1/p`` of the activation memory, Korthikanti et al. 2022), and gathers it
  again in the backward, in the same ring pass as the input gradient: the input gradient
  ``grad_out @ W`` is reduce-scattered one way round the ring while the shards travel the other
  way, and each arriving shard ``x_c`` adds its share ``grad_out_c.T @ x_c`` to the weight
  gradient while this rank computes its term of the next input-gradient chunk, so each step has
  two GEMMs to hide two messages behind. The price is the all-gather's bytes once more in the
  backward, as in Megatron-LM. ``matmul_reduce_scatter``'s backward is the dual: a ring
  all-gather of the output gradient, each arriving chunk multiplied into its rows of the input
  gradient and its share of the weight gradient. Weight-gradient chunks accumulate in fp32 (for
  16-bit weights an fp32 buffer, rounded once at the end).
* **The plain variants** (:data:`ALL_GATHER`, :data:`ALLREDUCE_DGRAD`), what the layers use
  without ``overlap_comm``: one collective forward, then one GEMM; Megatron-LM's backward, where
  the collective launched asynchronously runs while a GEMM that does not need it runs (the
  gather of the saved shard under ``grad_out @ W``, then the reduce-scatter or all-reduce of the
  input gradient under the weight-gradient GEMM). Each of the three is a :class:`LinearComm`:
  a forward op and a backward op whose ``needs`` flags compute the input and weight gradients
  separately, which is how zero-bubble schedules defer the weight gradient
  (:mod:`triton_parallel_layers.parallel_layers.weight_grad`).

Shapes, with ``p`` ranks, ``n`` rows per rank along the gathered/scattered dim, ``K`` input and
``N`` output features: ``all_gather_matmul`` maps ``x_shard (.., n, .., K)`` and ``W (N, K)`` to
``(.., p*n, .., N)``; ``matmul_reduce_scatter`` maps ``x (.., p*n, .., K)`` to ``(.., n, .., N)``.
``group=None`` or a group of one rank: a plain :func:`triton_parallel_layers.kernels.matmul.matmul`, no communication.
The matmuls run on the Triton kernel of :mod:`triton_parallel_layers.kernels.matmul` or its torch reference, as
:mod:`triton_parallel_layers.kernels._dispatch` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from triton_parallel_layers.kernels._dispatch import autocast_inputs
from triton_parallel_layers.kernels._library import NAMESPACE
from triton_parallel_layers.kernels.collectives import (
    _all_gather_base,
    _reduce_scatter_base,
    all_gather,
    group_rank,
    group_size,
    record,
    reduce_scatter,
    send_recv,
    wait_all,
)
from triton_parallel_layers.kernels.matmul import _matmul_into, matmul

__all__ = [
    "ALLREDUCE_DGRAD",
    "ALL_GATHER",
    "ALL_GATHER_RING",
    "LinearComm",
    "all_gather_matmul",
    "all_gather_matmul_ref",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_ref",
]

Group = dist.ProcessGroup | None


def _mm(x: torch.Tensor, w: torch.Tensor, *, bias=None, partial=None, out=None) -> torch.Tensor:
    """``x (M, K) @ w (N, K).T (+ bias) (+ partial) -> (M, N)`` on the dispatched path, no autograd."""
    return _matmul_into(x, w, bias, partial, out)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weight gradients accumulate over the chunks in fp32 (or wider)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------------
# The two ring schedules
# ----------------------------------------------------------------------------------------------


def _ring(
    group: Group,
    *,
    gather: torch.Tensor | None = None,
    on_chunk: Callable[[int], None] | None = None,
    reduce: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """One ring pass of ``p`` steps: an all-gather, a reduce-scatter, or both at once (their
    messages travel in opposite directions, each step's pair posted before its matmuls).

    All-gather: ``gather`` is ``(p, *chunk)`` contiguous; on entry ``gather[rank]`` holds this
    rank's chunk, on return every ``gather[c]`` holds rank ``c``'s. At step ``s`` this rank holds
    chunk ``c = rank - s``; it posts "send chunk c to the next rank, receive chunk c-1 from the
    previous one", runs ``on_chunk(c)`` while that travels, and waits at the end of the step.

    Reduce-scatter: ``reduce(c)`` returns this rank's term of chunk ``c`` as a new contiguous
    tensor. At step ``s`` this rank computes its term of chunk ``c = rank + s + 1`` while the running
    sum of the same chunk travels in from the next rank, adds that sum, and passes the result to
    the previous rank; after ``p`` steps it holds (and this returns) its own chunk summed over all
    ranks.

    Each sends ``(p - 1)`` chunks, as the ring collectives do.
    """
    p, rank = group_size(group), group_rank(group)
    nxt, prv = (rank + 1) % p, (rank - 1) % p
    part = recv = rs_works = None
    for s in range(p):
        ag_works = None
        if gather is not None:
            c = (rank - s) % p
            if s < p - 1:
                # chunk c (*chunk) to rank+1 while chunk c-1 (*chunk) comes from rank-1
                ag_works = send_recv(
                    gather[c], nxt, gather[(c - 1) % p], prv, group, kind="all_gather"
                )
            on_chunk(c)
        if reduce is not None:
            c = (rank + s + 1) % p  # the last step (s = p-1) computes this rank's own chunk
            part = reduce(c)  # this rank's term of chunk c, computed while the sum travels
            if s > 0:
                wait_all(rs_works)
                part += recv  # + the terms of ranks rank+1 .. rank+s, from the next rank
            if s < p - 1:
                if recv is None:
                    recv = torch.empty_like(part)
                # running sum of chunk c to rank-1, running sum of chunk c+1 from rank+1
                rs_works = send_recv(part, prv, recv, nxt, group, kind="reduce_scatter")
        wait_all(ag_works)
    return part


# ----------------------------------------------------------------------------------------------
# The ops, forward and backward: the two rings, and the column layer's plain variants
#
# Each is a torch.library custom op (kernels/_library.py says why), so torch.compile keeps it as
# one node rather than tracing into the point-to-point ring or the asynchronous collectives,
# which Dynamo cannot capture. A custom op cannot take a ProcessGroup: the group travels as its
# name (``group.group_name``) and is resolved inside. They are always plain custom ops (never
# triton_op: they communicate), so their bodies run at call time and the ring's GEMMs take the
# path use_triton picks then (the plain variants use torch's GEMMs, as F.linear would).
# ----------------------------------------------------------------------------------------------


def _group(group_name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(group_name)


def _gather_layout(x_shard: torch.Tensor, n_out: int, p: int, gather_dim: int):
    """``(dm_shape, rows, out_view)`` of a gather along ``gather_dim``: the shard dim-major
    ``(n, *rest, K)``, its rows, and how a ``(p, rows, N)`` output buffer is viewed back to
    ``(.., p*n, .., N)``."""
    dm_shape = x_shard.movedim(gather_dim, 0).shape  # (n, *rest, K)
    rows = math.prod(dm_shape[:-1])  # n * prod(rest)

    def out_view(buf: torch.Tensor) -> torch.Tensor:
        return buf.view(p * dm_shape[0], *dm_shape[1:-1], n_out).movedim(0, gather_dim)

    return dm_shape, rows, out_view


def _grad_rows(grad_out: torch.Tensor, gather_dim: int, p: int, rows: int) -> torch.Tensor:
    """The output gradient ``(.., p*n, .., N)`` as dim-major chunks ``(p, rows, N)``: chunk ``c``
    is the gradient of output chunk ``c`` (a view when it already is dim-major, else one copy)."""
    return grad_out.movedim(gather_dim, 0).contiguous().view(p, rows, grad_out.shape[-1])


def _ring_buffer(x_shard: torch.Tensor, gather_dim: int, p: int, rank: int) -> torch.Tensor:
    """``(p, rows, K)`` for a ring all-gather, with this rank's shard (dim-major) in chunk ``rank``
    (the one copy) and the other chunks still to arrive."""
    dm = x_shard.movedim(gather_dim, 0)  # (n, *rest, K)
    buf = x_shard.new_empty((p, dm.numel() // dm.shape[-1], dm.shape[-1]))
    buf[rank].view(dm.shape).copy_(dm)
    return buf


def _fake_gather_fwd(x_shard, weight, bias, group_name, gather_dim):
    p, n_out = dist.get_world_size(_group(group_name)), weight.shape[0]
    _, rows, out_view = _gather_layout(x_shard, n_out, p, gather_dim)
    return out_view(x_shard.new_empty((p, rows, n_out)))


def _fake_gather_bwd(grad_out, x_shard, weight, group_name, gather_dim, needs):
    # grad_x: a view of a dim-major (n, *rest, K) buffer, as the ops return it
    grad_x = x_shard.new_empty(x_shard.movedim(gather_dim, 0).shape).movedim(0, gather_dim)
    return _needed((grad_x, weight.new_empty(weight.shape), grad_out.new_empty(weight.shape[0])),
                   needs, grad_out)  # fmt: skip


def _needed(grads: tuple, needs: list[bool], like: torch.Tensor) -> tuple:
    """``grads`` with an empty ``(0,)`` tensor where ``needs`` says no (a custom op cannot return
    ``None``)."""
    return tuple(g if need else like.new_empty(0) for g, need in zip(grads, needs))


@torch.library.custom_op(f"{NAMESPACE}::all_gather_matmul_fwd", mutates_args=())
def _all_gather_matmul_fwd_op(
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_name: str,
    gather_dim: int,
) -> torch.Tensor:
    """``F.linear(cat(all_gather(x_shard), gather_dim), weight, bias)`` ``(.., p*n, .., N)``, the
    gather overlapped with the GEMMs (ring)."""
    group = _group(group_name)
    p, rank = group_size(group), group_rank(group)
    n_out = weight.shape[0]
    _, rows, out_view = _gather_layout(x_shard, n_out, p, gather_dim)
    with torch.autocast(x_shard.device.type, enabled=False):
        gathered = _ring_buffer(x_shard, gather_dim, p, rank)  # (p, rows, K): chunk c = rank c's
        out = x_shard.new_empty((p, rows, n_out))  # (p, rows, N): dim-major output

        def multiply(c: int) -> None:
            # (rows, K) @ (K, N) + bias -> (rows, N), written into chunk c's rows of the output
            _mm(gathered[c], weight, bias=bias, out=out[c])

        _ring(group, gather=gathered, on_chunk=multiply)
    # (p*n, *rest, N) -> the caller's order (.., p*n, .., N); a view, see the file header
    return out_view(out)


@torch.library.custom_op(f"{NAMESPACE}::all_gather_matmul_bwd", mutates_args=())
def _all_gather_matmul_bwd_op(
    grad_out: torch.Tensor,
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    gather_dim: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x_shard, grad_weight, grad_bias)``, each an empty ``(0,)`` tensor unless ``needs``
    (three flags) asks for it, in one ring pass: ``grad_x_shard = reduce_scatter(grad_out @ W)``
    travels one way while the input shards are gathered again the other way, each arriving
    chunk adding its share ``grad_out_c.T @ x_c`` to ``grad_W`` while this rank's term of the
    next ``grad_x`` chunk is computed; ``grad_bias = grad_out.sum(rows)``."""
    group = _group(group_name)
    p, rank = group_size(group), group_rank(group)
    n_out, k = weight.shape
    dm_shape, rows, _ = _gather_layout(x_shard, n_out, p, gather_dim)
    need_x, need_w, need_b = needs
    grad_x = grad_w = grad_b = None
    with torch.autocast(grad_out.device.type, enabled=False):
        g = _grad_rows(grad_out, gather_dim, p, rows)  # (p, rows, N)
        gathered = acc = None
        if need_w:
            gathered = _ring_buffer(x_shard, gather_dim, p, rank)  # (p, rows, K), chunk rank set
            acc = torch.empty((n_out, k), dtype=_acc_dtype(weight.dtype), device=weight.device)

        def accumulate(c: int) -> None:
            # grad_W (+)= (N, rows) @ (rows, K): this chunk's share, views, no copies
            _mm(g[c].t(), gathered[c].t(), partial=None if c == rank else acc, out=acc)

        def multiply(c: int) -> torch.Tensor:
            return _mm(g[c], weight.t())  # (rows, N) @ (N, K) -> (rows, K): rank's term of chunk c

        part = _ring(
            group,
            gather=gathered,
            on_chunk=accumulate if need_w else None,
            reduce=multiply if need_x else None,
        )
        if need_x:
            grad_x = part.view(dm_shape).movedim(0, gather_dim)  # (.., n, .., K), summed
        if need_w:
            grad_w = acc.to(weight.dtype)
        if need_b:
            grad_b = g.view(-1, n_out).sum(0, dtype=torch.float32).to(grad_out.dtype)  # (N,)
    return _needed((grad_x, grad_w, grad_b), needs, grad_out)


@torch.library.custom_op(f"{NAMESPACE}::all_gather_linear_fwd", mutates_args=())
def _all_gather_linear_fwd_op(
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_name: str,
    gather_dim: int,
) -> torch.Tensor:
    """``F.linear(cat(all_gather(x_shard), gather_dim), weight, bias)`` ``(.., p*n, .., N)``: one
    plain all-gather, then one GEMM."""
    group = _group(group_name)
    p, n_out = group_size(group), weight.shape[0]
    _, rows, out_view = _gather_layout(x_shard, n_out, p, gather_dim)
    with torch.autocast(x_shard.device.type, enabled=False):
        gathered, work = _all_gather_rows(x_shard, gather_dim, group)  # (p*rows, K)
        wait_all([work])
        out = F.linear(gathered, weight, bias)  # (p*rows, K) @ (K, N) -> (p*rows, N)
    return out_view(out.view(p, rows, n_out))  # dim-major, viewed back as the ring's output


@torch.library.custom_op(f"{NAMESPACE}::all_gather_linear_bwd", mutates_args=())
def _all_gather_linear_bwd_op(
    grad_out: torch.Tensor,
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    gather_dim: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`_all_gather_linear_fwd_op` from the saved input *shard*
    (Megatron-LM's sequence-parallel backward): the all-gather of the input travels while
    ``grad_out @ W`` runs, then the reduce-scatter of that input gradient travels while the
    weight-gradient GEMM runs. Returns ``(grad_x_shard, grad_weight, grad_bias)``, each an empty
    ``(0,)`` tensor unless ``needs`` asks for it."""
    group = _group(group_name)
    p, (n_out, k) = group_size(group), weight.shape
    dm_shape, rows, _ = _gather_layout(x_shard, n_out, p, gather_dim)
    need_x, need_w, need_b = needs
    grad_x = grad_w = grad_b = None
    with torch.autocast(grad_out.device.type, enabled=False):
        g = _grad_rows(grad_out, gather_dim, p, rows).view(p * rows, n_out)
        gathered = gather = scatter = None
        if need_w:
            gathered, gather = _all_gather_rows(x_shard, gather_dim, group)  # (p*rows, K)
        if need_x:
            grad_full = g.mm(weight)  # (p*rows, N) @ (N, K) -> (p*rows, K), while x travels
            wait_all([gather] if gather else None)  # one collective in flight at a time
            gather = None
            grad_x = grad_full.new_empty((rows, k))
            record("reduce_scatter", grad_full, p)
            scatter = _reduce_scatter_base(grad_x, grad_full, group=group, async_op=True)
        wait_all([gather] if gather else None)
        if need_w:
            grad_w = g.t().mm(gathered)  # (N, p*rows) @ (p*rows, K), while grad_x travels
        if need_b:
            grad_b = g.sum(0, dtype=torch.float32).to(grad_out.dtype)  # (N,)
        wait_all([scatter] if scatter else None)
        if need_x:
            grad_x = grad_x.view(dm_shape).movedim(0, gather_dim)  # (.., n, .., K)
    return _needed((grad_x, grad_w, grad_b), needs, grad_out)


def _all_gather_rows(x_shard: torch.Tensor, gather_dim: int, group: Group):
    """Post the all-gather of this rank's shard as dim-major rows: ``(gathered (p*rows, K), work)``
    (chunk ``c`` of the rows is rank ``c``'s shard; valid once ``work`` is waited on)."""
    shard = x_shard.movedim(gather_dim, 0).reshape(-1, x_shard.shape[-1])  # (rows, K): view or copy
    p = group_size(group)
    gathered = shard.new_empty((p * shard.shape[0], shard.shape[1]))
    record("all_gather", shard, p)
    return gathered, _all_gather_base(gathered, shard, group=group, async_op=True)


def _fake_allreduce_dgrad_fwd(x, weight, bias, group_name):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fake_allreduce_dgrad_bwd(grad_out, x, weight, group_name, needs):
    grads = (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        grad_out.new_empty(weight.shape[0]),
    )
    return _needed(grads, needs, grad_out)


@torch.library.custom_op(f"{NAMESPACE}::linear_allreduce_dgrad_fwd", mutates_args=())
def _linear_allreduce_dgrad_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_name: str
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` ``(*, N)`` on a replicated input ``x (*, K)``; its backward
    all-reduces the input gradient over the group."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, weight, bias)


@torch.library.custom_op(f"{NAMESPACE}::linear_allreduce_dgrad_bwd", mutates_args=())
def _linear_allreduce_dgrad_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` (each ``(0,)`` unless ``needs`` asks for it), with
    ``grad_x = all_reduce(grad_out @ W)`` in flight while the weight-gradient GEMM runs
    (Megatron-LM's asynchronous input-gradient all-reduce)."""
    group = _group(group_name)
    p, (n_out, k) = group_size(group), weight.shape
    need_x, need_w, need_b = needs
    grad_x = grad_w = grad_b = work = None
    with torch.autocast(grad_out.device.type, enabled=False):
        g = grad_out.reshape(-1, n_out)  # (M, N)
        if need_x:
            grad_x = g.mm(weight)  # (M, N) @ (N, K) -> (M, K), summed over ranks in place:
            record("all_reduce", grad_x, p)
            work = dist.all_reduce(grad_x, group=group, async_op=True)
        if need_w:
            grad_w = g.t().mm(x.reshape(-1, k))  # (N, M) @ (M, K), while grad_x travels
        if need_b:
            grad_b = g.sum(0, dtype=torch.float32).to(grad_out.dtype)  # (N,)
        wait_all([work] if work else None)
        if need_x:
            grad_x = grad_x.view(x.shape)
    return _needed((grad_x, grad_w, grad_b), needs, grad_out)


class LinearComm(NamedTuple):
    """A linear layer that communicates, as two custom ops (what
    :mod:`triton_parallel_layers.parallel_layers.weight_grad` needs to defer its weight gradient):

    * ``forward(x, weight, bias, *args) -> out``, differentiable: its backward computes every
      gradient at once, overlapping its communication with the GEMMs;
    * ``backward(grad_out, x, weight, *args, needs) -> (grad_x, grad_weight, grad_bias)``, each an
      empty ``(0,)`` tensor unless ``needs`` (three flags) asks for it, so the input gradient and
      the weight gradients can be computed at different times.

    ``x`` is what the forward saves: for the gathers, the input *shard*, gathered again in the
    backward (Megatron-LM's sequence parallelism), not the gathered input. ``args``: the group's
    name, and for the gathers the gather dim.
    """

    forward: Callable[..., torch.Tensor]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _linear_comm(fwd_op, bwd_op, fake_fwd, fake_bwd) -> LinearComm:
    """Register the fakes and the autograd of a ``fwd_op``/``bwd_op`` pair."""

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, *args = inputs
        ctx.save_for_backward(x, weight)  # x: the input shard, for the gathers
        ctx.args, ctx.has_bias = tuple(args), bias is not None

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        needs = [*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = bwd_op(grad_out, x, weight, *ctx.args, needs)
        return *(g if need else None for g, need in zip(grads, needs)), *(None for _ in ctx.args)

    fwd_op.register_fake(fake_fwd)
    fwd_op.register_autograd(backward, setup_context=setup_context)
    bwd_op.register_fake(fake_bwd)
    return LinearComm(fwd_op, bwd_op)


ALL_GATHER_RING = _linear_comm(
    _all_gather_matmul_fwd_op, _all_gather_matmul_bwd_op, _fake_gather_fwd, _fake_gather_bwd
)
"""Sequence-parallel column linear, overlapped (:func:`all_gather_matmul`); args: group name,
gather dim."""
ALL_GATHER = _linear_comm(
    _all_gather_linear_fwd_op, _all_gather_linear_bwd_op, _fake_gather_fwd, _fake_gather_bwd
)
"""Sequence-parallel column linear, plain all-gather forward, Megatron's overlapped backward;
args: group name, gather dim."""
ALLREDUCE_DGRAD = _linear_comm(
    _linear_allreduce_dgrad_fwd_op,
    _linear_allreduce_dgrad_bwd_op,
    _fake_allreduce_dgrad_fwd,
    _fake_allreduce_dgrad_bwd,
)
"""Column linear on a replicated input: input gradient all-reduced, overlapped with the weight
gradient; args: group name."""


def _fake_matmul_reduce_scatter_fwd(x, weight, group_name, scatter_dim):
    p = dist.get_world_size(_group(group_name))
    x_dm = x.movedim(scatter_dim, 0).shape  # (p*n, *rest, K)
    # a view of a dim-major (n, *rest, N) buffer, as the op returns it
    return x.new_empty((x_dm[0] // p, *x_dm[1:-1], weight.shape[0])).movedim(0, scatter_dim)


@torch.library.custom_op(f"{NAMESPACE}::matmul_reduce_scatter_fwd", mutates_args=())
def _matmul_reduce_scatter_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, group_name: str, scatter_dim: int
) -> torch.Tensor:
    """``reduce_scatter(F.linear(x, W), dim)`` ``(.., n, .., N)``, the reduce-scatter overlapped."""
    group = _group(group_name)
    p = group_size(group)
    n_out, k = weight.shape
    with torch.autocast(x.device.type, enabled=False):
        x_dm = x.movedim(scatter_dim, 0).contiguous()  # (p*n, *rest, K)
        n = x_dm.shape[0] // p
        rows = n * math.prod(x_dm.shape[1:-1])
        x3 = x_dm.view(p, rows, k)  # (p, rows, K): chunk c = the rows rank c keeps

        def multiply(c: int) -> torch.Tensor:
            return _mm(x3[c], weight)  # (rows, K) @ (K, N) -> (rows, N): this rank's term

        part = _ring(group, reduce=multiply)  # (rows, N), summed over ranks
    return part.view(n, *x_dm.shape[1:-1], n_out).movedim(0, scatter_dim)  # (.., n, .., N)


def _fake_matmul_reduce_scatter_bwd(grad_out, x, weight, group_name, scatter_dim, needs):
    grad_x = x.new_empty(x.movedim(scatter_dim, 0).shape).movedim(0, scatter_dim)
    return (
        grad_x if needs[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if needs[1] else weight.new_empty(0),
    )


@torch.library.custom_op(f"{NAMESPACE}::matmul_reduce_scatter_bwd", mutates_args=())
def _matmul_reduce_scatter_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    scatter_dim: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` (each ``(0,)`` unless ``needs`` asks for it): ``grad_out``
    all-gathered along ``dim`` chunk by chunk (ring), each chunk multiplied as it arrives into
    ``grad_x = G @ W`` (its rows) and ``grad_W = G.T @ x`` (its share, accumulated)."""
    group = _group(group_name)
    dim = scatter_dim
    p, rank = group_size(group), group_rank(group)
    n_out, k = weight.shape
    need_x, need_w = needs
    grad_x = grad_w = x.new_empty(0)
    with torch.autocast(grad_out.device.type, enabled=False):
        x_dm = x.movedim(dim, 0).contiguous()  # (p*n, *rest, K): the forward's dim-major copy
        rows = x_dm.shape[0] // p * math.prod(x_dm.shape[1:-1])
        x3 = x_dm.view(p, rows, k)
        g_own = grad_out.movedim(dim, 0)  # (n, *rest, N), a view
        g = grad_out.new_empty((p, rows, n_out))  # (p, rows, N): the gathered output gradient
        g[rank].view(g_own.shape).copy_(g_own)
        grad_x3 = x3.new_empty((p, rows, k)) if need_x else None
        acc = None
        if need_w:
            acc = torch.empty((n_out, k), dtype=_acc_dtype(weight.dtype), device=weight.device)

        def multiply(c: int) -> None:
            if need_x:
                # (rows, N) @ (N, K) -> (rows, K), into chunk c's rows of grad_x
                _mm(g[c], weight.t(), out=grad_x3[c])
            if need_w:
                # grad_W (+)= (N, rows) @ (rows, K): this chunk's share
                _mm(g[c].t(), x3[c].t(), partial=None if c == rank else acc, out=acc)

        _ring(group, gather=g, on_chunk=multiply)  # chunk `rank` comes first
        if need_x:
            grad_x = grad_x3.view(x_dm.shape).movedim(0, dim)
        if need_w:
            grad_w = acc.to(weight.dtype)
    return grad_x, grad_w


def _matmul_reduce_scatter_setup_context(ctx, inputs, output) -> None:
    x, weight, group_name, scatter_dim = inputs
    # x itself, not the forward's dim-major copy (a custom op's outputs may not alias its
    # inputs, and that copy is x itself when scatter_dim leads): the backward redoes the copy.
    ctx.save_for_backward(x, weight)
    ctx.group_name, ctx.scatter_dim = group_name, scatter_dim


def _matmul_reduce_scatter_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    grads = _matmul_reduce_scatter_bwd_op(
        grad_out, x, weight, ctx.group_name, ctx.scatter_dim, needs
    )
    return *(g if need else None for g, need in zip(grads, needs)), None, None


_matmul_reduce_scatter_fwd_op.register_fake(_fake_matmul_reduce_scatter_fwd)
_matmul_reduce_scatter_fwd_op.register_autograd(
    _matmul_reduce_scatter_backward, setup_context=_matmul_reduce_scatter_setup_context
)
_matmul_reduce_scatter_bwd_op.register_fake(_fake_matmul_reduce_scatter_bwd)


# ----------------------------------------------------------------------------------------------
# Checks, functional API, references
# ----------------------------------------------------------------------------------------------


def _check_args(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dim: int,
    dim_name: str,
) -> int:
    """Validate from local shapes and dtypes only (every rank decides alike); return ``dim >= 0``."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    if x.dim() < 2:
        raise ValueError(
            f"{op}: x of shape {tuple(x.shape)} needs at least 2 dims (.., rows, K): one to "
            f"{dim_name.split('_')[0]} along and the features"
        )
    d = dim + x.dim() if -x.dim() <= dim < 0 else dim
    if not 0 <= d < x.dim() - 1:
        raise ValueError(
            f"{op}: {dim_name}={dim} for x of shape {tuple(x.shape)}: expected a dim in "
            f"[{-x.dim()}, {x.dim() - 1}) other than the last (feature) dim"
        )
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight of shape {tuple(weight.shape)} does not match x of shape "
            f"{tuple(x.shape)}: expected weight (N, {x.shape[-1]})"
        )
    if not x.dtype.is_floating_point or weight.dtype != x.dtype:
        raise TypeError(
            f"{op}: x.dtype={x.dtype}, weight.dtype={weight.dtype}: expected one floating dtype"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(
            f"{op}: bias of shape {tuple(bias.shape)} and dtype {bias.dtype}: expected "
            f"({weight.shape[0]},) {x.dtype}"
        )
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on several devices {sorted(map(str, devices))}")
    return d


def all_gather_matmul(
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    group: Group,
    *,
    gather_dim: int = 0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(cat(all_gather(x_shard), dim=gather_dim), weight, bias)``, gather overlapped.

    Args:
        x_shard: ``(.., n, .., K)``, this rank's chunk along ``gather_dim`` (any dim but the last).
        weight: ``(N, K)``.
        group: the process group; ``None`` or one rank: a plain matmul, no communication.
        gather_dim: the dim the shards are concatenated along.
        bias: ``(N,)`` or ``None``, added in the GEMM epilogue.

    Returns:
        ``(.., p*n, .., N)``. Not contiguous when dims before ``gather_dim`` have size > 1 (see the
        file header). Differentiable in ``x_shard``, ``weight`` and ``bias``.

    Raises:
        ValueError, TypeError: on mismatched shapes, dims or dtypes, before any communication.
    """
    x_shard, weight, bias = autocast_inputs(x_shard, weight, bias)
    dim = _check_args("all_gather_matmul", x_shard, weight, bias, gather_dim, "gather_dim")
    if group_size(group) == 1:
        return matmul(x_shard, weight, bias)
    return _all_gather_matmul_fwd_op(x_shard, weight, bias, group.group_name, dim)


def matmul_reduce_scatter(
    x: torch.Tensor, weight: torch.Tensor, group: Group, *, scatter_dim: int = 0
) -> torch.Tensor:
    """Reduce-scatter (sum) of ``F.linear(x, weight)`` along ``scatter_dim``, overlapped.

    Args:
        x: ``(.., p*n, .., K)``, this rank's term (e.g. its slice of the input features).
        weight: ``(N, K)``.
        group: the process group; ``None`` or one rank: a plain matmul, no communication.
        scatter_dim: the dim split over the ranks (any but the last); its size must divide by p.

    Returns:
        ``(.., n, .., N)``: the sum over ranks of chunk ``rank`` of ``x @ weight.T``. Not
        contiguous when dims before ``scatter_dim`` have size > 1. Differentiable in ``x`` and
        ``weight``.

    Raises:
        ValueError, TypeError: on mismatched shapes, dims or dtypes, or a ``scatter_dim`` size not
        divisible by the group size, before any communication.
    """
    op = "matmul_reduce_scatter"
    x, weight = autocast_inputs(x, weight)
    dim = _check_args(op, x, weight, None, scatter_dim, "scatter_dim")
    p = group_size(group)
    if x.shape[dim] % p:
        raise ValueError(
            f"{op}: size {x.shape[dim]} along scatter_dim={scatter_dim} (x of shape "
            f"{tuple(x.shape)}) is not divisible by the group size {p}"
        )
    if p == 1:
        return matmul(x, weight)
    return _matmul_reduce_scatter_fwd_op(x, weight, group.group_name, dim)


def all_gather_matmul_ref(
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    group: Group,
    *,
    gather_dim: int = 0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused definition: a plain all-gather, then ``F.linear`` (not differentiable)."""
    return torch.nn.functional.linear(all_gather(x_shard, group, gather_dim), weight, bias)


def matmul_reduce_scatter_ref(
    x: torch.Tensor, weight: torch.Tensor, group: Group, *, scatter_dim: int = 0
) -> torch.Tensor:
    """The unfused definition: ``F.linear``, then a plain reduce-scatter (not differentiable)."""
    return reduce_scatter(torch.nn.functional.linear(x, weight), group, scatter_dim)
