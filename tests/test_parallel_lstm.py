"""ParallelLSTM against nn.LSTM, on gloo at TP = 1, 2, 4.

Every case builds the single-device ``nn.LSTM`` on every rank with the same seed, shards it with
``from_lstm``, runs both on the same input and compares the full-width output and final states
(whole on every rank), the input and initial-state gradients (whole), and this rank's rows of every
weight and bias gradient (:func:`gate_shard` of the reference's), within 1e-5 in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_close, expect_error, seeded
from triton_parallel_layers.parallel_layers import ParallelDims, ParallelLSTM, parallelize
from triton_parallel_layers.parallel_layers.lstm import gate_shard
from triton_parallel_layers.parallel_layers.sharding import (
    local_shard,
    param_blocks,
    param_sharding,
)

WORLD_SIZES = [1, 2, 4]


def _match_case(inp, hidden, layers, bias, batch_first, dropout, pass_state):
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    ref = nn.LSTM(inp, hidden, layers, bias=bias, batch_first=batch_first, dropout=dropout)
    ours = ParallelLSTM.from_lstm(copy.deepcopy(ref), dims.tp_group)
    batch, steps = 3, 5
    x = torch.randn((batch, steps, inp) if batch_first else (steps, batch, inp))
    h0, c0 = torch.randn(2, layers, batch, hidden)
    d_out = torch.randn((batch, steps, hidden) if batch_first else (steps, batch, hidden))
    d_h, d_c = torch.randn(2, layers, batch, hidden)

    results = []
    for module in (ref, ours):
        xs = [t.clone().requires_grad_() for t in (x, h0, c0)]
        torch.manual_seed(1)  # the same dropout masks
        out, (h_n, c_n) = module(xs[0], (xs[1], xs[2]) if pass_state else None)
        torch.autograd.backward([out, h_n, c_n], [d_out, d_h, d_c])
        values = {"out": out, "h_n": h_n, "c_n": c_n, "dx": xs[0].grad}
        if pass_state:
            values.update(dh0=xs[1].grad, dc0=xs[2].grad)
        for name, p in module.named_parameters():
            values["d" + name] = p.grad
        results.append({k: v.detach() for k, v in values.items()})
    theirs, mine = results
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        expected = theirs[name]
        if name.startswith(("dweight", "dbias")):
            expected = gate_shard(expected, dims.tp, dims.tp_rank)
        assert_close(value, expected, what=f"{name} at tp={dims.tp}")


CASES = [
    # input, hidden, layers, bias, batch_first, dropout, pass (h0, c0)
    (7, 20, 1, True, True, 0.0, True),  # 5 hidden units per rank at tp=4
    (6, 12, 3, True, False, 0.0, False),  # time-major, zero initial state
    (5, 8, 2, False, True, 0.5, True),  # no bias, dropout between the layers
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parallel_lstm_matches_nn_lstm(dist_run, world_size, case):
    dist_run(world_size, _match_case, *case)


def _init_parity_case(seed):
    """Built after the same seed, the shards equal nn.LSTM's gate rows; the generator agrees."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(seed)
    ref = nn.LSTM(7, 12, 2)
    after_ref = torch.rand(3)
    torch.manual_seed(seed)
    ours = ParallelLSTM(7, 12, 2, tp_group=dims.tp_group)
    after_ours = torch.rand(3)
    for (name, p), (ref_name, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert name == ref_name
        expected = gate_shard(q.detach(), dims.tp, dims.tp_rank)
        assert_close(p.detach(), expected, exact=True, what=name)
        # what initialization by name and the checkpoints use
        dim, parts, rank = param_sharding(ours, name)
        shard = local_shard(q.detach(), dim, parts, rank, param_blocks(ours))
        assert_close(p.detach(), shard, exact=True, what=f"{name} (sharding table)")
    assert_close(after_ours, after_ref, exact=True, what="generator state after init")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_initialization_parity(dist_run, world_size):
    dist_run(world_size, _init_parity_case, 7)


def _bad_input_case():
    dims = ParallelDims(tp=dist.get_world_size())
    g = dims.tp_group
    msg = expect_error(
        ValueError, r"hidden_size=10 is not divisible by the tensor-parallel size 4",
        ParallelLSTM, 3, 10, tp_group=g,
    )  # fmt: skip
    expect_error(ValueError, r"bidirectional=True is not supported",
                 ParallelLSTM.from_lstm, nn.LSTM(3, 8, bidirectional=True), g)  # fmt: skip
    expect_error(ValueError, r"proj_size=2 is not supported",
                 ParallelLSTM.from_lstm, nn.LSTM(3, 8, proj_size=2), g)  # fmt: skip
    expect_error(TypeError, r"expects an nn.LSTM, got GRU",
                 ParallelLSTM.from_lstm, nn.GRU(3, 8), g)  # fmt: skip
    expect_error(ValueError, r"dropout=1.5: expected a value in \[0, 1\)",
                 ParallelLSTM, 3, 8, tp_group=g, dropout=1.5)  # fmt: skip
    layer = ParallelLSTM(3, 8, 2, tp_group=g)
    expect_error(ValueError, r"last dim 4, expected input_size=3", layer, torch.randn(2, 5, 4))
    expect_error(ValueError, r"expected 3 dims \(B, T, I\)", layer, torch.randn(5, 3))
    expect_error(ValueError, r"h0 of shape \(1, 2, 8\): expected \(2, 2, 8\)", layer,
                 torch.randn(2, 5, 3), (torch.zeros(1, 2, 8), torch.zeros(2, 2, 8)))  # fmt: skip
    expect_error(ValueError, r"0: hidden_size=10 is not divisible by the tensor-parallel size 4",
                 parallelize, nn.Sequential(nn.LSTM(3, 10)), {"0": "lstm"}, g)  # fmt: skip
    # Every rank raised on its own; the group is still usable (nobody is stuck in a collective).
    x = torch.ones(1)
    dist.all_reduce(x, group=g)
    assert x.item() == dims.tp
    return msg


def test_bad_input_raises_on_every_rank(dist_run):
    messages = dist_run(4, _bad_input_case)
    assert len(set(messages)) == 1


def test_without_group_is_nn_lstm():
    """With no group: nn.LSTM's initialization and results (the fused cell's rounding aside)."""
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, 2, batch_first=True)
    torch.manual_seed(0)
    ours = ParallelLSTM(4, 6, 2)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    x = torch.randn(2, 3, 4)
    (out, (h, c)), (ref_out, (ref_h, ref_c)) = ours(x), ref(x)
    assert_close(out.detach(), ref_out.detach(), what="out")
    assert_close(h.detach(), ref_h.detach(), what="h_n")
    assert_close(c.detach(), ref_c.detach(), what="c_n")


def test_plan_style_lstm():
    """The plan style ``lstm`` refuses what ParallelLSTM does not implement, naming the module,
    and swaps a fitting nn.LSTM at tp = 1 for nothing (the model is returned as it is)."""
    model = nn.Sequential(nn.LSTM(3, 8, bidirectional=True), nn.LSTM(3, 8, proj_size=2))
    expect_error(
        ValueError, r"0: style 'lstm' supports unidirectional .* bidirectional=True",
        parallelize, model, {"*": "lstm"}, None,
    )  # fmt: skip
    expect_error(
        ValueError, r"1: style 'lstm' .* proj_size=2", parallelize, model, {"*": "lstm"}, None
    )
    plain = nn.Sequential(nn.LSTM(3, 8))
    assert parallelize(plain, {"0": "lstm"}, None) is plain and isinstance(plain[0], nn.LSTM)


def _model_case():
    """The LSTM language model parallelized by its plan, even with sequence_parallel=True as the
    default (the plan turns it off for its entries), gives the single-device loss."""
    from triton_parallel_layers.models.lstm import LSTM_TP_PLAN, LSTMLM, LSTMConfig

    dims = ParallelDims(tp=dist.get_world_size())
    config = LSTMConfig(vocab_size=50, n_layers=2, embed_dim=6, hidden_size=8, max_seq_len=8,
                        vocab_pad_multiple=8)  # fmt: skip
    ref = LSTMLM(config, seed=3)
    model = parallelize(LSTMLM(config, seed=3), LSTM_TP_PLAN, dims, sequence_parallel=True)
    ids = torch.randint(0, 50, (3, 8), generator=seeded(0))
    target = torch.randint(0, 50, (3, 8), generator=seeded(1))
    loss = model.loss(model(ids), target)
    assert_close(loss.detach(), ref.loss(ref(ids), target).detach(), what="loss")


@pytest.mark.parametrize("world_size", [2, 4])
def test_lstm_model_plan(dist_run, world_size):
    dist_run(world_size, _model_case)
