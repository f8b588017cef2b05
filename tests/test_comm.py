"""The autograd collectives: each forward is what it says, each backward is its dual."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import assert_close, chunk
from triton_parallel_layers.kernels.collectives import record_comm
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
