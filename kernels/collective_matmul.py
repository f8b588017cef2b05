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
* **Backward.** ``all_gather_matmul`` saves the gathered input (as the plain path's ``F.linear``
  does), so its backward re-gathers nothing and moves exactly the plain path's bytes: the input
  gradient is a ring ``matmul_reduce_scatter`` of ``grad_out @ W``, and each step also
  accumulates that chunk's share of the weight gradient ``grad_out_c.T @ x_c``, which gives the
  ring twice the compute to hide its messages behind. ``matmul_reduce_scatter``'s backward is the
  dual: a ring all-gather of the output gradient, each arriving chunk multiplied into its rows of
  the input gradient and its share of the weight gradient. Weight-gradient chunks accumulate in
  fp32 (for 16-bit weights an fp32 buffer, rounded once at the end).

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

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels._dispatch import autocast_inputs
from triton_parallel_layers.kernels._library import NAMESPACE
from triton_parallel_layers.kernels.collectives import (
    all_gather,
    group_rank,
    group_size,
    reduce_scatter,
    send_recv,
    wait_all,
)
from triton_parallel_layers.kernels.matmul import _matmul_impl, matmul

__all__ = [
    "all_gather_matmul",
    "all_gather_matmul_ref",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_ref",
]

Group = dist.ProcessGroup | None


def _mm(x: torch.Tensor, w: torch.Tensor, *, bias=None, partial=None, out=None) -> torch.Tensor:
    """``x (M, K) @ w (N, K).T (+ bias) (+ partial) -> (M, N)`` on the dispatched path, no autograd."""
    return _matmul_impl(x, w, bias, partial, out)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weight gradients accumulate over the chunks in fp32 (or wider)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------------
# The two ring schedules
# ----------------------------------------------------------------------------------------------


def _ring_all_gather(buf: torch.Tensor, group: Group, compute: Callable[[int], None]) -> None:
    """All-gather ``buf`` chunk by chunk, calling ``compute(c)`` on each chunk as it arrives.

    ``buf``: ``(p, *chunk)`` contiguous; on entry ``buf[rank]`` holds this rank's chunk, on return
    every ``buf[c]`` holds rank ``c``'s. At step ``s`` this rank holds chunk ``c = rank - s``; it
    posts "send chunk c to the next rank, receive chunk c-1 from the previous one", runs
    ``compute(c)`` while that travels, then waits. Sends ``(p - 1)`` chunks, as a ring all-gather.
    """
    p, rank = group_size(group), group_rank(group)
    nxt, prv = (rank + 1) % p, (rank - 1) % p
    for s in range(p):
        c = (rank - s) % p
        works = None
        if s < p - 1:
            # chunk (*chunk) to rank+1 while chunk c-1 (*chunk) comes from rank-1
            works = send_recv(buf[c], nxt, buf[(c - 1) % p], prv, group, kind="all_gather")
        compute(c)
        wait_all(works)


def _ring_reduce_scatter(group: Group, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Sum over ranks of chunk ``rank`` of a result computed chunk by chunk; returns that sum.

    ``compute(c)`` returns this rank's term of chunk ``c`` as a new contiguous tensor. At step
    ``s`` this rank computes its term of chunk ``c = rank + s + 1`` while the running sum of the
    same chunk travels in from the next rank, adds that sum, and passes the result to the
    previous rank; after ``p`` steps it holds its own chunk summed over all ranks. Sends
    ``(p - 1)`` chunks, as a ring reduce-scatter.
    """
    p, rank = group_size(group), group_rank(group)
    nxt, prv = (rank + 1) % p, (rank - 1) % p
    recv = works = None
    for s in range(p):
        c = (rank + s + 1) % p  # the last step (s = p-1) computes this rank's own chunk
        part = compute(c)  # this rank's term of chunk c, computed while the sum travels
        if s > 0:
            wait_all(works)
            part += recv  # + the terms of ranks rank+1 .. rank+s, from the next rank
        if s < p - 1:
            if recv is None:
                recv = torch.empty_like(part)
            # running sum of chunk c to rank-1, running sum of chunk c+1 from rank+1
            works = send_recv(part, prv, recv, nxt, group, kind="reduce_scatter")
    return part


# ----------------------------------------------------------------------------------------------
# The two ops, forward and backward
#
# Each is a torch.library custom op (kernels/_library.py says why), so torch.compile keeps it as
# one node rather than tracing into the point-to-point ring, which Dynamo cannot capture. A custom
# op cannot take a ProcessGroup: the group travels as its name (``group.group_name``) and is
# resolved inside. They are always plain custom ops (never triton_op: they communicate), so
# their bodies run at call time and the GEMMs in them take the path use_triton picks then.
# ----------------------------------------------------------------------------------------------


def _group(group_name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(group_name)


def _gather_layout(x_shard: torch.Tensor, n_out: int, p: int, gather_dim: int):
    """``(dm_shape, rows, out_view)`` of all_gather_matmul: the shard dim-major ``(n, *rest, K)``,
    its rows, and how the ``(p, rows, N)`` output buffer is viewed back to ``(.., p*n, .., N)``."""
    dm_shape = x_shard.movedim(gather_dim, 0).shape  # (n, *rest, K)
    rows = math.prod(dm_shape[:-1])  # n * prod(rest)

    def out_view(buf: torch.Tensor) -> torch.Tensor:
        return buf.view(p * dm_shape[0], *dm_shape[1:-1], n_out).movedim(0, gather_dim)

    return dm_shape, rows, out_view


def _fake_all_gather_matmul_fwd(x_shard, weight, bias, group_name, gather_dim):
    p, (n_out, k) = dist.get_world_size(_group(group_name)), weight.shape
    _, rows, out_view = _gather_layout(x_shard, n_out, p, gather_dim)
    return out_view(x_shard.new_empty((p, rows, n_out))), x_shard.new_empty((p, rows, k))


@torch.library.custom_op(f"{NAMESPACE}::all_gather_matmul_fwd", mutates_args=())
def _all_gather_matmul_fwd_op(
    x_shard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_name: str,
    gather_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (.., p*n, .., N), gathered (p, rows, K))``: the gather overlapped with the GEMMs;
    ``gathered`` (chunk c = rank c's shard) is what the backward needs."""
    group = _group(group_name)
    p, rank = group_size(group), group_rank(group)
    n_out, k = weight.shape
    dm_shape, rows, out_view = _gather_layout(x_shard, n_out, p, gather_dim)
    with torch.autocast(x_shard.device.type, enabled=False):
        gathered = x_shard.new_empty((p, rows, k))  # (p, rows, K): chunk c = rank c's shard
        gathered[rank].view(dm_shape).copy_(x_shard.movedim(gather_dim, 0))  # the one copy
        out = x_shard.new_empty((p, rows, n_out))  # (p, rows, N): dim-major output

        def multiply(c: int) -> None:
            # (rows, K) @ (K, N) + bias -> (rows, N), written into chunk c's rows of the output
            _mm(gathered[c], weight, bias=bias, out=out[c])

        _ring_all_gather(gathered, group, multiply)
    # (p*n, *rest, N) -> the caller's order (.., p*n, .., N); a view, see the file header
    return out_view(out), gathered


def _fake_all_gather_matmul_bwd(grad_out, gathered, weight, group_name, gather_dim, needs):
    p, _, k = gathered.shape
    g_dm = grad_out.movedim(gather_dim, 0).shape  # (p*n, *rest, N)
    # grad_x: a view of a dim-major (n, *rest, K) buffer, as the op returns it
    grad_x = grad_out.new_empty((g_dm[0] // p, *g_dm[1:-1], k)).movedim(0, gather_dim)
    return (
        grad_x if needs[0] else grad_out.new_empty(0),
        weight.new_empty(weight.shape) if needs[1] else weight.new_empty(0),
        grad_out.new_empty(weight.shape[0]) if needs[2] else grad_out.new_empty(0),
    )


@torch.library.custom_op(f"{NAMESPACE}::all_gather_matmul_bwd", mutates_args=())
def _all_gather_matmul_bwd_op(
    grad_out: torch.Tensor,
    gathered: torch.Tensor,
    weight: torch.Tensor,
    group_name: str,
    gather_dim: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x_shard, grad_weight, grad_bias)``, each an empty ``(0,)`` tensor unless
    ``needs`` (three flags) asks for it. ``grad_x_shard = reduce_scatter(grad_out @ W, dim)``
    overlapped (ring), with ``grad_W = grad_out.T @ x_gathered`` accumulated chunk by chunk
    inside the same ring, and ``grad_bias = grad_out.sum(rows)``."""
    group = _group(group_name)
    dim = gather_dim
    p, rows, k = gathered.shape
    n_out = weight.shape[0]
    need_x, need_w, need_b = needs
    grad_x, grad_w, grad_b = (grad_out.new_empty(0) for _ in range(3))
    with torch.autocast(grad_out.device.type, enabled=False):
        # (.., p*n, .., N) -> (p, rows, N): chunk c = the gradient of output chunk c
        g = grad_out.movedim(dim, 0).contiguous().view(p, rows, n_out)
        acc = None
        if need_w:
            acc = torch.empty((n_out, k), dtype=_acc_dtype(weight.dtype), device=weight.device)
        if need_x:

            def multiply(c: int) -> torch.Tensor:
                if need_w:
                    # grad_W (+)= (N, rows) @ (rows, K): this chunk's share, views, no copies
                    first = c == (group_rank(group) + 1) % p
                    _mm(g[c].t(), gathered[c].t(), partial=None if first else acc, out=acc)
                # (rows, N) @ (N, K) -> (rows, K): this rank's term of grad chunk c
                return _mm(g[c], weight.t())

            part = _ring_reduce_scatter(group, multiply)  # (rows, K), summed over ranks
            g_dm = grad_out.movedim(dim, 0).shape  # (p*n, *rest, N)
            grad_x = part.view(g_dm[0] // p, *g_dm[1:-1], k).movedim(0, dim)  # (.., n, .., K)
        elif need_w:
            # (N, p*rows) @ (p*rows, K): no input gradient, so nothing to overlap with
            _mm(g.view(-1, n_out).t(), gathered.view(-1, k).t(), out=acc)
        if need_w:
            grad_w = acc.to(weight.dtype)
        if need_b:
            grad_b = g.view(-1, n_out).sum(0, dtype=torch.float32).to(grad_out.dtype)  # (N,)
    return grad_x, grad_w, grad_b


def _all_gather_matmul_setup_context(ctx, inputs, output) -> None:
    _, weight, bias, group_name, gather_dim = inputs
    ctx.save_for_backward(output[1], weight)  # gathered: the plain path's F.linear saves it too
    ctx.mark_non_differentiable(output[1])
    ctx.group_name, ctx.gather_dim, ctx.has_bias = group_name, gather_dim, bias is not None


def _all_gather_matmul_backward(ctx, grad_out, _grad_gathered):
    gathered, weight = ctx.saved_tensors
    needs = [*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = _all_gather_matmul_bwd_op(
        grad_out, gathered, weight, ctx.group_name, ctx.gather_dim, needs
    )
    return *(g if need else None for g, need in zip(grads, needs)), None, None


_all_gather_matmul_fwd_op.register_fake(_fake_all_gather_matmul_fwd)
_all_gather_matmul_fwd_op.register_autograd(
    _all_gather_matmul_backward, setup_context=_all_gather_matmul_setup_context
)
_all_gather_matmul_bwd_op.register_fake(_fake_all_gather_matmul_bwd)


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

        part = _ring_reduce_scatter(group, multiply)  # (rows, N), summed over ranks
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

        _ring_all_gather(g, group, multiply)  # chunk `rank` comes first
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
    return _all_gather_matmul_fwd_op(x_shard, weight, bias, group.group_name, dim)[0]


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
