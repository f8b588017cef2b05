"""The planner: the model profile against analytic counts, the cost model's closed forms against
the pipeline simulator, the plan's ranking and errors, and Narayanan et al. 2021's Table 1."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from triton_parallel_layers.models.cnn import CNN_TP_PLAN, CNNConfig, ResNetCNN
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig
from triton_parallel_layers.parallel_layers.planner import (
    HARDWARE,
    HardwareSpec,
    Layout,
    ModelProfile,
    estimate,
    plan_parallelism,
    profile_model,
)
from triton_parallel_layers.parallel_layers.planner.cost import (
    _pipeline_time,
    in_flight,
    in_flight_by_rank,
)
from triton_parallel_layers.parallel_layers.planner.megatron import (
    NARAYANAN_2021,
    gpt_profile,
    published_layout_estimate,
)
from triton_parallel_layers.parallel_layers.planner.profile import _fixed_part

B, S, E, HEADS, LAYERS = 2, 32, 64, 4, 3


@pytest.fixture(scope="module")
def gpt_profile_small():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, n_layers=LAYERS, n_heads=HEADS, embed_dim=E,
                          max_seq_len=S, vocab_pad_multiple=4))  # fmt: skip
    return profile_model(model, torch.zeros(B, S, dtype=torch.long), plan=GPT_TP_PLAN)


def test_profile_counts_the_gemms_and_collectives_of_a_block(gpt_profile_small):
    p = gpt_profile_small
    assert [layer.name.split("[")[0] for layer in p.layers] == (
        ["GPTEmbedding"] + ["GPTBlock"] * LAYERS + ["GPTHead"]
    )
    block = p.layers[1]
    # QKV, projection, MLP (4E hidden), scores and values: 24 b s E^2 + 4 b s^2 E
    assert block.matmul_flops == 24 * B * S * E * E + 4 * B * S * S * E
    assert block.params == 12 * E * E + 2 * E  # GEMM weights and two LayerNorm weights (no biases)
    # Two column-parallel inputs (QKV, fc1) and two row-parallel outputs (proj, fc2), bf16.
    assert block.tp_collectives == 4
    assert block.tp_in_bytes == block.tp_out_bytes == 2 * B * S * E * 2
    assert block.out_bytes == B * S * E * 2
    assert 0 < block.sharded_saved_bytes < block.saved_bytes
    assert 0 < block.sharded_other_bytes < block.other_bytes
    head = p.layers[-1]
    assert head.matmul_flops == 2 * B * S * E * 100  # the vocabulary (100 is padded already)
    assert p.tokens_per_sample == S and p.batch == B
    assert p.tp_divides["blocks.0.attn num_heads"] == HEADS


def test_profile_of_a_cnn_and_errors():
    torch.manual_seed(0)
    model = ResNetCNN(CNNConfig(width=8, num_stages=2, blocks_per_stage=1, num_classes=10))
    p = profile_model(model, torch.zeros(2, 1, 28, 28), plan=CNN_TP_PLAN, dtype="fp32")
    assert p.tokens_per_sample == 1 and p.num_layers == len(model.pipeline_layers())
    assert sum(layer.matmul_flops for layer in p.layers) > 0
    assert any(layer.tp_collectives for layer in p.layers)
    with pytest.raises(TypeError, match="has no pipeline_layers"):
        profile_model(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="dtype='fp8'"):
        profile_model(model, torch.zeros(2, 1, 28, 28), dtype="fp8")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zb-h1"])
@pytest.mark.parametrize("pp,m", [(2, 4), (3, 6), (4, 8), (4, 12)])
def test_closed_forms_match_the_action_lists(schedule, pp, m, monkeypatch):
    v = 2 if schedule == "interleaved" else 1
    counted = in_flight(schedule, pp, m, v)
    by_rank = in_flight_by_rank(schedule, pp, m, v)
    import triton_parallel_layers.parallel_layers.planner.cost as cost

    monkeypatch.setattr(cost, "SIMULATE_LIMIT", 0)  # force the closed forms
    assert cost.in_flight(schedule, pp, m, v) == counted == max(by_rank)
    if schedule != "interleaved":  # (interleaved's closed form is rank 0's on every rank)
        assert cost.in_flight_by_rank(schedule, pp, m, v) == by_rank
    f, b, w = 1.0, 1.5, 0.5
    analytic, _ = cost._pipeline_time(schedule, pp, m, v, f, b, w, comm=0.0)
    monkeypatch.setattr(cost, "SIMULATE_LIMIT", 10**9)
    simulated, _ = cost._pipeline_time(schedule, pp, m, v, f, b, w, comm=0.0)
    assert analytic == pytest.approx(simulated, rel=1e-9)


class _TwoLinears(nn.Sequential):
    def pipeline_layers(self) -> list[nn.Module]:
        return list(self)


@pytest.mark.parametrize("rows", [1, 3])
def test_timed_profile_records_the_fixed_parts(rows):
    """``time_layers=True`` times each layer at the sample's rows and at a second count (half
    of them; two, the sample repeated, for one row), the loss after the last layer."""
    model = _TwoLinears(nn.Linear(8, 16), nn.Linear(16, 4))
    loss = (nn.functional.mse_loss, torch.zeros(rows, 4))
    p = profile_model(model, torch.randn(rows, 8), dtype="fp32", time_layers=True, repeats=1,
                      loss=loss)  # fmt: skip
    for layer in p.layers:
        assert 0 <= layer.fixed_forward_seconds <= layer.forward_seconds < layer.seconds
        assert 0 <= layer.fixed_seconds <= layer.seconds
    assert ModelProfile.from_json(p.to_json()).layers == p.layers


def test_fixed_part_is_the_intercept_of_the_line_through_two_timings():
    assert _fixed_part((4, 2), (1.0 + 4 * 0.5, 1.0 + 2 * 0.5)) == pytest.approx(1.0)
    assert _fixed_part((1, 2), (3.0, 3.0)) == 3.0  # no growth with the rows: all fixed
    assert _fixed_part((4, 2), (4.0, 1.0)) == 0.0  # noise puts the intercept below 0
    assert _fixed_part((4, 2), (2.0, 2.5)) == 2.0  # ... or above the smaller time


def test_measured_fixed_part_is_paid_whole_by_every_tp_rank_and_microbatch(gpt_profile_small):
    """The cost model shrinks only the part of a measured pass that grows with the rows: with tp
    and with smaller microbatches. A profile without fixed parts (saved before they were
    measured) loads, and scales the whole pass."""
    hw = HARDWARE["h100"]

    def compute(profile, tp=1, m=1):
        est = estimate(profile, hw, Layout(1, 1, tp, schedule="none", microbatches=m,
                                           micro_batch_size=B // m))  # fmt: skip
        return est.compute_time - est.tp_comm_time

    def timed(fixed_share):
        return dataclasses.replace(gpt_profile_small, layers=[
            dataclasses.replace(layer, seconds=3e-3, forward_seconds=1e-3,
                                fixed_seconds=3e-3 * fixed_share,
                                fixed_forward_seconds=1e-3 * fixed_share)
            for layer in gpt_profile_small.layers])  # fmt: skip

    whole = compute(timed(1.0))
    assert whole == pytest.approx(LAYERS * 3e-3 + 2 * 3e-3)  # the measured passes, nothing else
    assert compute(timed(1.0), tp=2) == pytest.approx(whole)  # overhead only: tp gains nothing
    assert compute(timed(1.0), m=2) == pytest.approx(2 * whole)  # ... and each microbatch pays
    none = timed(0.0)
    assert compute(none, tp=2) < 0.8 * whole  # all proportional: tp divides what it shards
    assert compute(none, m=2) == pytest.approx(whole)
    half = compute(timed(0.5), tp=2)
    assert half == pytest.approx((whole + compute(none, tp=2)) / 2)
    # a profile saved before the fixed parts were measured: they load as None, all proportional
    data = json.loads(timed(0.0).to_json())
    for layer in data["layers"]:
        del layer["fixed_seconds"], layer["fixed_forward_seconds"]
    old = ModelProfile.from_json(json.dumps(data))
    assert old.layers[0].fixed_seconds is None
    assert compute(old, tp=2) == pytest.approx(compute(none, tp=2))


def test_sequence_parallel_backward_gathers_the_inputs_again(gpt_profile_small):
    """Per block and step: without SP an all-reduce of the outputs (forward) and of the input
    gradients (backward); with SP all-gather + reduce-scatter each way, plus the backward's
    second all-gather of the column-parallel inputs. On a ring an all-reduce costs an all-gather
    and a reduce-scatter, each ``(n-1)`` steps of ``1/n`` of the tensor: 5 against 4."""
    blocks = dataclasses.replace(gpt_profile_small, layers=gpt_profile_small.layers[1:-1],
                                 shared_params=[])  # fmt: skip

    def comm(sp: bool) -> float:
        layout = Layout(1, 1, 2, sequence_parallel=sp, schedule="none", micro_batch_size=B)
        return estimate(blocks, HARDWARE["h100"], layout).tp_comm_time

    assert comm(True) == pytest.approx(5 / 4 * comm(False))


def test_pipeline_time_single_stage_has_no_bubble():
    assert _pipeline_time("none", 1, 4, 1, 1.0, 2.0, 0.0, 0.0) == (12.0, 0.0)


def test_plan_ranks_feasible_layouts_and_says_why_others_are_out(gpt_profile_small):
    result = plan_parallelism(gpt_profile_small, "h100", world_size=8, global_batch=16)
    times = [e.step_time for e in result.ranked]
    assert times == sorted(times) and result.best is result.ranked[0]
    for e in result.ranked:
        lay = e.layout
        assert lay.dp * lay.pp * lay.tp == 8
        assert lay.dp * lay.microbatches * lay.micro_batch_size == 16
        assert HEADS % lay.tp == 0 and lay.pp <= LAYERS + 2
    reasons = [reason for _, reason in result.rejected]
    assert any("tp=8 does not divide" in r for r in reasons)
    assert "layout" in result.table(3) and len(result.table(3).splitlines()) == 5


def test_plan_errors_say_what_would_fit(gpt_profile_small):
    with pytest.raises(ValueError, match=r"smallest peak is .* GB"):
        plan_parallelism(gpt_profile_small, "h100", 4, 8, memory_limit=1e3)
    # 32 ranks: tp <= 4 heads leaves pp >= 8 > 5 pipeline layers with a global batch of 1.
    with pytest.raises(
        ValueError, match=r"world size 32 .*pp=8 > 5 pipeline layers.*: 20 \(fewer ranks\)"
    ):
        plan_parallelism(gpt_profile_small, "h100", 32, 1)
    with pytest.raises(ValueError, match="world_size=0"):
        plan_parallelism(gpt_profile_small, "h100", 0, 8)
    with pytest.raises(ValueError, match="hardware 'tpu'"):
        plan_parallelism(gpt_profile_small, "tpu", 4, 8)


def test_more_memory_per_rank_needs_fewer_ranks_per_replica(gpt_profile_small):
    """Sharding shows in the estimate: tp=2 holds about half the parameter state of tp=1."""
    hw = HARDWARE["h100"]
    one = estimate(gpt_profile_small, hw, Layout(1, 1, 1, schedule="none", microbatches=1,
                                                 micro_batch_size=2))  # fmt: skip
    two = estimate(gpt_profile_small, hw, Layout(1, 1, 2, schedule="none", microbatches=1,
                                                 micro_batch_size=2))  # fmt: skip
    assert two.peak_memory < 0.7 * one.peak_memory
    assert two.tp_comm_time > 0 == one.tp_comm_time


def test_hardware_spec_round_trips_and_checks(tmp_path):
    spec = HARDWARE["a100"]
    path = tmp_path / "a100.json"
    spec.to_json(path)
    assert HardwareSpec.from_json(path) == spec
    with pytest.raises(ValueError, match="matmul_efficiency=1.5"):
        spec.with_nodes(matmul_efficiency=1.5)


@pytest.mark.parametrize("cfg", NARAYANAN_2021, ids=lambda c: f"{c.params_b:g}B")
def test_megatron_table1_published_layout_within_15_percent(cfg):
    """The published layout (its dp, pp, tp; microbatch size and schedule the planner's best for
    it), costed on the A100 spec with recomputation, predicts the paper's achieved TFLOP/s per
    GPU within 15%."""
    best = published_layout_estimate(cfg)
    assert best is not None
    assert best.model_flops_per_gpu / 1e12 == pytest.approx(cfg.tflops_per_gpu, rel=0.15)


def test_megatron_planner_picks_at_least_the_published_layout_at_1024_gpus():
    cfg = next(c for c in NARAYANAN_2021 if c.gpus == 1024)
    result = plan_parallelism(gpt_profile(cfg), "a100", cfg.gpus, cfg.batch, recompute=(True,),
                              sequence_parallel=(False,), bytes_per_param=18)  # fmt: skip
    published = [
        e for e in result.ranked
        if (e.layout.dp, e.layout.pp, e.layout.tp) == (cfg.dp, cfg.pp, cfg.tp)
    ]  # fmt: skip
    assert published, "the published layout must be among the feasible ones"
    assert result.best.step_time <= min(e.step_time for e in published)


def test_layout_auto_trains_with_the_planners_choice(dist_run, tmp_path):
    """``--layout auto`` on 4 gloo processes: profiles, measures, plans, trains; the choice is
    in the summary and is a layout of 4 ranks the GPT accepts."""
    from test_training import GPT_TINY, _main

    out = tmp_path / "auto"
    args = [*GPT_TINY, "--layout", "auto", "--max-steps", "2", "--out", str(out)]
    results = dist_run(4, _main, "gpt", args, timeout=300)
    assert [r["code"] for r in results] == [0] * 4, results[0]["err"]
    assert "--layout auto:" in results[0]["out"] and "chosen:" in results[0]["out"]
    summary = json.loads((out / "summary.json").read_text())
    plan = summary["layout_plan"]
    assert summary["layout"] == plan["chosen"] and plan["feasible"] >= 1
    dp, pp, tp = (int(part.split("=")[1]) for part in plan["chosen"].split(" (")[0].split())
    assert dp * pp * tp == 4


def _measured_spec() -> str:
    from triton_parallel_layers.parallel_layers.planner.measure import profile_hardware

    return profile_hardware(gemm_size=128, message_bytes=(1 << 10, 1 << 16), repeats=2).to_json()


def test_profile_hardware_gives_every_rank_the_same_spec(dist_run):
    """Every rank plans from rank 0's measurements: ranks planning from their own noisy timings
    could choose different layouts and then wait for each other."""
    specs = dist_run(2, _measured_spec)
    assert specs[0] == specs[1]
    spec = HardwareSpec.from_json(specs[0])
    assert spec.peak_flops["fp32"] > 0 and spec.memory_bandwidth > 0
    fits = spec.measured["collectives"]
    assert set(fits) == {"all_reduce", "all_gather", "reduce_scatter", "p2p"}
    assert all(f["2"]["beta"] > 0 and f["2"]["alpha"] >= 0 for f in fits.values())


BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import bench_planner_cpu

    return bench_planner_cpu


def _bench_measure(cases: list[tuple[str, dict]], sizes: dict) -> dict:
    """Every rank: the bench's measurement of ``cases`` (plain data, so any worker unpickles it)."""
    bench = _bench()
    layouts = [(w, Layout(**fields)) for w, fields in cases]
    hw = dict(gemm_size=64, message_bytes=(1 << 10, 1 << 14), repeats=1)
    return bench._measure_world(layouts, bench.Sizes(**sizes), 1, 1, 0, hw)


def test_bench_planner_cpu_measures_what_it_predicts(dist_run, tmp_path):
    """bench_planner_cpu's machinery on three tiny layouts of 2 ranks (TP with sequence
    parallelism, a 1F1B pipeline, DP with gradient accumulation): well-formed rows, summary,
    table and plot, and the peak memory the planner predicts equal to the exact measurement
    (parameters, gradients, AdamW state, the peak of activations held for backward) within 10%.
    Step times are reported, not asserted (the machine is shared)."""
    bench = _bench()
    sizes = bench.Sizes(gpt_layers=2, gpt_embed=64, gpt_seq=16, cnn_width=8, cnn_blocks=1,
                        cnn_batch=8)  # fmt: skip
    b = {w: bench.global_batch(w, sizes) for w in ("gpt", "cnn")}
    cases = [
        ("gpt", Layout(1, 1, 2, sequence_parallel=True, schedule="none", microbatches=1,
                       micro_batch_size=b["gpt"])),
        ("cnn", Layout(1, 2, 1, schedule="1f1b", microbatches=2, micro_batch_size=b["cnn"] // 2)),
        ("gpt", Layout(2, 1, 1, schedule="none", microbatches=2, micro_batch_size=b["gpt"] // 4)),
    ]  # fmt: skip
    measured = dist_run(2, _bench_measure, [(w, dataclasses.asdict(lay)) for w, lay in cases],
                        dataclasses.asdict(sizes), timeout=300)[0]  # fmt: skip
    spec = bench.median_spec([HardwareSpec.from_json(h) for h in measured["hardware"]])
    assert "all_reduce" in spec.measured["collectives"] and spec.measured["optimizer_s_per_param"]
    rows = []
    for (w, lay), meas in zip(cases, measured["rows"]):
        texts = measured["profiles"][f"{w}/{lay.micro_batch_size}"]
        profile = bench.median_profile([ModelProfile.from_json(t) for t in texts])
        assert all(layer.seconds > 0 for layer in profile.layers)
        rows.append(bench.compare(w, 2, lay, meas, profile, spec))
    for row in rows:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0 and row["samples"] == 1
        mem = row["measured_memory"]
        assert mem["params"] > 0 and mem["grads"] == mem["params"]
        assert mem["optimizer"] >= 2 * mem["params"] and mem["activations"] > 0
        assert abs(row["memory_error"]) <= 0.10, row
    summary = bench.summarize(rows)
    assert summary["layouts"] == 3 and -1 <= summary["spearman"] <= 1
    assert [c["layouts"] for c in summary["choices"]] == [2]  # the two GPT layouts
    result = {"rows": rows, "summary": {"all": summary}, "meta": {
        "machine": "test", "torch": torch.__version__, "date": "-", "load_before": 0.0,
        "load_after": 0.0, "command": "-"}}  # fmt: skip
    assert bench.markdown(result).count("\n| gpt | 2 |") == 2
    bench.plot(rows, result["summary"], tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 0
