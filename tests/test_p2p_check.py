"""The NCCL-order checker (:mod:`triton_parallel_layers.parallel_layers.pipeline.p2p_check`) is
neither too lax nor too strict.

* Hand-made logs: orders known to hang on NCCL (two ranks each sending first, a ring of lone
  sends) are reported stuck, with the stuck group of each rank; the same messages batched as
  Megatron and ``torch.distributed.pipelining`` do complete; FIFO-matched pairs that disagree in
  size or tag are reported.
* The recorder on gloo logs each ``batch_isend_irecv`` as one group and each lone ``send`` /
  ``recv`` / ``isend`` / ``irecv`` as a group of one, nothing twice, with global peer ranks.
* A recorded order that runs fine on gloo but hangs on NCCL (both ranks ``isend`` first) fails.
* PyTorch's own ``Schedule1F1B`` and ``ScheduleInterleaved1F1B`` (``torch.distributed.pipelining``),
  recorded on gloo at pp = 2 and 4, pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from triton_parallel_layers.parallel_layers.pipeline.p2p_check import (
    op,
    record_p2p,
    replay_nccl,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import check_nccl_order  # noqa: E402  (the recorded controls, shared with the checker's bench)


# ---------------------------------------------------------------------------------------------
# Pure replay: hand-made orders
# ---------------------------------------------------------------------------------------------
def test_two_ranks_each_sending_first_deadlock():
    # each rank: [send] then [recv], lone groups (1F1B's "send activation 1" against
    # "send gradient 0" in the issue)
    bad = [
        [[op("send", 1)], [op("recv", 1)]],
        [[op("send", 0)], [op("recv", 0)]],
    ]
    replay = replay_nccl(bad)
    assert not replay.completes and not replay.ok
    assert sorted(replay.stuck) == [0, 1]
    assert replay.stuck[0].group == 0 and replay.stuck[1].group == 0
    assert "rank 1 is in group 0" in replay.report()  # rank 0's send waits on rank 1's group 1
    assert replay.groups_run == [0, 0]


def test_matching_orders_complete():
    # the same messages, one rank receiving first
    assert replay_nccl([
        [[op("send", 1)], [op("recv", 1)]],
        [[op("recv", 0)], [op("send", 0)]],
    ]).ok  # fmt: skip
    # ... or each rank's send batched with its receive (Megatron's send_forward_recv_backward)
    assert replay_nccl([
        [[op("send", 1), op("recv", 1)]],
        [[op("recv", 0), op("send", 0)]],
    ]).ok  # fmt: skip


def test_ring():
    n = 4
    lone = [[[op("send", (r + 1) % n)], [op("recv", (r - 1) % n)]] for r in range(n)]
    assert not replay_nccl(lone).completes
    batched = [[[op("send", (r + 1) % n), op("recv", (r - 1) % n)]] for r in range(n)]
    assert replay_nccl(batched).ok
    # not too strict: ops of one group complete one by one as their peers reach them
    staggered = [
        [[op("send", 1), op("send", 2)]],
        [[op("recv", 0)], [op("send", 2)]],
        [[op("recv", 1)], [op("recv", 0)]],
    ]
    replay = replay_nccl(staggered)
    assert replay.ok, replay.report()
    # and FIFO per pair: the second message from 0 to 1 waits for the second receive
    fifo = [
        [[op("send", 1)], [op("send", 1)]],
        [[op("recv", 0)], [op("recv", 0)]],
    ]
    assert replay_nccl(fifo).ok
    crossed = [
        [[op("send", 1), op("send", 1)]],  # both in one group
        [[op("recv", 0)], [op("send", 0)], [op("recv", 0)]],
        # rank 1's send to 0 is never received
    ]
    replay = replay_nccl(crossed)
    assert not replay.completes
    assert "never posts the matching recv" in replay.report()


def test_mismatched_sizes_and_tags_reported():
    replay = replay_nccl([
        [[op("send", 1, nbytes=64, tag=0), op("send", 1, nbytes=16, tag=1)]],
        [[op("recv", 0, nbytes=16, tag=1), op("recv", 0, nbytes=64, tag=0)]],
    ])  # fmt: skip
    # completes (NCCL matches them in order), but delivers each message into the wrong buffer
    assert replay.completes and not replay.ok
    assert len(replay.mismatches) == 2
    assert "sent 64 B" in replay.mismatches[0]


# ---------------------------------------------------------------------------------------------
# Recording on gloo
# ---------------------------------------------------------------------------------------------
def _record_every_api() -> list:
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    a = torch.full((3,), float(rank))
    b = torch.empty(3)
    with record_p2p() as log:
        if rank == 0:
            dist.send(a, dst=peer)
            dist.recv(b, src=peer)
            dist.isend(a, peer, tag=5).wait()
            dist.irecv(b, src=peer).wait()
        else:
            dist.recv(b, src=peer)
            dist.send(a, dst=peer)
            dist.irecv(b, peer, tag=5).wait()
            dist.isend(a, dst=peer).wait()
        ops = [
            dist.P2POp(dist.isend, a, peer),
            dist.P2POp(dist.irecv, b, peer),
            dist.P2POp(dist.isend, torch.zeros(2, 2, dtype=torch.float64), peer, tag=7),
        ]
        works = dist.batch_isend_irecv(ops)
        works[0].wait()
        works[1].wait()
        c = torch.empty(2, 2, dtype=torch.float64)
        dist.recv(c, src=peer, tag=7)  # (gloo too completes a send only once it is received)
        works[2].wait()
    assert torch.equal(b, torch.full((3,), float(peer)))
    return log.groups


def test_recorder_logs_each_group_once(dist_run):
    logs = dist_run(2, _record_every_api)
    shapes = [[[(o.kind, o.peer, o.nbytes, o.tag, o.api) for o in g] for g in log] for log in logs]
    assert shapes[0] == [
        [("send", 1, 12, 0, "send")],
        [("recv", 1, 12, 0, "recv")],
        [("send", 1, 12, 5, "isend")],
        [("recv", 1, 12, 0, "irecv")],
        [
            ("send", 1, 12, 0, "batch_isend_irecv"),
            ("recv", 1, 12, 0, "batch_isend_irecv"),
            ("send", 1, 32, 7, "batch_isend_irecv"),
        ],
        [("recv", 1, 32, 7, "recv")],
    ]
    assert [o.group for g in logs[0] for o in g] == [0, 1, 2, 3, 4, 4, 4, 5]
    assert logs[0][4][2].shape == (2, 2) and logs[0][4][2].dtype == "float64"
    # the first four groups match one to one; then each rank's batch sends (tag 7) to a receive
    # the peer posts only after its own batch: fine on gloo, a hang on NCCL
    replay = replay_nccl(logs)
    assert replay.groups_run == [4, 4] and not replay.mismatches
    assert all("send -> " in w and "(32 B, tag 7)" in w for s in replay.stuck.values()
               for w in s.waiting)  # fmt: skip
    # patching is undone
    assert dist.isend.__module__ == "torch.distributed.distributed_c10d"


def test_recorded_known_bad_order_fails(dist_run):
    replay = replay_nccl(dist_run(2, check_nccl_order.both_send_first))
    assert not replay.completes
    assert {r: s.group for r, s in replay.stuck.items()} == {0: 0, 1: 0}
    print("\n" + replay.report())


# ---------------------------------------------------------------------------------------------
# PyTorch's own schedules pass
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("name, v", check_nccl_order.TORCH_SCHEDULES)
def test_torch_pipelining_schedules_pass(dist_run, name, v, pp):
    for m in (pp, 2 * pp):
        logs = dist_run(pp, check_nccl_order.torch_schedule, name, m, v, timeout=120)
        assert sum(len(g) for g in logs) > 0
        replay = replay_nccl(logs)
        print(f"\ntorch.distributed.pipelining.{name} pp={pp} m={m} v={v}: {replay.report()}")
        assert replay.ok, replay.report()
