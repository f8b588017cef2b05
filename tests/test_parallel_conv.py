"""Column-conv + row-conv blocks against the single-device block, on gloo at TP = 1, 2, 4."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import assert_close, chunk, expect_error, needs_interpreter
from triton_parallel_layers.kernels import force_backend, use_triton
from triton_parallel_layers.parallel_layers import (
    ColumnParallelConv2d,
    ParallelDims,
    RowParallelConv2d,
)


def _block_case(c_in, c_mid, c_out, k1, k2, stride, padding, channels_last, backend):
    """conv(k1) -> ReLU -> conv(k2), parallelized as ColumnParallelConv2d(relu) -> RowParallelConv2d."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    conv1 = nn.Conv2d(c_in, c_mid, k1, stride=stride, padding=padding)
    conv2 = nn.Conv2d(c_mid, c_out, k2, padding=k2 // 2)
    col = ColumnParallelConv2d.from_conv(copy.deepcopy(conv1), dims.tp_group, relu=True)
    row = RowParallelConv2d.from_conv(copy.deepcopy(conv2), dims.tp_group)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, c_in, 7, 9).to(memory_format=fmt)

    with force_backend(backend):
        assert use_triton(x) == (backend == "triton")
        x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref = conv2(F.relu(conv1(x_ref)))
        y = row(col(x_par))
        dy = torch.randn_like(y_ref)
        y_ref.backward(dy)
        y.backward(dy)

    if c_in > 1:  # a 1-channel input is both formats at once: torch's choice then varies
        assert y.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
    assert_close(y.detach(), y_ref.detach(), what="output")
    assert_close(x_par.grad, x_ref.grad, what="input grad")
    assert_close(col.weight.grad, chunk(conv1.weight.grad, 0), what="conv1 weight grad")
    assert_close(col.bias.grad, chunk(conv1.bias.grad, 0), what="conv1 bias grad")
    assert_close(row.weight.grad, chunk(conv2.weight.grad, 1), what="conv2 weight grad")
    assert_close(row.bias.grad, conv2.bias.grad, what="conv2 bias grad")


CASES = [
    # c_in, c_mid (divisible by 4), c_out, k1, k2, stride, padding, channels_last
    (3, 8, 13, 3, 3, 1, 1, False),
    (13, 12, 3, 5, 1, 2, (2, 1), True),
    (1, 32, 10, 3, 3, 1, 1, True),  # the seed CNN's first conv: 1 -> 32 channels
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_block_matches_single_device(dist_run, world_size, case):
    dist_run(world_size, _block_case, *case, "ref")


@needs_interpreter
def test_block_through_the_triton_kernel(dist_run):
    """The same block through the Triton conv kernel (interpreted on CPU)."""
    dist_run(2, _block_case, 3, 4, 5, 3, 1, 1, 1, True, "triton", timeout=300)


def _gather_and_scatter_case():
    """gather_output=True and input_is_parallel=False: the split/gather duals, both directions."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(2)
    conv1, conv2 = nn.Conv2d(5, 8, 3), nn.Conv2d(8, 6, 1, bias=False)
    col = ColumnParallelConv2d.from_conv(copy.deepcopy(conv1), dims.tp_group, gather_output=True)
    row = RowParallelConv2d.from_conv(copy.deepcopy(conv2), dims.tp_group, input_is_parallel=False)
    x = torch.randn(2, 5, 6, 6)
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    h_ref, h = conv1(x_ref), col(x_par)  # whole channels on every rank
    assert_close(h.detach(), h_ref.detach(), what="gathered output")
    y_ref, y = conv2(h_ref), row(h)
    assert_close(y.detach(), y_ref.detach(), what="row conv of a whole input")
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y.backward(dy)
    assert_close(x_par.grad, x_ref.grad, what="input grad")
    assert_close(col.weight.grad, chunk(conv1.weight.grad, 0), what="col weight grad")
    assert_close(col.bias.grad, chunk(conv1.bias.grad, 0), what="col bias grad")
    assert_close(row.weight.grad, chunk(conv2.weight.grad, 1), what="row weight grad")


@pytest.mark.parametrize("world_size", [2, 4])
def test_gather_output_and_whole_input(dist_run, world_size):
    dist_run(world_size, _gather_and_scatter_case)


def _init_parity_case():
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(9)
    ref1, ref2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
    torch.manual_seed(9)
    col = ColumnParallelConv2d(3, 8, 3, tp_group=dims.tp_group)
    row = RowParallelConv2d(8, 4, 3, tp_group=dims.tp_group)
    assert_close(col.weight.detach(), chunk(ref1.weight.detach(), 0), exact=True, what="col weight")
    assert_close(col.bias.detach(), chunk(ref1.bias.detach(), 0), exact=True, what="col bias")
    assert_close(row.weight.detach(), chunk(ref2.weight.detach(), 1), exact=True, what="row weight")
    assert_close(row.bias.detach(), ref2.bias.detach(), exact=True, what="row bias")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_initialization_parity(dist_run, world_size):
    dist_run(world_size, _init_parity_case)


def _bad_input_case():
    dims = ParallelDims(tp=dist.get_world_size())
    g = dims.tp_group
    expect_error(ValueError, r"out_channels=10 is not divisible by the tensor-parallel size 4",
                 ColumnParallelConv2d, 3, 10, 3, tp_group=g)  # fmt: skip
    expect_error(ValueError, r"in_channels=6 is not divisible by the tensor-parallel size 4",
                 RowParallelConv2d, 6, 8, 3, tp_group=g)  # fmt: skip
    expect_error(ValueError, r"groups=2 is not supported",
                 ColumnParallelConv2d.from_conv, nn.Conv2d(4, 8, 3, groups=2), g)  # fmt: skip
    expect_error(
        ValueError, r"groups=4 is not supported", RowParallelConv2d, 8, 8, 3, groups=4, tp_group=g
    )
    col = ColumnParallelConv2d(3, 8, 3, tp_group=g)
    expect_error(
        ValueError,
        r"expected input \(N, 3, H, W\), got shape \(2, 4, 5, 5\)",
        col,
        torch.randn(2, 4, 5, 5),
    )
    row = RowParallelConv2d(8, 4, 3, tp_group=g)
    expect_error(
        ValueError,
        r"expected input \(N, 2, H, W\), got shape \(2, 8, 5, 5\)",
        row,
        torch.randn(2, 8, 5, 5),
    )
    x = torch.ones(1)
    dist.all_reduce(x, group=g)
    assert x.item() == 4


def test_bad_input_raises_on_every_rank(dist_run):
    dist_run(4, _bad_input_case)
