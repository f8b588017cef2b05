"""vocab_parallel_cross_entropy against F.cross_entropy on the gathered logits, TP = 1, 2, 4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import assert_close, assert_close_lowp, chunk, expect_error
from triton_parallel_layers.parallel_layers import ParallelDims, vocab_parallel_cross_entropy
from triton_parallel_layers.parallel_layers.checks import debug_checks


def _loss_case(shape, vocab, ignore_index, label_smoothing, reduction, dtype, autocast=False):
    """Loss and logits gradient against F.cross_entropy; ``autocast``: both under bf16 autocast,
    where F.cross_entropy (an autocast fp32 op) returns fp32 and so must we."""
    dims = ParallelDims(tp=dist.get_world_size())
    context = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)  # noqa: E731
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
        with context():
            loss = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), **kw)
        loss = loss.reshape(shape) if reduction == "none" else loss
        dloss = torch.linspace(-1, 1, loss.numel()).reshape(loss.shape).to(loss.dtype)
        loss.backward(dloss)
        return loss.detach(), x.grad, dloss

    ref_loss, ref_grad, dloss = reference(logits)
    truth_loss, truth_grad, _ = reference(logits.float())

    shard = chunk(logits, -1).requires_grad_()
    with context():
        loss = vocab_parallel_cross_entropy(shard, target, dims.tp_group, **kw)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert loss.dtype == (torch.float32 if autocast else dtype)
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


@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", [1, 2])
def test_fp32_loss_under_autocast(dist_run, world_size, case):
    """bf16 logits under autocast: an fp32 loss, as F.cross_entropy gives (a bf16 loss was logged
    in steps of 1/64 on an H200: first loss 5.5000, val_loss 3.0000)."""
    dist_run(world_size, _loss_case, *case, torch.bfloat16, True)


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


def _chunks_grad_mode_and_memory_case():
    """Chunking the fp32 scratch changes nothing; without grad no gradient buffer is made; the
    in-place backward refuses a second pass; the peak is the one buffer the design allows."""
    from triton_parallel_layers.parallel_layers.cross_entropy import _default_chunk_size
    from triton_parallel_layers.parallel_layers.memory import LiveBytes

    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(1)
    n, vocab = 23, 4 * 24
    logits = 3 * torch.randn(n, vocab)
    target = torch.randint(0, vocab, (n,))
    target[::5] = -100
    for dtype, smoothing in [(torch.bfloat16, 0.0), (torch.float16, 0.2), (torch.float32, 0.1)]:
        shard = chunk(logits.to(dtype), -1)
        runs = []
        for size in (1, 5, n, None):
            x = shard.clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(
                x, target, dims.tp_group, label_smoothing=smoothing, chunk_size=size
            )
            loss.backward()
            runs.append((loss.detach(), x.grad))
        for loss, grad in runs[1:]:  # row-wise arithmetic: bit-equal whatever the chunking
            assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1]), dtype

        v_local, item = shard.shape[-1], shard.element_size()
        with torch.no_grad(), LiveBytes() as mem:
            loss = vocab_parallel_cross_entropy(shard, target, dims.tp_group, chunk_size=4)
        scratch = 4 * v_local * 4  # the fp32 scratch of 4 tokens, no gradient buffer
        assert mem.peak <= scratch + 64 * n, (mem.peak, scratch)

        x = shard.clone().requires_grad_()
        with LiveBytes() as mem:
            loss = vocab_parallel_cross_entropy(x, target, dims.tp_group)
            loss.backward(retain_graph=True)
        # one logits-sized buffer (the gradient, in the logits' dtype) + the fp32 chunk scratch
        # (none for fp32 logits) + per-token vectors
        buffer = n * v_local * item
        if dtype != torch.float32:
            buffer += _default_chunk_size(n, v_local) * v_local * 4
        assert buffer <= mem.peak <= buffer + 64 * n, (dtype, mem.peak, buffer)
        expect_error(RuntimeError, "modified by an inplace operation", loss.backward)
    expect_error(
        ValueError,
        r"chunk_size=0: expected a positive int",
        vocab_parallel_cross_entropy,
        shard,
        target,
        dims.tp_group,
        chunk_size=0,
    )


@pytest.mark.parametrize("world_size", [1, 2])
def test_chunks_grad_mode_and_memory(dist_run, world_size):
    dist_run(world_size, _chunks_grad_mode_and_memory_case)


def _peak_against_torch_case(n, vocab, dtype, label_smoothing):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import ce_memory

    return ce_memory.measure(n, vocab, dtype, label_smoothing)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_peak_memory_against_torch_cross_entropy(dist_run, world_size):
    """Item 6's claim, in exact bytes: the loss forward + backward peaks at most at
    F.cross_entropy's on the gathered logits (tp = 1), and at most its 1/tp shard fraction."""
    for case in [(64, 1024, "float32", 0.0), (64, 1024, "bfloat16", 0.1)]:
        for row in dist_run(world_size, _peak_against_torch_case, *case):
            assert row["ratio"] <= 1.0 / world_size, row
            assert row["analytic"] <= row["ours_peak"] <= row["analytic"] + 64 * 64, row
