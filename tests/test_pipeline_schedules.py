"""Pipeline pieces that need no process group: the schedules' action lists (checked by
simulation), partitioning, deferred weight gradients, and a whole pipeline on one rank (every
chunk on the same process, handed over in memory) against the plain model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import expect_error, seeded
from triton_parallel_layers.parallel_layers import ColumnParallelLinear, RowParallelLinear
from triton_parallel_layers.parallel_layers.pipeline import (
    SCHEDULES,
    PipelineStage,
    ScheduleInterleaved1F1B,
    ScheduleZBH1,
    TimedLayer,
    WeightGradStore,
    build_stages,
    deferrable_linear,
    gpipe_actions,
    ideal_bubble_fraction,
    interleaved_actions,
    one_f_one_b_actions,
    partition_layers,
    pipeline_parameters,
    render_ascii,
    simulate,
    split_weight_grad,
    validate_actions,
    zb_h1_actions,
)

PPS = [1, 2, 3, 4, 5]
MS = [1, 2, 3, 4, 5, 7, 8, 12]


# ---------------------------------------------------------------------------------------------
# Action lists
# ---------------------------------------------------------------------------------------------
def _in_flight(actions, until: str) -> list[int]:
    """Per rank, the most microbatches whose F has run and whose ``until`` has not."""
    peaks = []
    for acts in actions:
        live, peak = 0, 0
        for a in acts:
            live += (a.kind == "F") - (a.kind == until)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("m", MS)
def test_gpipe_and_1f1b_lists(pp, m):
    for gen in (gpipe_actions, one_f_one_b_actions):
        actions = gen(pp, m)
        validate_actions(actions, m)  # each action once, no deadlock
        bubble = ideal_bubble_fraction(simulate(actions))
        assert bubble == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert _in_flight(gpipe_actions(pp, m), "B") == [m] * pp
    assert _in_flight(one_f_one_b_actions(pp, m), "B") == [min(pp - r, m) for r in range(pp)]


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("m", MS)
def test_zb_h1_list(pp, m):
    actions = zb_h1_actions(pp, m)
    validate_actions(actions, m, split_backward=True)
    bubble = ideal_bubble_fraction(simulate(actions))  # F = B = W = 1
    one_f_one_b = ideal_bubble_fraction(simulate(one_f_one_b_actions(pp, m)))
    if m >= pp:  # the paper's (p - 1)(F + B - W) idle per rank
        assert bubble == pytest.approx((pp - 1) / (3 * m + pp - 1), abs=1e-12)
    assert bubble <= one_f_one_b + 1e-12
    if pp > 1:
        assert bubble < one_f_one_b
    # 1F1B's activations until B; no rank holds more than p microbatches until their W
    assert _in_flight(actions, "B") == _in_flight(one_f_one_b_actions(pp, m), "B")
    assert max(_in_flight(actions, "W")) <= pp


@pytest.mark.parametrize("pp", [1, 2, 3, 4])
@pytest.mark.parametrize("v", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_interleaved_list(pp, v, groups):
    m = groups * pp
    actions = interleaved_actions(pp, m, v)
    validate_actions(actions, m, v)
    # with each chunk costing 1/v of a stage, the bubble is about 1/v of 1F1B's
    bubble = ideal_bubble_fraction(simulate(actions, v=v, costs={"F": 1 / v, "B": 2 / v, "W": 0}))
    assert bubble == pytest.approx((pp - 1) / (v * m + pp - 1), abs=1e-12)


def test_interleaved_bad_microbatch_counts():
    expect_error(ValueError, r"n_microbatches=3 is too small .* pp=4", interleaved_actions, 4, 3, 2)
    expect_error(ValueError, r"n_microbatches=6 is not a multiple of pp=4", interleaved_actions,
                 4, 6, 2)  # fmt: skip
    expect_error(ValueError, r"num_chunks=0", interleaved_actions, 4, 4, 0)


def test_simulate_detects_deadlock():
    actions = one_f_one_b_actions(2, 2)
    actions[1] = actions[1][::-1]  # rank 1 wants B1 first
    expect_error(ValueError, "deadlock", simulate, actions)


def test_render_ascii():
    text = render_ascii(simulate(one_f_one_b_actions(2, 4)), unit=1.0)
    assert text.splitlines() == [
        "rank 0 | F0 F1 .  .  B0 -  F2 B1 -  F3 B2 -  .  B3 -",
        "rank 1 | .  F0 B0 -  F1 B1 -  F2 B2 -  F3 B3 -  .  .",
    ]
    assert "B0 W0" in ScheduleZBH1.render(2, 4)
    assert "F0.1" in ScheduleInterleaved1F1B.render(2, 4, 2)


# ---------------------------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------------------------
def _widths_mlp(widths: list[int]) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]


def test_partition_by_params_balances():
    layers = _widths_mlp([8, 64, 8, 8, 8, 8, 64, 8])  # two heavy layer pairs
    part = partition_layers(layers, 2, "params")
    assert part.bounds == ((0, 3), (3, 7))
    assert part.num_stages == 2 and part.num_layers == 7
    assert part.costs == (sum(p.numel() for la in layers[:3] for p in la.parameters()),
                          sum(p.numel() for la in layers[3:] for p in la.parameters()))  # fmt: skip
    report = part.report(pp=2)
    assert "stage  0  rank 0 chunk 0  layers [  0,   3)" in report
    # equal layers split evenly; a single stage holds everything
    assert partition_layers(_widths_mlp([8] * 9), 4).bounds == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert partition_layers(layers, 1).bounds == ((0, 7),)


def test_partition_by_flops_and_time():
    layers = _widths_mlp([16, 16, 16, 256, 16])  # the 3rd and 4th layers are 16x the work
    x = torch.randn(4, 16)
    part = partition_layers(layers, 2, "flops", sample_input=x)
    assert part.bounds == ((0, 3), (3, 4))
    assert part.costs[0] == 2 * 4 * (16 * 16 * 2 + 16 * 256)  # 2 FLOPs per multiply-add
    timed = partition_layers(layers, 2, "time", sample_input=x)
    assert timed.num_stages == 2 and timed.method == "time"
    expect_error(ValueError, "needs a sample_input", partition_layers, layers, 2, "flops")


def test_partition_explicit_and_errors():
    layers = _widths_mlp([8] * 7)  # 6 layers
    assert partition_layers(layers, 3, [1, 3, 2]).bounds == ((0, 1), (1, 4), (4, 6))
    expect_error(ValueError, r"6 layers cannot fill 7 pipeline stages", partition_layers,
                 layers, 7)  # fmt: skip
    expect_error(ValueError, r"sum to 5, expected 6", partition_layers, layers, 3, [1, 2, 2])
    expect_error(ValueError, r"expected 3 positive layer counts", partition_layers, layers, 3,
                 [3, 3])  # fmt: skip
    expect_error(ValueError, r"method='bytes'", partition_layers, layers, 3, "bytes")
    expect_error(TypeError, r"num_stages=2.0", partition_layers, layers, 2.0)


# ---------------------------------------------------------------------------------------------
# Deferred weight gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_deferrable_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(13, 17, bias=bias)
    x = torch.randn(2, 5, 13, requires_grad=True)
    dy = torch.randn(2, 5, 17)
    ref(x).backward(dy)
    expected = {"dx": x.grad.clone(), "dw": ref.weight.grad.clone()}
    if bias:
        expected["db"] = ref.bias.grad.clone()

    lin = copy.deepcopy(ref)
    lin.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_()
    assert deferrable_linear(x2, lin.weight, lin.bias).grad_fn.name() != "_DeferrableLinearBackward"
    with split_weight_grad():
        y = deferrable_linear(x2, lin.weight, lin.bias)
    store = WeightGradStore()
    with store.capture():
        y.backward(dy)
    torch.testing.assert_close(x2.grad, expected["dx"])
    assert lin.weight.grad is None and len(store) == 1
    assert store.held_bytes == (x2.numel() + dy.numel()) * 4
    assert store.flush() == 1 and store.held_bytes == 0
    torch.testing.assert_close(lin.weight.grad, expected["dw"])
    if bias:
        torch.testing.assert_close(lin.bias.grad, expected["db"])

    # no store capturing: everything at once (a split forward outside a pipeline still trains)
    lin.zero_grad(set_to_none=True)
    with split_weight_grad():
        y = deferrable_linear(x.detach(), lin.weight, lin.bias)
    y.backward(dy)
    torch.testing.assert_close(lin.weight.grad, expected["dw"])


def test_parallel_linear_layers_defer():
    """ColumnParallelLinear / RowParallelLinear (one rank) defer dW under the split."""
    torch.manual_seed(0)
    col = ColumnParallelLinear(8, 12)
    row = RowParallelLinear(12, 8)
    x = torch.randn(3, 8)
    ref = (copy.deepcopy(col), copy.deepcopy(row))
    ref[1](ref[0](x).relu()).sum().backward()
    with split_weight_grad():
        y = row(col(x).relu())
    store = WeightGradStore()
    with store.capture():
        y.sum().backward()
    assert col.weight.grad is None and row.weight.grad is None and len(store) == 2
    store.flush()
    for ours, theirs in zip((col, row), ref):
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


def test_timed_layer_gradients():
    torch.manual_seed(0)
    layer = TimedLayer(6, 0.0, 0.0, 0.0)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = layer.weight.detach()
    torch.testing.assert_close(x.grad, 2 * x.detach() * w * w)
    torch.testing.assert_close(layer.weight.grad, (2 * x.detach() ** 2 * w).sum(0))


# ---------------------------------------------------------------------------------------------
# A whole pipeline on one rank (pp = 1): every schedule, chunks handed over in memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_one_rank_pipeline_matches_model(name):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(ColumnParallelLinear(8, 8), nn.GELU()) for _ in range(4)])
    ref = copy.deepcopy(model)
    v = 2 if name == "interleaved" else 1
    layers = list(model)
    stages = build_stages(layers, partition_layers(layers, v))
    assert all(isinstance(s, PipelineStage) for s in stages) and len(stages) == v
    schedule = SCHEDULES[name](stages, 4, F.mse_loss, record_timeline=True, track_memory=True)
    opt = torch.optim.SGD(pipeline_parameters(stages), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        gen = seeded(step)
        x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
        loss = schedule.step(x, y)
        opt.step()
        opt.zero_grad()
        ref_loss = F.mse_loss(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    kinds = {e.kind for e in schedule.timeline.events}
    assert {"F", "B"} <= kinds and ("W" in kinds) == (name == "zb-h1")
    assert schedule.peak_activation_bytes > 0


def test_stage_and_schedule_argument_errors():
    layers = [nn.Linear(4, 4) for _ in range(4)]
    stages = build_stages(layers, partition_layers(layers, 2))  # 2 chunks on one rank
    expect_error(ValueError, "runs one chunk per rank", SCHEDULES["1f1b"], stages, 2, F.mse_loss)
    expect_error(TypeError, "n_microbatches=2.5", SCHEDULES["interleaved"], stages, 2.5,
                 F.mse_loss)  # fmt: skip
    expect_error(TypeError, "loss_fn=None", SCHEDULES["interleaved"], stages, 2, None)
    expect_error(ValueError, "stage_index=3, num_stages=2", PipelineStage, layers[0], 3, 2)
    schedule = SCHEDULES["interleaved"](stages, 2, F.mse_loss)
    expect_error(ValueError, "needs the batch size on every rank", schedule.step)
    expect_error(ValueError, "batch sizes disagree", schedule.step, torch.zeros(4, 4),
                 torch.zeros(6, 4))  # fmt: skip
