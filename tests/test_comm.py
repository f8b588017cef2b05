"""The autograd collectives: each forward is what it says, each backward is its dual; under
autocast they move the compute dtype; the all-reduce works in place and the batch-first
all-gather and reduce-scatter make at most one layout copy."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_close, chunk
from triton_parallel_layers.kernels.collectives import (
    _reduce_scatter_base,
    all_gather,
    record_comm,
    reduce_scatter,
)
from triton_parallel_layers.parallel_layers import comm


def _full(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _duality_case():
    """For y = f(x), check y and dL/dx for L = <y, w> against the math on whole tensors."""
    p, r = dist.get_world_size(), dist.get_rank()
    g = dist.group.WORLD
    # Per-rank different inputs: rank r holds x_r = base + r.
    base = _full((2, 4 * p, 3), 0)
    x_r = base + r
    x_sum = sum(base + q for q in range(p))
    w = _full((2, 4 * p, 3), 1)  # the same upstream gradient on every rank

    def run(fn, x, upstream):
        x = x.clone().requires_grad_()
        y = fn(x)
        y.backward(upstream)
        return y.detach(), x.grad

    # copy: identity forward; backward sums the upstream gradients of all ranks.
    y, dx = run(lambda x: comm.copy_to_tp(x, g), x_r, w + r)
    assert_close(y, x_r, exact=True, what="copy fwd")
    assert_close(dx, sum(w + q for q in range(p)), what="copy bwd")
    # reduce: all-reduce forward; identity backward.
    y, dx = run(lambda x: comm.reduce_from_tp(x, g), x_r, w)
    assert_close(y, x_sum, what="reduce fwd")
    assert_close(dx, w, exact=True, what="reduce bwd")
    # scatter: keep my chunk of a replicated tensor; backward concatenates every rank's gradient.
    for dim in (-1, 1):
        full = _full((2, 4 * p, 3 * p), 4)
        ups = [_full(chunk(full, dim).shape, 10 + q) for q in range(p)]
        y, dx = run(lambda x, d=dim: comm.scatter_to_tp(x, g, d), full, ups[r])
        assert_close(y, chunk(full, dim), exact=True, what=f"scatter fwd dim {dim}")
        assert_close(dx, torch.cat(ups, dim), exact=True, what=f"scatter bwd dim {dim}")
    # gather along dim 1: concatenation in rank order; backward keeps my chunk of the gradient.
    y, dx = run(lambda x: comm.gather_from_tp(x, g, 1), x_r, _full((2, 4 * p * p, 3), 2))
    assert_close(y, torch.cat([base + q for q in range(p)], 1), exact=True, what="gather fwd")
    assert_close(dx, chunk(_full((2, 4 * p * p, 3), 2), 1), exact=True, what="gather bwd")
    # sequence-parallel gather: backward reduce-scatters (sums every rank's gradient, keeps mine).
    up = _full((2, 4 * p * p, 3), 3)
    y, dx = run(lambda x: comm.gather_from_sequence_parallel(x, g, dim=1), x_r, up + r)
    assert_close(y, torch.cat([base + q for q in range(p)], 1), exact=True, what="sp gather fwd")
    assert_close(dx, chunk(sum(up + q for q in range(p)), 1), what="sp gather bwd")
    # reduce-scatter: sums over ranks, keeps my chunk; backward all-gathers the gradient.
    ups = [_full((2, 4, 3), 20 + q) for q in range(p)]
    y, dx = run(lambda x: comm.reduce_scatter_to_sequence_parallel(x, g, dim=1), x_r, ups[r])
    assert_close(y, chunk(x_sum, 1), what="reduce-scatter fwd")
    assert_close(dx, torch.cat(ups, 1), exact=True, what="reduce-scatter bwd")


@pytest.mark.parametrize("world_size", [2, 4])
def test_forward_and_backward_are_duals(dist_run, world_size):
    dist_run(world_size, _duality_case)


def test_group_of_one_returns_input_untouched():
    x = torch.randn(3, 4, requires_grad=True)
    for fn in (comm.copy_to_tp, comm.reduce_from_tp):
        assert fn(x, None) is x
    for fn in (
        comm.scatter_to_tp,
        comm.gather_from_tp,
        comm.gather_from_sequence_parallel,
        comm.reduce_scatter_to_sequence_parallel,
    ):
        assert fn(x, None, 0) is x
    with record_comm() as ledger:
        comm.reduce_from_tp(x, None)
    assert ledger.total_bytes == 0


def _ledger_case():
    p = dist.get_world_size()
    x = torch.ones(4 * p, 8)  # 32p floats = 128p bytes
    with record_comm() as ledger:
        comm.reduce_from_tp(x, dist.group.WORLD)
        comm.gather_from_tp(x, dist.group.WORLD, 0)
        comm.reduce_scatter_to_sequence_parallel(x, dist.group.WORLD, 0)
    n = x.numel() * 4
    assert ledger.bytes_sent == {
        "all_reduce": round(2 * (p - 1) / p * n),
        "all_gather": (p - 1) * n,
        "reduce_scatter": round((p - 1) / p * n),
    }, ledger
    assert ledger.calls == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1}


@pytest.mark.parametrize("world_size", [2, 4])
def test_ledger_counts_ring_bytes(dist_run, world_size):
    dist_run(world_size, _ledger_case)


class _CountCopies(TorchDispatchMode):
    """Counts the ops that copy a tensor's elements (clone, copy_, a dtype cast)."""

    COPIES = ("aten.clone", "aten.copy_", "aten._to_copy")

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in (c.replace("aten.", "") for c in self.COPIES) or any(
            str(func).startswith(c) for c in self.COPIES
        ):
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


def _copies(fn, *args) -> tuple[torch.Tensor, list[str]]:
    with _CountCopies() as mode:
        out = fn(*args)
    return out, mode.copies


def _dtype_and_copies_case() -> dict:
    p, g = dist.get_world_size(), dist.group.WORLD
    found = {}
    # gloo's own reduce-scatter copies inside the backend (NCCL's does not): not ours, not counted
    _, backend = _copies(_reduce_scatter_base, torch.empty(5), torch.ones(5 * p))
    # all-gather and reduce-scatter of the sequence dim of (B, S, E): one copy at B > 1, none at
    # B = 1 or along dim 0 (the rank-major buffer is the result)
    for b in (1, 3):
        x = _full((b, 5, 7), b)
        y, found[f"gather b={b}"] = _copies(all_gather, x, g, 1)
        assert_close(y, torch.cat([x] * p, 1), exact=True, what="gather")
        z, found[f"scatter b={b}"] = _copies(reduce_scatter, torch.cat([x] * p, 1), g, 1)
        assert_close(z, p * x, exact=True, what="reduce-scatter")
    _, found["gather dim 0"] = _copies(all_gather, _full((5, 7), 0), g, 0)
    _, found["scatter dim 0"] = _copies(reduce_scatter, _full((5 * p, 7), 0), g, 0)
    # reduce_from_tp sums a partial result in place
    w = _full((4, 6), 1).requires_grad_()
    partial = w * 2.0  # an intermediate that only the collective reads
    ptr = partial.data_ptr()
    y, found["reduce_from_tp"] = _copies(comm.reduce_from_tp, partial, g)
    assert y.data_ptr() == ptr and torch.equal(y.detach(), p * 2 * w.detach())
    y.sum().backward()
    assert_close(w.grad, torch.full_like(w, 2.0), exact=True, what="in-place reduce backward")

    # under bf16 autocast: bf16 on the wire both ways, fp32 gradients back
    x = _full((2, 4, 8), 2).requires_grad_()
    with record_comm() as ledger:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = comm.gather_from_sequence_parallel(x, g, dim=1)
            assert y.dtype == torch.bfloat16
            out = comm.reduce_scatter_to_sequence_parallel(y * 1.5, g, dim=1)
            assert out.dtype == torch.bfloat16
            out = comm.reduce_from_tp(comm.copy_to_tp(out.float(), g), g)
        out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    dtypes = {dtype for _, dtype in ledger.by_dtype()}
    assert dtypes == {"bfloat16"}, ledger.by_dtype()
    assert ledger.calls == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 2}, ledger
    # a parameter keeps its dtype: its gradient reduction is a gradient reduction
    weight = torch.nn.Parameter(torch.ones(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert comm.copy_to_tp(weight, g).dtype == torch.float32
    return {k: len(v) - (len(backend) if k.startswith("scatter") else 0) for k, v in found.items()}


def test_compute_dtype_in_place_and_copies(dist_run):
    counts = dist_run(2, _dtype_and_copies_case)[0]
    assert counts == {
        "gather b=1": 0, "scatter b=1": 0, "gather b=3": 1, "scatter b=3": 1,
        "gather dim 0": 0, "scatter dim 0": 0, "reduce_from_tp": 0,
    }, counts  # fmt: skip
