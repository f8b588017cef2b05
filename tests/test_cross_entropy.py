"""vocab_parallel_cross_entropy against F.cross_entropy on the gathered logits, TP = 1, 2, 4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import assert_close, assert_close_lowp, chunk, expect_error
from triton_parallel_layers.parallel_layers import ParallelDims, vocab_parallel_cross_entropy
from triton_parallel_layers.parallel_layers.checks import debug_checks


def _loss_case(shape, vocab, ignore_index, label_smoothing, reduction, dtype):
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    logits = (3 * torch.randn(*shape, vocab)).to(dtype)
    target = torch.randint(0, vocab, shape)
    if ignore_index is not None:
        target.view(-1)[::3] = ignore_index  # every third token ignored
    kw = {"label_smoothing": label_smoothing, "reduction": reduction}
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index

    def reference(x):
        x = x.detach().clone().requires_grad_()
        loss = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), **kw)
        loss = loss.reshape(shape) if reduction == "none" else loss
        dloss = torch.linspace(-1, 1, loss.numel()).reshape(loss.shape).to(loss.dtype)
        loss.backward(dloss)
        return loss.detach(), x.grad, dloss

    ref_loss, ref_grad, dloss = reference(logits)
    truth_loss, truth_grad, _ = reference(logits.float())

    shard = chunk(logits, -1).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, dims.tp_group, **kw)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    loss.backward(dloss)
    assert_close_lowp(loss.detach(), ref_loss, truth_loss, what="loss")
    assert_close_lowp(shard.grad, chunk(ref_grad, -1), chunk(truth_grad, -1), what="logits grad")


CASES = [
    # shape, vocab (divisible by 4), ignore_index, label_smoothing, reduction
    ((13,), 52, None, 0.0, "mean"),
    ((2, 17), 68, -100, 0.0, "mean"),
    ((3, 5), 388, 7, 0.1, "sum"),
    ((97,), 16, -100, 0.25, "none"),
    ((2, 3), 12, None, 0.0, "none"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_matches_cross_entropy(dist_run, world_size, case, dtype):
    dist_run(world_size, _loss_case, *case, dtype)


def _column_parallel_head_case():
    """The intended use: logits from a column-parallel head, never gathered, trained end to end."""
    from torch import nn

    from triton_parallel_layers.parallel_layers import ColumnParallelLinear

    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(3)
    head = nn.Linear(16, 40)
    x, target = torch.randn(4, 6, 16), torch.randint(0, 40, (4, 6))
    F.cross_entropy(head(x).reshape(-1, 40), target.reshape(-1)).backward()
    par = ColumnParallelLinear.from_linear(head, dims.tp_group)
    xp = x.clone().requires_grad_()
    vocab_parallel_cross_entropy(par(xp), target, dims.tp_group).backward()
    assert_close(par.weight.grad, chunk(head.weight.grad, 0), what="head weight grad")
    assert_close(par.bias.grad, chunk(head.bias.grad, 0), what="head bias grad")


@pytest.mark.parametrize("world_size", [2, 4])
def test_through_a_column_parallel_head(dist_run, world_size):
    dist_run(world_size, _column_parallel_head_case)


def _bad_input_case():
    dims = ParallelDims(tp=dist.get_world_size())
    g = dims.tp_group
    logits = torch.randn(2, 3, 5)  # 5 per rank: vocabulary 20 over 4 ranks
    expect_error(
        ValueError,
        r"target of shape \(2, 4\) does not match logits of shape \(2, 3, 5\): expected target shape \(2, 3\)",
        vocab_parallel_cross_entropy,
        logits,
        torch.zeros(2, 4, dtype=torch.long),
        g,
    )
    with debug_checks():  # the opt-in eager check names the bad target
        expect_error(
            ValueError,
            r"target value 20 is outside \[0, 20\)",
            vocab_parallel_cross_entropy,
            logits,
            torch.full((2, 3), 20),
            g,
        )
    # by default a device-side assert (a RuntimeError on CPU), no host sync
    expect_error(
        RuntimeError,
        r"a target is outside \[0, 20\) and is not ignore_index=-100",
        vocab_parallel_cross_entropy,
        logits,
        torch.full((2, 3), -1),
        g,
    )
    expect_error(
        TypeError,
        r"integer class indices",
        vocab_parallel_cross_entropy,
        logits,
        torch.zeros(2, 3),
        g,
    )
    expect_error(
        ValueError,
        r"reduction='avg'",
        vocab_parallel_cross_entropy,
        logits,
        torch.zeros(2, 3, dtype=torch.long),
        g,
        reduction="avg",
    )
    x = torch.ones(1)
    dist.all_reduce(x, group=g)
    assert x.item() == 4


def test_bad_input_raises_on_every_rank(dist_run):
    dist_run(4, _bad_input_case)
