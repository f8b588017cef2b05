"""The multi-process harness itself: results come back by rank, failures are clean, not hangs."""

import time

import pytest
import torch
import torch.distributed as dist

from triton_parallel_layers.parallel_layers.testing import DistributedError


def _rank_and_sum(offset):
    x = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(x)
    return dist.get_rank(), x.item()


def _fail_on_rank_one_before_collective():
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    x = torch.ones(1)
    dist.all_reduce(x)  # rank 0 waits here for a partner that never comes
    return x.item()


def _rank_zero_waits_for_a_message_never_sent():
    if dist.get_rank() == 0:
        dist.recv(torch.empty(1), src=1)  # rank 1 returns without sending: a real hang


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_by_rank(dist_run, world_size):
    results = dist_run(world_size, _rank_and_sum, 1)
    expected_sum = sum(r + 1 for r in range(world_size))
    assert results == [(r, float(expected_sum)) for r in range(world_size)]


def test_a_failing_rank_fails_cleanly_and_the_pool_recovers(dist_run):
    start = time.monotonic()
    with pytest.raises(DistributedError, match="rank one says no") as info:
        dist_run(2, _fail_on_rank_one_before_collective)
    assert "rank(s) [1]" in str(info.value)
    assert time.monotonic() - start < 30, "a failing rank must not leave the others hanging"
    assert dist_run(2, _rank_and_sum, 0) == [(0, 1.0), (1, 1.0)]


def test_a_hanging_call_times_out_and_the_pool_recovers(dist_run):
    with pytest.raises(TimeoutError, match="did not finish"):
        dist_run(2, _rank_zero_waits_for_a_message_never_sent, timeout=2)
    assert dist_run(2, _rank_and_sum, 0) == [(0, 1.0), (1, 1.0)]
