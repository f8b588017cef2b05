"""Pipeline parallelism on gloo: every schedule against one device, hybrid (dp, pp, tp), bad input,
measured bubble fractions and activation memory.

Parity: every rank builds the single-device model and the pipelined one from the same seed, trains
both for 5 SGD steps on the same batches (the pipeline in ``m`` microbatches, the reference on the
whole batch at once) and compares the loss of every step and, at the end, every parameter this
rank holds (its TP shard of the single-device parameter). fp32; tolerance normwise per tensor,
``max|ours - ref| <= RTOL * max|ref|`` with ``RTOL = 1e-5`` (measured: a few 1e-7; the
difference is the order in which the microbatches' gradient contributions are summed).

Bubble fractions are measured on stages of :class:`~triton_parallel_layers.parallel_layers.pipeline.TimedLayer`, whose
passes take a fixed wall time (a sleep), so four processes on a two-core machine behave like four
devices: the measured idle time is the schedule's, not CPU contention.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import device_type, expect_error, rel_err, seeded
from triton_parallel_layers.kernels.collectives import record_comm
from triton_parallel_layers.parallel_layers import ColumnParallelLinear, ParallelDims
from triton_parallel_layers.parallel_layers.parallelize import parallelize
from triton_parallel_layers.parallel_layers.pipeline import (
    ActivationMemoryTracker,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    TimedLayer,
    bubble_fraction,
    build_stages,
    gather_timelines,
    get_schedule,
    partition_layers,
    pipeline_parameters,
    render_ascii,
)
from triton_parallel_layers.parallel_layers.pipeline.schedules import _backward_from, _free_output
from triton_parallel_layers.parallel_layers.sharding import (
    local_shard,
    param_blocks,
    param_sharding,
)

RTOL = 1e-5
STEPS = 5
LR = 0.05
SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb-h1"]

GPT_CFG = dict(vocab_size=97, n_layers=6, n_heads=2, embed_dim=32, max_seq_len=16,
               vocab_pad_multiple=8, bias=True)  # fmt: skip
LSTM_CFG = dict(vocab_size=97, n_layers=4, embed_dim=12, hidden_size=16, max_seq_len=16,
                vocab_pad_multiple=8)  # fmt: skip
CNN_CFG = dict(
    in_channels=3, num_classes=10, width=4, num_stages=3, blocks_per_stage=2
)  # 10 layers
SEQ, IMAGE = 8, 8


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------
def _mlp(n_layers: int = 8, width: int = 16) -> nn.Module:
    """A stack of (deferrable) linear layers: ``(B, width) -> (B, width)``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(ColumnParallelLinear(width, width), nn.Tanh()) for _ in range(n_layers)]
    )
    model.pipeline_layers = lambda: list(model)
    model.loss = lambda out, target, tp_group=None: F.mse_loss(out, target)
    return model


def _small_cnn() -> nn.Module:
    """A CNN whose activations change shape from stage to stage (channels up, space down)."""
    torch.manual_seed(0)
    layers = [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),  # (B, 4, 8, 8)
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),  # (B, 8, 4, 4)
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),  # (B, 16, 2, 2)
        nn.Flatten(),  # (B, 64)
        nn.Linear(64, 10),  # (B, 10)
    ]
    model = nn.Sequential(*layers)
    model.pipeline_layers = lambda: list(model)
    model.loss = lambda out, target, tp_group=None: F.cross_entropy(out, target)
    return model


def _build(name: str, tp_group: dist.ProcessGroup | None = None) -> nn.Module:
    """The model ``name`` from seed 0, tensor-parallel over ``tp_group`` when it has 2+ ranks."""
    if name == "mlp":
        return _mlp()
    if name == "small_cnn":
        return _small_cnn()
    torch.manual_seed(0)
    if name == "gpt":
        from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig

        model, plan = GPT(GPTConfig(**GPT_CFG)), GPT_TP_PLAN
    elif name == "lstm":
        from triton_parallel_layers.models.lstm import LSTM_TP_PLAN, LSTMLM, LSTMConfig

        model, plan = LSTMLM(LSTMConfig(**LSTM_CFG)), LSTM_TP_PLAN
    else:
        from triton_parallel_layers.models.cnn import CNN_TP_PLAN, CNNConfig, ResNetCNN

        model, plan = ResNetCNN(CNNConfig(**CNN_CFG)), CNN_TP_PLAN
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        model = parallelize(model, plan, tp_group)
    return model


def _batch(name: str, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = seeded(1000 + step)
    if name in ("gpt", "lstm"):
        tokens = torch.randint(0, GPT_CFG["vocab_size"], (batch, SEQ + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]
    if name in ("cnn", "small_cnn"):
        x = torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)
        return x, torch.randint(0, 10, (batch,), generator=gen)
    return torch.randn(batch, 16, generator=gen), torch.randn(batch, 16, generator=gen)


def _param_errors(stages, ref_layers) -> dict[str, float]:
    """Normwise error of every parameter this rank holds against its shard of the reference."""
    errors = {}
    for stage in stages:
        start, _ = stage.layer_range
        for k, layer in enumerate(stage.layers):
            ref_layer = ref_layers[start + k]
            for mname, module in layer.named_modules():
                for pname, p in module.named_parameters(recurse=False):
                    full = getattr(ref_layer.get_submodule(mname), pname)
                    dim, parts, rank = param_sharding(module, pname)
                    expected = local_shard(full, dim, parts, rank, param_blocks(module))
                    errors[f"layer{start + k}.{mname}.{pname}"] = rel_err(p, expected)
    return errors


# ---------------------------------------------------------------------------------------------
# Parity: pipelined (x data x tensor parallel) training == one device
# ---------------------------------------------------------------------------------------------
def _parity(
    name: str, schedules: list[str], m: int, dp: int = 1, tp: int = 1, track_memory: bool = False
) -> dict:
    """Train ``name`` for STEPS steps under each schedule (measuring the activation memory of
    every step with ``track_memory``); return the worst errors per schedule."""
    pp = dist.get_world_size() // (dp * tp)
    dims = ParallelDims(dp=dp, pp=pp, tp=tp)
    batch = 2 * m * dp  # 2 samples per microbatch per replica
    out = {}
    for sched_name in schedules:
        cls = get_schedule(sched_name)
        v = 2 if sched_name == "interleaved" else 1
        ref = _build(name)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
        model = _build(name, dims.tp_group)
        layers = model.pipeline_layers()
        partition = partition_layers(layers, pp * v, "params")
        stages = build_stages(layers, partition, dims.pp_group, dp_group=dims.dp_group)
        schedule = cls(stages, m, model.loss, track_memory=track_memory)
        opt = torch.optim.SGD(pipeline_parameters(stages), lr=LR)
        ddp_calls = _count_ddp_reductions(stages)
        loss_err, calls = 0.0, []
        for step in range(STEPS):
            x, y = _batch(name, step, batch)
            lo, hi = dims.dp_rank * batch // dp, (dims.dp_rank + 1) * batch // dp
            before = ddp_calls[0]
            loss = schedule.step(x[lo:hi], y[lo:hi])
            calls.append(ddp_calls[0] - before)
            if dp > 1:  # the global batch's loss: the mean of the replicas'
                dist.all_reduce(loss, group=dims.dp_group)
                loss = loss / dp
            opt.step()
            opt.zero_grad()
            ref_loss = ref.loss(ref(x), y)
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            loss_err = max(loss_err, rel_err(loss, ref_loss.detach()))
        errors = _param_errors(stages, ref.pipeline_layers())
        worst = max(errors, key=errors.get)
        out[sched_name] = {
            "loss": loss_err,
            "param": errors[worst],
            "worst": worst,
            "ddp_calls": calls,
            "ddp_stages": sum(s.ddp is not None for s in stages),
            "final_loss": float(loss),
        }
    return out


def _count_ddp_reductions(stages) -> list[int]:
    """Count DDP's bucket all-reduces (a comm hook that counts, then runs the default one)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter = [0]
    for stage in stages:
        if stage.ddp is None:
            continue

        def hook(group, bucket):
            counter[0] += 1
            return allreduce_hook(group, bucket)

        stage.ddp.register_comm_hook(stage.dp_group, hook)
    return counter


def _check(results: list[dict], where: str) -> None:
    for rank, per_schedule in enumerate(results):
        for sched, r in per_schedule.items():
            assert r["loss"] <= RTOL, f"{where} {sched} rank {rank}: loss error {r['loss']:.2e}"
            assert r["param"] <= RTOL, (
                f"{where} {sched} rank {rank}: {r['worst']} error {r['param']:.2e}"
            )


@pytest.mark.parametrize("pp", [2, 4])
def test_mlp_and_shape_changing_cnn_parity(dist_run, pp):
    """Linear stacks (deferrable weight gradients) and a CNN whose activation shapes change
    between stages, under every schedule: the single-device losses and parameters."""
    m = 4
    for name in ("mlp", "small_cnn"):
        schedules = SCHEDULES if name == "mlp" or pp == 2 else SCHEDULES[:2] + SCHEDULES[3:]
        _check(dist_run(pp, _parity, name, schedules, m, timeout=180), f"{name} pp={pp}")


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("name", ["gpt", "cnn"])
def test_model_parity_every_schedule(dist_run, name, pp):
    """The GPT and the deep ResNet-style CNN (models/), 5 steps, pp = 2 and 4, every schedule
    (interleaved with 2 chunks per rank): the single-device losses and parameters."""
    pytest.importorskip(
        "triton_parallel_layers.models.gpt"
        if name == "gpt"
        else "triton_parallel_layers.models.cnn"
    )
    _check(dist_run(pp, _parity, name, SCHEDULES, 4, timeout=300), f"{name} pp={pp}")


def _hybrid(name: str, schedules: list[str] = SCHEDULES) -> dict:
    return _parity(name, schedules, 4, dp=2, tp=2)


def test_lstm_parity(dist_run):
    """The stacked-LSTM language model (models/lstm.py) matches one device: pp = 2 under every
    schedule, and (dp, pp, tp) = (2, 2, 2) (ParallelLSTM over tp, DDP over dp) under 1F1B and
    interleaved 1F1B."""
    _check(dist_run(2, _parity, "lstm", SCHEDULES, 4, timeout=300), "lstm pp=2")
    results = dist_run(8, _hybrid, "lstm", ["1f1b", "interleaved"], timeout=600)
    _check(results, "lstm (2,2,2)")


def test_hybrid_dp_pp_tp_222(dist_run):
    """(dp, pp, tp) = (2, 2, 2) on 8 processes: GPT and deep CNN under every schedule match one
    device; DDP reduces gradients once per step (one bucket all-reduce per DDP-wrapped chunk,
    not one per microbatch)."""
    pytest.importorskip("triton_parallel_layers.models.gpt")
    for name in ("gpt", "cnn"):
        results = dist_run(8, _hybrid, name, timeout=600)
        _check(results, f"{name} (2,2,2)")
        for rank, per_schedule in enumerate(results):
            for sched, r in per_schedule.items():
                assert r["ddp_stages"] >= 1
                assert r["ddp_calls"] == [r["ddp_stages"]] * STEPS, (
                    f"{name} {sched} rank {rank}: DDP reductions per step {r['ddp_calls']}, "
                    f"expected one per wrapped chunk ({r['ddp_stages']})"
                )


def _reshape_case() -> list[float]:
    """Shapes are exchanged once; after reset_shapes() a new microbatch shape works."""
    dims = ParallelDims(pp=dist.get_world_size())
    model = _small_cnn()
    layers = model.pipeline_layers()
    stages = build_stages(layers, partition_layers(layers, dims.pp), dims.pp_group)
    schedule = Schedule1F1B(stages, 2, model.loss)
    losses = [float(schedule.step(*_batch("small_cnn", 0, 4)))]
    schedule.reset_shapes()
    losses.append(float(schedule.step(*_batch("small_cnn", 1, 6))))
    ref = _small_cnn()
    expected = [float(ref.loss(ref(x), y)) for x, y in (_batch("small_cnn", s, b) for s, b in
                                                           ((0, 4), (1, 6)))]  # fmt: skip
    return [abs(a - b) for a, b in zip(losses, expected)]


def test_reset_shapes(dist_run):
    for errs in dist_run(2, _reshape_case):
        assert max(errs) < 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors on every rank, before anything is sent
# ---------------------------------------------------------------------------------------------
def _bad_inputs() -> dict[str, str]:
    dims = ParallelDims(pp=dist.get_world_size())
    pp = dims.pp
    model = _mlp(n_layers=pp)
    layers = model.pipeline_layers()
    messages = {}
    with record_comm() as ledger:
        messages["stages"] = expect_error(
            ValueError, "cannot fill", partition_layers, layers[: pp - 1], pp
        )
        stages = build_stages(layers, partition_layers(layers, pp), dims.pp_group)
        schedule = Schedule1F1B(stages, 4, model.loss)
        x, y = _batch("mlp", 0, 10)
        messages["batch"] = expect_error(
            ValueError, "not divisible by n_microbatches=4", schedule.step, x, y
        )
        messages["few"] = expect_error(
            ValueError, "too small for the interleaved", ScheduleInterleaved1F1B, stages, pp - 1,
            model.loss,
        )  # fmt: skip
        messages["multiple"] = expect_error(
            ValueError, "not a multiple of pp", ScheduleInterleaved1F1B, stages, pp + 1, model.loss
        )
    assert ledger.total_bytes == 0, f"something was sent before the error: {ledger}"
    # and the pipeline still works afterwards (nobody was left half-way through a step)
    loss = schedule.step(*_batch("mlp", 0, 8))
    return {**messages, "loss": float(loss)}


def test_bad_input_errors_on_every_rank(dist_run):
    results = dist_run(4, _bad_inputs)
    for key in ("stages", "batch", "few", "multiple"):
        assert len({r[key] for r in results}) == 1, f"{key}: the ranks' messages differ"
    assert "3 layers cannot fill 4 pipeline stages" in results[0]["stages"]
    assert "batch size 10" in results[0]["batch"]
    assert len({r["loss"] for r in results}) == 1  # every rank reports the same loss


# ---------------------------------------------------------------------------------------------
# Measured bubble fractions and activation memory
# ---------------------------------------------------------------------------------------------
UNIT_S = 0.004  # one stage's forward (= its dX = its dW) sleeps 4 ms


def _record_timelines(m: int) -> dict:
    dims = ParallelDims(pp=dist.get_world_size())
    pp = dims.pp
    out = {}
    for name in SCHEDULES:
        v = 2 if name == "interleaved" else 1
        torch.manual_seed(0)
        # 2 layers per rank, each half a unit: every rank does the same work under every schedule
        layers = [TimedLayer(8, UNIT_S / 2, UNIT_S / 2, UNIT_S / 2) for _ in range(2 * pp)]
        stages = build_stages(layers, partition_layers(layers, pp * v), dims.pp_group)
        schedule = get_schedule(name)(stages, m, F.mse_loss, record_timeline=True)
        for _ in range(2):  # the first step exchanges shapes; the second is the one kept
            schedule.step(torch.randn(m, 8), torch.randn(m, 8))
        timelines = gather_timelines(schedule.timeline, dims.pp_group)
        out[name] = {
            "ran": [(e.kind, e.microbatch, e.chunk) for e in schedule.timeline.compute()],
            "planned": [(a.kind, a.microbatch, a.chunk) for a in schedule.actions],
            "bubble": bubble_fraction(timelines),
            "ascii": render_ascii(timelines),
        }
    return out


def test_each_rank_runs_its_simulated_action_order(dist_run):
    """pp = 4, m = 8: every rank's recorded F/B/W events are its action list, in order, so the
    executor realizes the schedule whose bubble the simulator proves
    (tests/test_pipeline_schedules.py: GPipe and 1F1B at (p-1)/(m+p-1), interleaved and ZB-H1
    below). Measured bubble fractions are timing, so they are printed here and measured side by
    side with PyTorch's in ``bench/bench_pipeline.py``, not asserted."""
    pp, m = 4, 8
    results = dist_run(pp, _record_timelines, m, timeout=240)
    for rank, result in enumerate(results):
        for name, r in result.items():
            assert r["ran"] == r["planned"], f"rank {rank}, {name}: ran {r['ran']}"
    formula = (pp - 1) / (m + pp - 1)
    bubbles = {k: round(r["bubble"], 3) for k, r in results[0].items()}
    print(f"\nmeasured bubble fractions (pp={pp}, m={m}, 1F1B formula {formula:.3f}): {bubbles}")
    print(results[0]["zb-h1"]["ascii"])


def _measure_memory(ms: list[int]) -> dict:
    dims = ParallelDims(pp=dist.get_world_size())
    torch.manual_seed(0)
    width = 64
    # stages end in a linear layer, whose output autograd does not save (as a transformer
    # block's residual sum): what a stage keeps of it is the root of its backward
    layers = [
        nn.Sequential(nn.Tanh(), ColumnParallelLinear(width, width)) for _ in range(2 * dims.pp)
    ]
    stages = build_stages(layers, partition_layers(layers, dims.pp), dims.pp_group)
    out = {}
    for name in ("gpipe", "1f1b", "zb-h1"):
        for free in (True, False):
            for m in ms:
                schedule = get_schedule(name)(
                    stages, m, F.mse_loss, track_memory=True, free_outputs=free
                )
                schedule.step(torch.randn(4 * m, width), torch.randn(4 * m, width))
                out[(name, m, free)] = schedule.peak_activation_bytes
                out[("sends", name, m, free)] = schedule.peak_pending_sends
                for p in pipeline_parameters(stages):
                    p.grad = None
    stages = build_stages(layers, partition_layers(layers, 2 * dims.pp), dims.pp_group)
    for m in ms:
        schedule = ScheduleInterleaved1F1B(stages, m, F.mse_loss, track_memory=True)
        schedule.step(torch.randn(4 * m, width), torch.randn(4 * m, width))
        out[("sends", "interleaved", m, True)] = schedule.peak_pending_sends
    return out


def test_activation_memory_1f1b_bounded_gpipe_grows(dist_run):
    """Peak activation bytes held for backward per rank (pp = 4, 4 samples of width 64 per
    microbatch; what autograd saved, the stage inputs and outputs kept for the backward, send
    buffers): GPipe's grow with m, 1F1B's stay at p microbatches' worth; freeing each sent output
    once its send completes (``free_outputs``, the default) lowers 1F1B's peak on every rank that
    sends activations; no rank holds more than one group of sends."""
    ms = [4, 8, 16]
    results = dist_run(4, _measure_memory, ms, timeout=120)
    out_bytes = 4 * 64 * 4  # one microbatch's stage output
    per_mb = (results[0][("gpipe", 8, True)] - results[0][("gpipe", 4, True)]) / 4
    print(f"\npeak activation bytes per rank, pp=4 (one microbatch's output {out_bytes} B):")
    for name in ("gpipe", "1f1b", "zb-h1"):
        for free in (False, True):
            print(f"  {name:6s} free_outputs={free!s:5s}",
                  {m: [r[(name, m, free)] for r in results] for m in ms})  # fmt: skip
    sends = {k[1:]: max(r[k] for r in results) for k in results[0] if k[0] == "sends"}
    print("  send buffers held at once, most over the ranks:", sends)
    for m in ms:
        # GPipe keeps every microbatch until its backward: linear in m
        assert results[0][("gpipe", m, True)] == pytest.approx(
            results[0][("gpipe", 4, True)] + (m - 4) * per_mb, rel=0.01
        )
        for rank, r in enumerate(results):
            # 1F1B: bounded by GPipe's with p = 4 microbatches, whatever m
            assert r[("1f1b", m, True)] == r[("1f1b", 4, True)] <= r[("gpipe", 4, True)]
            before, after = r[("1f1b", m, False)], r[("1f1b", m, True)]
            if rank < 3:  # it sends activations: the sent outputs' storage is freed
                assert after < before, (rank, before, after)
            else:
                assert after == before
    assert all(n <= 2 for n in sends.values()), sends


# ---------------------------------------------------------------------------------------------
# Schedules side by side on one machine: printed, for the docs
# ---------------------------------------------------------------------------------------------
def test_parity_while_tracking_memory(dist_run):
    """Measuring the activation memory changes no number: the stages end in a ReLU, whose output
    autograd saves, and each sent output is freed (``free_outputs``); the memory hooks must keep
    what autograd saved, not the output object whose data the freeing replaces (they did, and
    every rank that sends activations got wrong gradients in a tracked step)."""
    _check(dist_run(2, _parity, "small_cnn", SCHEDULES, 4, track_memory=True), "tracked pp=2")


def test_memory_hooks_keep_a_freed_outputs_saved_data():
    """One process: an output saved by autograd under the tracker's hooks, then freed as the
    schedule frees a sent output, still gives the backward its data."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 16), nn.ReLU())  # ReLU saves its output
    x, grad = torch.randn(2, 16), torch.randn(2, 16)
    tracker = ActivationMemoryTracker(layer.parameters())
    with tracker.hooks():
        y = layer(x)
    assert tracker.current == 2 * 2 * 16 * 4  # the Linear's input and the ReLU's output
    _free_output(y)
    assert y.numel() == 1
    _backward_from(y, grad)
    tracked = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).backward(grad)
    for got, want in zip(tracked, (p.grad for p in layer.parameters())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_render_schedules():
    text = ScheduleGPipe.render(2, 4)
    assert text.splitlines()[1].startswith("rank 0 | F0 F1 F2 F3")


def test_deferred_linear_under_autocast_matches_nn_linear():
    """Forward under bf16 autocast, backward outside it (PyTorch's recommended pattern), weight
    gradient deferred to a W pass: the same numbers as nn.Linear under autocast."""
    from triton_parallel_layers.parallel_layers.weight_grad import (
        WeightGradStore,
        deferrable_linear,
        split_weight_grad,
    )

    torch.manual_seed(0)
    lin, ref = nn.Linear(8, 4), nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with split_weight_grad(), torch.autocast(device_type(), dtype=torch.bfloat16):
        y = deferrable_linear(x, lin.weight, lin.bias)
    with torch.autocast(device_type(), dtype=torch.bfloat16):
        y_ref = ref(x_ref)
    store = WeightGradStore()
    with store.capture():
        y.float().sum().backward()
    assert lin.weight.grad is None  # deferred to the W pass
    store.flush()
    y_ref.float().sum().backward()
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(
        lin.bias.grad, ref.bias.grad
    )
