"""ParallelDims: validation, the (pp, dp, tp) mesh with TP innermost, and its groups."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from helpers import expect_error
from triton_parallel_layers.parallel_layers import ParallelDims


def _layout_case(dp, pp, tp):
    dims = ParallelDims(dp=dp, pp=pp, tp=tp)
    r = dist.get_rank()
    assert dims.backend == "gloo" and str(dims.device) == "cpu"
    assert dims.world_size == dist.get_world_size() and dims.rank == r
    # TP innermost, then DP, then PP: rank = (pp_rank * dp + dp_rank) * tp + tp_rank.
    assert r == (dims.pp_rank * dp + dims.dp_rank) * tp + dims.tp_rank
    tp_ranks = dist.get_process_group_ranks(dims.tp_group)
    dp_ranks = dist.get_process_group_ranks(dims.dp_group)
    pp_ranks = dist.get_process_group_ranks(dims.pp_group)
    base = r - dims.tp_rank
    assert tp_ranks == list(range(base, base + tp)), "TP ranks must be neighbours"
    assert dp_ranks == [r + (d - dims.dp_rank) * tp for d in range(dp)]
    assert pp_ranks == [r + (s - dims.pp_rank) * dp * tp for s in range(pp)]
    assert dims.is_first_stage == (dims.pp_rank == 0)
    assert dims.is_last_stage == (dims.pp_rank == pp - 1)
    assert dims.pp_peer(dims.pp_rank) == r
    assert dims.dp_mesh.size() == dp and dims.mesh.mesh_dim_names == ("pp", "dp", "tp")
    return dims.tp_rank, dims.dp_rank, dims.pp_rank


@pytest.mark.parametrize(
    "world_size,dp,pp,tp",
    [(1, 1, 1, 1), (2, 1, 1, 2), (2, 2, 1, 1), (4, 1, 2, 2), (4, 2, 1, 2), (4, 1, 4, 1)],
)
def test_mesh_layout(dist_run, world_size, dp, pp, tp):
    coords = dist_run(world_size, _layout_case, dp, pp, tp)
    assert len(set(coords)) == world_size  # every rank has its own coordinates


def _mismatch_case():
    msg = expect_error(
        ValueError,
        r"dp\*pp\*tp = 1\*2\*1 = 2 does not match the world size 4",
        ParallelDims,
        dp=1,
        pp=2,
        tp=1,
    )
    expect_error(ValueError, r"tp=0: expected a positive int", ParallelDims, tp=0)
    expect_error(TypeError, r"dp=2.0: expected a positive int", ParallelDims, dp=2.0, tp=2)
    # No rank entered a collective: the world group still works.
    assert ParallelDims(dp=2, tp=2).tp == 2
    return msg


def test_world_size_mismatch_raises_on_every_rank(dist_run):
    messages = dist_run(4, _mismatch_case)
    assert len(set(messages)) == 1
