"""ColumnParallelLinear and RowParallelLinear against nn.Linear, on gloo at TP = 1, 2, 4.

Every case builds the single-device nn.Linear on every rank with the same seed, shards it with
``from_linear``, runs both on the same input and compares this rank's share of the output and of
every gradient. Bit-exact where no reduction crosses ranks (the column layer's output and weight
gradient); within ``helpers.TOLERANCES`` where partial sums from several ranks are added.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_close, assert_close_lowp, chunk, expect_error
from triton_parallel_layers.kernels.collectives import record_comm
from triton_parallel_layers.parallel_layers import (
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
    allreduce_sequence_parallel_grads,
)
from triton_parallel_layers.parallel_layers.weight_grad import WeightGradStore, split_weight_grad

WORLD_SIZES = [1, 2, 4]
DTYPES = [torch.float32, torch.bfloat16]
B = 2  # batch


def _reference(ref: nn.Linear, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> dict:
    """Output and gradients of the single-device ``ref`` in ``dtype`` (a copy in that dtype)."""
    module = copy.deepcopy(ref).to(dtype)
    x = x.detach().to(dtype).clone().requires_grad_()
    y = module(x)
    y.backward(dy.to(dtype))
    grads = {"y": y.detach(), "dx": x.grad, "dw": module.weight.grad}
    if module.bias is not None:
        grads["db"] = module.bias.grad
    return grads


def _compare(ours: dict, ref: dict, truth: dict, shard: dict, exact: set) -> None:
    """Compare this rank's ``ours`` with its ``shard`` (a function) of the reference results.

    fp32: bit-exact for the names in ``exact``, else within the fp32 tolerance. Low precision:
    within twice the single-device module's own error against the fp32 ``truth``.
    """
    for name, value in ours.items():
        expected, fp32 = shard[name](ref[name]), shard[name](truth[name])
        if value.dtype == torch.float32:
            assert_close(value, expected, exact=name in exact, what=name)
        else:
            assert_close_lowp(value, expected, fp32, what=name)


def _exact_widths(*widths: int) -> bool:
    # BLAS takes matrix-vector paths (another summation order) for very narrow shards.
    return min(widths) >= 8


def _column_case(in_f, out_f, bias, sequence_parallel, gather_output, dtype):
    dims = ParallelDims(tp=dist.get_world_size())
    tp, group = dims.tp, dims.tp_group
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    layer = ColumnParallelLinear.from_linear(
        copy.deepcopy(ref).to(dtype),
        group,
        gather_output=gather_output,
        sequence_parallel=sequence_parallel,
    )
    seq = 3 * tp  # 3 tokens per rank: odd
    x = torch.randn(B, seq, in_f).to(dtype)
    dy = torch.randn(B, seq, out_f).to(dtype)

    x_local = (chunk(x, 1) if sequence_parallel else x.clone()).requires_grad_()
    y = layer(x_local)
    y.backward(dy if gather_output else chunk(dy, -1))
    ours = {"y": y.detach(), "dx": x_local.grad, "dw": layer.weight.grad}
    if bias:
        ours["db"] = layer.bias.grad

    shard = {
        "y": (lambda t: t) if gather_output else (lambda t: chunk(t, -1)),
        "dx": (lambda t: chunk(t, 1)) if sequence_parallel else (lambda t: t),
        "dw": lambda t: chunk(t, 0),
        "db": lambda t: chunk(t, 0),
    }
    # Each rank computes its output columns and weight rows alone: bit-exact. The input gradient
    # sums the ranks' partial products (a cross-rank reduction), and the bias gradient is a
    # column sum whose vectorization depends on the width: those agree to rounding. Under
    # sequence parallelism the weight gradient sums the tokens in the gathered, sequence-major
    # order (S, B), not nn.Linear's (B, S): another summation order, also to rounding.
    exact = {"y", "dw"} if _exact_widths(out_f // tp) else set()
    if sequence_parallel and B > 1:
        exact.discard("dw")
    _compare(
        ours, _reference(ref, x, dy, dtype), _reference(ref, x, dy, torch.float32), shard, exact
    )


def _row_case(in_f, out_f, bias, sequence_parallel, input_is_parallel, dtype):
    dims = ParallelDims(tp=dist.get_world_size())
    tp, group = dims.tp, dims.tp_group
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    layer = RowParallelLinear.from_linear(
        copy.deepcopy(ref).to(dtype),
        group,
        input_is_parallel=input_is_parallel,
        sequence_parallel=sequence_parallel,
    )
    seq = 3 * tp
    x = torch.randn(B, seq, in_f).to(dtype)
    dy = torch.randn(B, seq, out_f).to(dtype)

    x_local = (chunk(x, -1) if input_is_parallel else x.clone()).requires_grad_()
    y = layer(x_local)
    y.backward(chunk(dy, 1) if sequence_parallel else dy)
    # the sequence-parallel bias gradient is a per-rank partial sum until this all-reduce
    reduced = allreduce_sequence_parallel_grads(layer)
    assert reduced == (1 if sequence_parallel and bias and tp > 1 else 0)
    ours = {"y": y.detach(), "dx": x_local.grad, "dw": layer.weight.grad}
    if bias:
        ours["db"] = layer.bias.grad

    shard = {
        "y": (lambda t: chunk(t, 1)) if sequence_parallel else (lambda t: t),
        "dx": (lambda t: chunk(t, -1)) if input_is_parallel else (lambda t: t),
        "dw": lambda t: chunk(t, 1),
        "db": lambda t: t,
    }
    # The output sums partial products over ranks. This rank's weight columns need only its own
    # input slice (bit-exact), and so does its input gradient when the input arrived split; the
    # whole-input gradient is all-gathered from the slices. The bias gradient is whole on every
    # rank: bit-exact unless sequence parallelism all-reduces it from per-rank token sums.
    exact = set()
    if _exact_widths(in_f // tp):
        exact = {"dw", "dx"} | ({"db"} if not sequence_parallel else set())
    _compare(
        ours, _reference(ref, x, dy, dtype), _reference(ref, x, dy, torch.float32), shard, exact
    )


COLUMN_CASES = [
    # in_f, out_f (divisible by 4), bias, sequence_parallel, gather_output
    (13, 68, True, False, False),
    (32, 64, False, True, False),
    (97, 52, True, True, True),
    (17, 4, True, False, True),
]
ROW_CASES = [
    # in_f (divisible by 4), out_f, bias, sequence_parallel, input_is_parallel
    (68, 13, True, False, True),
    (64, 32, False, True, True),
    (52, 97, True, True, False),
    (4, 17, True, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", COLUMN_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_column_parallel_matches_linear(dist_run, world_size, case, dtype):
    dist_run(world_size, _column_case, *case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_row_parallel_matches_linear(dist_run, world_size, case, dtype):
    dist_run(world_size, _row_case, *case, dtype)


def _mlp_case(hidden, sequence_parallel):
    """Column -> GELU -> Row is the Megatron MLP: equal to the single-device block."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
    ref = nn.Sequential(fc1, nn.GELU(), fc2)
    par = nn.Sequential(
        ColumnParallelLinear.from_linear(fc1, dims.tp_group, sequence_parallel=sequence_parallel),
        nn.GELU(),
        RowParallelLinear.from_linear(fc2, dims.tp_group, sequence_parallel=sequence_parallel),
    )
    x = torch.randn(B, 5 * dims.tp, hidden)
    x_ref, x_par = (
        x.clone().requires_grad_(),
        (chunk(x, 1) if sequence_parallel else x).requires_grad_(),
    )
    ref(x_ref).square().sum().backward()
    y = par(x_par)
    if sequence_parallel and dims.tp > 1:
        # the row layer multiplied the column layer's sequence-major output in that order and
        # reduce-scattered along dim 0, so no layout copy: its output is sequence-major too
        assert y.movedim(1, 0).is_contiguous() and not y.is_contiguous(), y.stride()
    y_full = y if not sequence_parallel else torch.cat([t for t in _all_gather_list(y.detach())], 1)
    assert_close(y_full, ref(x.clone()).detach(), what="output")
    y.square().sum().backward()
    allreduce_sequence_parallel_grads(par)
    assert_close(par[0].weight.grad, chunk(fc1.weight.grad, 0), what="fc1 weight grad")
    assert_close(par[0].bias.grad, chunk(fc1.bias.grad, 0), what="fc1 bias grad")
    assert_close(par[2].weight.grad, chunk(fc2.weight.grad, 1), what="fc2 weight grad")
    assert_close(par[2].bias.grad, fc2.bias.grad, what="fc2 bias grad")
    assert_close(
        x_par.grad, chunk(x_ref.grad, 1) if sequence_parallel else x_ref.grad, what="input grad"
    )


def _all_gather_list(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mlp_block_matches_single_device(dist_run, world_size, sequence_parallel):
    dist_run(world_size, _mlp_case, 24, sequence_parallel)


def _init_parity_case(seed):
    """Built after the same seed, the TP shards equal the nn.Linear weights split by chunk."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(seed)
    ref_col, ref_row = nn.Linear(12, 20), nn.Linear(20, 12)
    after_ref = torch.rand(3)
    torch.manual_seed(seed)
    col = ColumnParallelLinear(12, 20, tp_group=dims.tp_group)
    row = RowParallelLinear(20, 12, tp_group=dims.tp_group)
    after_par = torch.rand(3)
    assert_close(
        col.weight.detach(), chunk(ref_col.weight.detach(), 0), exact=True, what="column weight"
    )
    assert_close(col.bias.detach(), chunk(ref_col.bias.detach(), 0), exact=True, what="column bias")
    assert_close(
        row.weight.detach(), chunk(ref_row.weight.detach(), 1), exact=True, what="row weight"
    )
    assert_close(row.bias.detach(), ref_row.bias.detach(), exact=True, what="row bias")
    assert_close(after_par, after_ref, exact=True, what="generator state after init")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_initialization_parity(dist_run, world_size):
    dist_run(world_size, _init_parity_case, 1234)


def _bad_input_case():
    dims = ParallelDims(tp=dist.get_world_size())
    g = dims.tp_group
    msg = expect_error(
        ValueError,
        r"out_features=10 is not divisible by the tensor-parallel size 4",
        ColumnParallelLinear,
        8,
        10,
        tp_group=g,
    )
    expect_error(
        ValueError,
        r"in_features=6 is not divisible by the tensor-parallel size 4",
        RowParallelLinear,
        6,
        8,
        tp_group=g,
    )
    col = ColumnParallelLinear(8, 16, tp_group=g, sequence_parallel=True)
    expect_error(ValueError, r"last dim 7, expected 8", col, torch.randn(2, 3, 7))
    row = RowParallelLinear(16, 8, tp_group=g, sequence_parallel=True)
    expect_error(ValueError, r"last dim 16, expected 4", row, torch.randn(2, 4, 16))
    expect_error(
        ValueError,
        r"sequence length 5 .* not divisible by the tensor-parallel size 4",
        row,
        torch.randn(2, 5, 4),
    )
    expect_error(
        ValueError,
        r"needs sequence_parallel=True",
        ColumnParallelLinear,
        8,
        16,
        tp_group=g,
        overlap_comm=True,
    )
    expect_error(
        TypeError,
        r"expects an nn.Linear, got Conv1d",
        ColumnParallelLinear.from_linear,
        nn.Conv1d(2, 4, 1),
        g,
    )
    # Every rank raised on its own; the group is still usable (nobody is stuck in a collective).
    x = torch.ones(1)
    dist.all_reduce(x, group=g)
    assert x.item() == dims.tp
    return msg


def test_bad_input_raises_on_every_rank(dist_run):
    messages = dist_run(4, _bad_input_case)
    assert len(set(messages)) == 1


def test_linear_without_group_is_nn_linear():
    """With no group both layers are nn.Linear: same initialization, same output bit for bit."""
    x = torch.randn(3, 7)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        torch.manual_seed(0)
        ref = nn.Linear(7, 5)
        torch.manual_seed(0)
        layer = cls(7, 5)
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
        assert torch.equal(layer(x), ref(x)), cls.__name__


def _deferred_weight_grad_case() -> dict:
    """Zero-bubble deferral of the column layer's weight gradient, in its three communicating
    forms: the input gradient (and its collective) at B time, the weight gradient at W time
    (under sequence parallelism after gathering the saved shard again), both equal to the
    backward that computes everything at once."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    counts = {}
    for sp, overlap in ((False, False), (True, False), (True, True)):
        layer = ColumnParallelLinear.from_linear(
            ref, dims.tp_group, sequence_parallel=sp, overlap_comm=overlap
        )
        x = torch.randn(2, 3 if sp else 3 * dims.tp, 16, generator=torch.Generator().manual_seed(1))
        dy = torch.randn(2, 3 * dims.tp, 8 // dims.tp, generator=torch.Generator().manual_seed(2))
        x_now = x.clone().requires_grad_()
        layer(x_now).backward(dy)
        now = (x_now.grad, layer.weight.grad, layer.bias.grad)
        layer.zero_grad(set_to_none=True)

        store = WeightGradStore()
        x_later = x.clone().requires_grad_()
        with split_weight_grad():
            y = layer(x_later)
        with store.capture(), record_comm() as b_pass:
            y.backward(dy)
        assert layer.weight.grad is None and layer.bias.grad is None and len(store) == 1
        torch.testing.assert_close(x_later.grad, now[0], rtol=0, atol=0)
        with record_comm() as w_pass:
            store.flush()
        torch.testing.assert_close(layer.weight.grad, now[1], rtol=0, atol=0)
        torch.testing.assert_close(layer.bias.grad, now[2], rtol=0, atol=0)
        counts[(sp, overlap)] = (dict(b_pass.calls), dict(w_pass.calls))
    return counts


def test_deferred_weight_grad_of_the_communicating_column_layer(dist_run):
    for counts in dist_run(2, _deferred_weight_grad_case):
        b_pass, w_pass = counts[(False, False)]
        assert b_pass == {"all_reduce": 1} and w_pass == {}  # nothing to gather at W time
        b_pass, w_pass = counts[(True, False)]
        assert b_pass == {"reduce_scatter": 1} and w_pass == {"all_gather": 1}
        b_pass, w_pass = counts[(True, True)]  # the rings: one exchange per step but the last
        assert b_pass == {"reduce_scatter": 1} and w_pass == {"all_gather": 1}
