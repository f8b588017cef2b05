"""Overlapped all-gather+matmul and matmul+reduce-scatter on gloo: equal to the unfused definitions.

Each worker body below runs on every rank of a gloo group (the ``dist_run`` fixture) and asserts
there; a failing rank fails the test with its traceback. The references are the plain paths
(a collective, then ``F.linear``, through ``triton_parallel_layers.parallel_layers.comm``'s autograd collectives) and,
for the MLP block, the single-device ``nn.Linear -> GELU -> nn.Linear`` with copied weights.
Row counts per rank are odd (3, 13) so no tile or chunk boundary lines up by accident.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import needs_interpreter
from triton_parallel_layers.kernels import all_gather_matmul, force_backend, matmul_reduce_scatter
from triton_parallel_layers.kernels.collective_matmul import ALL_GATHER
from triton_parallel_layers.kernels.collectives import record_comm
from triton_parallel_layers.parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    allreduce_sequence_parallel_grads,
)
from triton_parallel_layers.parallel_layers.comm import (
    gather_from_sequence_parallel,
    reduce_scatter_to_sequence_parallel,
)

REPO = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32; the chunked weight gradient sums in another order

# (per-rank shape of the gathered/scattered operand, dim): 2-D and 3-D, dims 0 and 1, where
# dim 1 of a 3-D tensor (the sequence of (B, S, E)) has a batch dim of size 2 before it.
CASES = [((13, 6), 0), ((3, 2, 6), 0), ((2, 3, 6), 1), ((2, 3, 6), -2)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def _grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


def _tp_group(tp: int):
    """Split the world into groups of ``tp`` neighbouring ranks; return this rank's group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp == world:
        return dist.group.WORLD
    mine = None
    for start in range(0, world, tp):
        group = dist.new_group(list(range(start, start + tp)))  # every rank creates every group
        if start <= rank < start + tp:
            mine = group
    return mine


def _ops_match_unfused(backend: str, tp: int, cases=CASES) -> dict:
    """Forward and backward of both ops against the plain path; returns the two paths' ledgers."""
    group = _tp_group(tp)
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    ledgers = {"overlap": {}, "plain": {}}
    with force_backend(backend):
        for shard_shape, dim in cases:
            k, n_out = shard_shape[-1], 5
            full_shape = list(shard_shape)
            full_shape[dim] *= p
            x_full = torch.randn(full_shape, generator=_gen(1))  # the same on every rank
            w = torch.randn(n_out, k, generator=_gen(10 + rank))  # rank-specific weights
            b = torch.randn(n_out, generator=_gen(20 + rank))
            out_full = [*full_shape[:-1], n_out]
            out_shard = list(out_full)
            out_shard[dim] //= p

            # all_gather_matmul vs all-gather then F.linear
            x_shard = x_full.chunk(p, dim)[rank]
            g = torch.randn(out_full, generator=_gen(30 + rank))
            xa, wa, ba = _leaves(x_shard, w, b)
            with record_comm() as led_a:
                y = all_gather_matmul(xa, wa, group, gather_dim=dim, bias=ba)
                y.backward(g)
            xb, wb, bb = _leaves(x_shard, w, b)
            with record_comm() as led_b:
                y_ref = F.linear(gather_from_sequence_parallel(xb, group, dim), wb, bb)
                y_ref.backward(g)
            torch.testing.assert_close(y, y_ref, **TOL)
            torch.testing.assert_close(y_ref, F.linear(x_full, w, b), **TOL)
            for got, want in zip(_grads(xa, wa, ba), _grads(xb, wb, bb)):
                torch.testing.assert_close(got, want, **TOL)
            if p > 1:
                # the layers' plain op saves the shard too: the same results and bytes as the
                # ring; both gather the input once more in backward, which the unfused
                # definition (it saves the gathered input) does not
                xc, wc, bc = _leaves(x_shard, w, b)
                with record_comm() as led_plain:
                    y_plain = ALL_GATHER.forward(
                        xc, wc, bc, group.group_name, dim % len(full_shape)
                    )
                    y_plain.backward(g)
                torch.testing.assert_close(y_plain, y_ref, **TOL)
                for got, want in zip(_grads(xc, wc, bc), _grads(xb, wb, bb)):
                    torch.testing.assert_close(got, want, **TOL)
                assert led_a.bytes_sent == led_plain.bytes_sent, (str(led_a), str(led_plain))
                regather = led_b.bytes_sent["all_gather"]
                assert led_a.bytes_sent == {**led_b.bytes_sent, "all_gather": 2 * regather}
                led_b = led_plain
            assert led_a.bytes_sent == led_b.bytes_sent, (str(led_a), str(led_b))

            # matmul_reduce_scatter vs F.linear then reduce-scatter
            x_term = torch.randn(full_shape, generator=_gen(40 + rank))
            g = torch.randn(out_shard, generator=_gen(50 + rank))
            xa, wa = _leaves(x_term, w)
            with record_comm() as led_c:
                y = matmul_reduce_scatter(xa, wa, group, scatter_dim=dim)
                y.backward(g)
            xb, wb = _leaves(x_term, w)
            with record_comm() as led_d:
                y_ref = reduce_scatter_to_sequence_parallel(F.linear(xb, wb), group, dim)
                y_ref.backward(g)
            torch.testing.assert_close(y, y_ref, **TOL)
            for got, want in zip(_grads(xa, wa), _grads(xb, wb)):
                torch.testing.assert_close(got, want, **TOL)
            assert led_c.bytes_sent == led_d.bytes_sent, (str(led_c), str(led_d))

            for kind, led in (("overlap", led_a), ("overlap", led_c)):
                for key, v in led.bytes_sent.items():
                    ledgers[kind][key] = ledgers[kind].get(key, 0) + v
            for kind, led in (("plain", led_b), ("plain", led_d)):
                for key, v in led.bytes_sent.items():
                    ledgers[kind][key] = ledgers[kind].get(key, 0) + v
    return ledgers


def _mlp_matches_single_device(batch: int, rows_per_rank: int, hidden: int, ffn: int) -> dict:
    """ColumnParallel -> GELU -> RowParallel (sequence parallel) vs nn.Linear -> GELU -> nn.Linear."""
    group = dist.group.WORLD
    p, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
    x_full = torch.randn(batch, p * rows_per_rank, hidden)
    g_full = torch.randn(batch, p * rows_per_rank, hidden)
    x_ref = x_full.clone().requires_grad_()
    y_full = fc2(F.gelu(fc1(x_ref)))
    y_full.backward(g_full)

    def shard(t, dim):
        return t.chunk(p, dim)[rank]

    ledgers = {}
    for overlap in (False, True):
        col = ColumnParallelLinear.from_linear(
            fc1, group, sequence_parallel=True, overlap_comm=overlap
        )
        row = RowParallelLinear.from_linear(
            fc2, group, sequence_parallel=True, overlap_comm=overlap
        )
        x = shard(x_full, 1).clone().requires_grad_()  # (B, S/p, E)
        with record_comm() as ledger:
            y = row(F.gelu(col(x)))  # (B, S/p, E)
            y.backward(shard(g_full, 1))
        allreduce_sequence_parallel_grads(row)  # the bias's per-rank partial sums
        torch.testing.assert_close(y, shard(y_full, 1), **TOL)
        torch.testing.assert_close(x.grad, shard(x_ref.grad, 1), **TOL)
        torch.testing.assert_close(col.weight.grad, shard(fc1.weight.grad, 0), **TOL)
        torch.testing.assert_close(col.bias.grad, shard(fc1.bias.grad, 0), **TOL)
        torch.testing.assert_close(row.weight.grad, shard(fc2.weight.grad, 1), **TOL)
        torch.testing.assert_close(row.bias.grad, fc2.bias.grad, **TOL)
        ledgers["overlap" if overlap else "plain"] = dict(ledger.bytes_sent)
    assert ledgers["overlap"] == ledgers["plain"], ledgers
    return ledgers


def _mlp_under_autocast_matches_plain() -> None:
    """Under ``torch.autocast`` the overlapped block computes in the same dtype as the plain one."""
    group, rank = dist.group.WORLD, dist.get_rank()
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    x = torch.randn(2, 3, 8, generator=_gen(rank))  # (B, S/p, E)
    results = []
    for overlap in (False, True):
        col = ColumnParallelLinear.from_linear(
            fc1, group, sequence_parallel=True, overlap_comm=overlap
        )
        row = RowParallelLinear.from_linear(
            fc2, group, sequence_parallel=True, overlap_comm=overlap
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = col(x)
            assert h.dtype == torch.bfloat16, (overlap, h.dtype)  # as F.linear's output
            y = row(F.gelu(h))
        y.float().sum().backward()
        results.append((y, col.weight.grad, row.weight.grad))
    (y0, c0, r0), (y1, c1, r1) = results
    assert y0.dtype == y1.dtype, (y0.dtype, y1.dtype)  # the bias add (fp32) promotes both
    tol = {"rtol": 2e-2, "atol": 2e-2}  # bf16 products, summed in another order
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(c1, c0, **tol)
    torch.testing.assert_close(r1, r0, **tol)


def _bad_inputs_raise_everywhere() -> list:
    """Every bad call raises on this rank before communicating; then a good call still works."""
    group = dist.group.WORLD
    p, rank = dist.get_world_size(), dist.get_rank()
    x, w = torch.randn(3, 4, generator=_gen(rank)), torch.randn(5, 4, generator=_gen(99))
    cases = [
        lambda: all_gather_matmul(x, torch.randn(5, 6), group),  # K: 4 vs 6
        lambda: all_gather_matmul(x, w, group, gather_dim=1),  # the feature dim
        lambda: all_gather_matmul(x, w, group, gather_dim=-3),  # out of range
        lambda: all_gather_matmul(x, w, group, bias=torch.randn(4)),  # bias (4,) vs N=5
        lambda: all_gather_matmul(x.double(), w, group),  # dtypes differ
        lambda: all_gather_matmul(torch.randn(4), w, group),  # no row dim
        lambda: matmul_reduce_scatter(torch.randn(2 * p + 1, 4), w, group),  # 2p+1 rows
        lambda: matmul_reduce_scatter(x, torch.randn(5, 4, 1), group),  # 3-D weight
    ]
    messages = []
    for case in cases:
        try:
            case()
            messages.append(None)
        except (ValueError, TypeError) as err:
            messages.append(f"{type(err).__name__}: {err}")
    # Nothing was half-sent: the ring still lines up.
    y = all_gather_matmul(x, w, group)
    x_full = torch.cat([torch.randn(3, 4, generator=_gen(r)) for r in range(p)])
    torch.testing.assert_close(y, F.linear(x_full, w), **TOL)
    return messages


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ops_equal_unfused_definitions_and_move_the_same_bytes(dist_run, tp):
    ledgers = dist_run(tp, _ops_match_unfused, "ref", tp, timeout=60)
    for rank_ledgers in ledgers:
        assert rank_ledgers["overlap"] == rank_ledgers["plain"]
        if tp > 1:
            assert set(rank_ledgers["plain"]) == {"all_gather", "reduce_scatter"}


def test_ops_on_tp_subgroups_of_a_larger_world(dist_run):
    """TP=2 groups {0,1} and {2,3} of a 4-rank world: peers are mapped to global ranks."""
    dist_run(4, _ops_match_unfused, "ref", 2, CASES[2:3], timeout=60)


@needs_interpreter
def test_ops_on_the_triton_kernel_under_the_interpreter(dist_run):
    """The same checks with every matmul on the (interpreted) Triton kernel: strided views,
    slices of the output and in-place weight-gradient accumulation all go through it."""
    dist_run(2, _ops_match_unfused, "triton", 2, [((3, 6), 0), ((2, 3, 6), 1)], timeout=90)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sequence_parallel_mlp_with_overlap_equals_single_device(dist_run, tp):
    ledgers = dist_run(tp, _mlp_matches_single_device, 2, 3, 8, 12, timeout=60)
    if tp > 1:
        itemsize = 4
        shard = 2 * 3 * 8 * itemsize  # (B, S/p, E) fp32
        # forward: gather x, reduce-scatter y; backward: the duals, same sizes, and x gathered
        # once more (the column layer saved only its shard)
        expected_rs = 2 * (tp - 1) * shard
        assert all(led["overlap"]["all_gather"] == 3 * (tp - 1) * shard for led in ledgers)
        assert all(led["overlap"]["reduce_scatter"] == expected_rs for led in ledgers)


def test_overlap_follows_autocast_like_f_linear(dist_run):
    dist_run(2, _mlp_under_autocast_matches_plain, timeout=60)


def test_bad_input_raises_on_every_rank_without_hanging(dist_run):
    results = dist_run(2, _bad_inputs_raise_everywhere, timeout=30)
    expected = ["(5, 6)", "gather_dim=1", "gather_dim=-3", "bias of shape (4,)", "float64", "(4,)"]
    expected += ["not divisible by the group size 2", "(5, 4, 1)"]
    for messages in results:
        assert None not in messages, messages
        for message, fragment in zip(messages, expected):
            assert fragment in message, (fragment, message)


@pytest.mark.slow
def test_bench_overlap_smoke_run_writes_json_and_png(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # the benchmark times the torch path on CPU
    env.pop("TPL_KERNEL_BACKEND", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_overlap.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [json_path] = tmp_path.glob("overlap_*.json")
    assert json_path.with_suffix(".png").exists()
    report = json.loads(json_path.read_text())
    assert report["torch"] == torch.__version__
    for row in report["results"]:
        for key in ("t_plain_s", "t_overlap_s", "t_comm_s", "t_compute_s", "efficiency"):
            assert key in row
        assert row["bytes_overlap"] == row["bytes_plain"]
