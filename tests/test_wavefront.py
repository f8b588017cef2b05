"""The time-chunked (wavefront) pipeline of stacked LSTM layers against one device, on gloo.

Every rank builds the single-device stack (``nn.LSTM`` with ``2 p`` layers) from the same seed and
keeps its two layers as its stage; the pipeline runs one step over ``n`` time chunks and the loss,
the input gradient (first stage) and every parameter gradient (this stage's layers) are compared
with the single-device step, within 1e-5 (fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import assert_close, expect_error
from triton_parallel_layers.kernels.collectives import record_comm
from triton_parallel_layers.parallel_layers.pipeline.wavefront import (
    WavefrontPipeline,
    wavefront_bubble_fraction,
)

E, H, PER_STAGE = 5, 6, 2  # input width, hidden size, layers per stage


def _stage_of(ref: nn.LSTM, k: int) -> nn.LSTM:
    """Layers ``[2k, 2k+2)`` of ``ref`` as a 2-layer ``nn.LSTM`` (their weights copied)."""
    stage = nn.LSTM(E if k == 0 else H, H, PER_STAGE, batch_first=True)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            base, layer = name.rsplit("_l", 1)
            p.copy_(getattr(ref, f"{base}_l{PER_STAGE * k + int(layer)}"))
    return stage


def _case(batch: int, length: int, num_chunks: int) -> None:
    p, k = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    ref = nn.LSTM(E, H, PER_STAGE * p, batch_first=True)
    x = torch.randn(batch, length, E)
    target = torch.randn(batch, length, H)

    xr = x.clone().requires_grad_()
    ref_loss = F.mse_loss(ref(xr)[0], target)
    ref_loss.backward()

    stage = _stage_of(ref, k)
    pipe = WavefrontPipeline(stage, dist.group.WORLD, num_chunks, F.mse_loss)
    xs = x.clone().requires_grad_()
    with record_comm() as ledger:
        loss = pipe.step(xs, target)
    assert_close(loss, ref_loss.detach(), what="loss")
    # every stage but the last sends its output (B, T, H) forward, every stage but the first its
    # input gradient (B, T, H) back, chunk by chunk; the last stage broadcasts the fp32 loss
    sends = (k < p - 1) + (k > 0)
    assert ledger.bytes_sent["send"] == sends * batch * length * H * 4
    assert ledger.calls["send"] == sends * num_chunks
    assert ledger.bytes_sent["broadcast"] == round(4 * (p - 1) / p)  # the ring figure
    if k == 0:
        assert_close(xs.grad, xr.grad, what="input gradient")
    for name, q in stage.named_parameters():
        base, layer = name.rsplit("_l", 1)
        expected = getattr(ref, f"{base}_l{PER_STAGE * k + int(layer)}").grad
        assert_close(q.grad, expected, what=f"stage {k} {name}")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("batch, length, num_chunks", [(1, 10, 3), (3, 8, 4), (2, 5, 1)])
def test_wavefront_matches_one_device(dist_run, world_size, batch, length, num_chunks):
    dist_run(world_size, _case, batch, length, num_chunks)


def _bad_input_case() -> str:
    stage = nn.LSTM(E, H, batch_first=True)
    msg = expect_error(ValueError, r"sequence length 2 is shorter than num_chunks=3",
                       WavefrontPipeline(stage, dist.group.WORLD, 3, F.mse_loss).step,
                       torch.randn(1, 2, E), torch.randn(1, 2, H))  # fmt: skip
    expect_error(ValueError, r"must be batch-first", WavefrontPipeline,
                 nn.LSTM(E, H), dist.group.WORLD, 2, F.mse_loss)  # fmt: skip
    x = torch.ones(1)
    dist.all_reduce(x)  # nobody is left in a collective
    return msg


def test_bad_input_raises_on_every_rank(dist_run):
    assert len(set(dist_run(2, _bad_input_case))) == 1


def test_bubble_fraction():
    assert wavefront_bubble_fraction(4, 1) == 3 / 4  # one chunk: no overlap at all
    assert wavefront_bubble_fraction(4, 12) == 3 / 15
    assert wavefront_bubble_fraction(1, 5) == 0.0
