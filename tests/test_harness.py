"""The multi-process harness itself: results come back by rank, failures are clean, not hangs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from triton_parallel_layers.parallel_layers.testing import (
    BackendUnavailable,
    DistributedError,
    WorkerPool,
    harness_backend,
)

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_backend_comes_from_tpl_test_backend(monkeypatch):
    monkeypatch.delenv("TPL_TEST_BACKEND", raising=False)
    assert harness_backend() == "gloo" and WorkerPool(2).backend == "gloo"
    monkeypatch.setenv("TPL_TEST_BACKEND", "NCCL")
    assert harness_backend() == "nccl" and WorkerPool(2).backend == "nccl"
    monkeypatch.setenv("TPL_TEST_BACKEND", "mpi")
    with pytest.raises(ValueError, match="TPL_TEST_BACKEND='mpi': expected one of"):
        harness_backend()
    with pytest.raises(ValueError, match="backend='ucc': expected one of"):
        WorkerPool(2, backend="ucc")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine can run 2 NCCL ranks")
def test_nccl_without_enough_gpus_says_so_before_starting_anything():
    pool = WorkerPool(2, backend="nccl")
    with pytest.raises(
        BackendUnavailable, match="needs 2 GPUs \\(one per rank\\); this machine has"
    ):
        pool.run(_rank_and_sum, 0)
    assert not pool.alive


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine can run 2 NCCL ranks")
def test_under_tpl_test_backend_nccl_the_suite_skips_what_the_gpus_cannot_hold():
    """The same test file, run as a user would with ``TPL_TEST_BACKEND=nccl``: the world-size-2
    test skips with the reason instead of failing (on a machine with 2+ GPUs it would run)."""
    env = {**os.environ, "TPL_TEST_BACKEND": "nccl", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{Path(__file__).name}::test_results_come_back_by_rank[2]"],
        cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout and "needs 2 GPUs (one per rank)" in proc.stdout, proc.stdout
