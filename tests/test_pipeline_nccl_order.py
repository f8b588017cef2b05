"""The pipeline schedules' point-to-point traffic completes under NCCL's rule (issue 12).

* Computed (:func:`~triton_parallel_layers.parallel_layers.pipeline.p2p_check.planned_groups`):
  every schedule at pp = 2..8, m = 1..16 where the schedule accepts it, 1 to 4 chunks for the
  interleaved one, the first step (shapes exchanged) and later ones: all complete. The order the
  schedules posted before (each receive alone before its action, each send alone after it)
  deadlocks for 1F1B, interleaved 1F1B and ZB-H1, as the issue's replay found.
* Recorded on gloo (``bench/check_nccl_order.py``): every schedule at pp = 2, 3, 4 with
  m = 1, pp, pp + 1, 2 pp (where accepted), interleaved with 2 chunks, and the (dp, pp, tp) =
  (2, 2, 2) hybrid with tensor-parallel stages and DDP: every case completes, and each pipeline's
  recorded groups are exactly the computed ones.
* Every tensor a stage sends or receives is on the stage's device, which comes from the mesh
  (``PipelineStage.device``), also for stages without parameters.
* The training engine's evaluation and sampling (the forward-only schedule) complete under the
  rule too, all batched, and give one device's results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import seeded
from triton_parallel_layers.parallel_layers.pipeline import SCHEDULES
from triton_parallel_layers.parallel_layers.pipeline.actions import action_messages
from triton_parallel_layers.parallel_layers.pipeline.p2p_check import (
    op,
    planned_groups,
    replay_nccl,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import check_nccl_order  # noqa: E402


def _cases(pps, ms):
    for name, cls in SCHEDULES.items():
        for pp in pps:
            for m in ms:
                for v in (2, 3, 4) if name == "interleaved" else (1,):
                    try:
                        cls.check(pp, m, v)
                    except ValueError:
                        continue
                    yield name, pp, m, v


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_planned_orders_complete(name):
    n = 0
    for sched, pp, m, v in _cases([2, 3, 4, 5, 6, 8], range(1, 17)):
        if sched != name:
            continue
        actions = SCHEDULES[name].build_actions(pp, m, v)
        for first_step in (True, False):
            replay = replay_nccl(planned_groups(actions, v, first_step=first_step))
            assert replay.ok, f"{name} pp={pp} m={m} v={v} first={first_step}\n{replay.report()}"
            n += 1
    assert n >= 100


def _lone_groups(actions, v):
    """The order before issue 12 with ``lookahead=0``: each receive alone right before its
    action, each send alone right after it."""
    pp = len(actions)
    out = []
    for r, acts in enumerate(actions):
        groups = []
        for a in acts:
            recv, send = action_messages(a, r, pp, pp * v)
            if recv is not None:
                groups.append([op("recv", recv.src(pp))])
            if send is not None:
                groups.append([op("send", send.dst(pp))])
        out.append(groups)
    return out


def test_previous_order_deadlocks_as_the_issue_found():
    found = {}
    for name in SCHEDULES:
        for pp in (2, 4):
            v = 2 if name == "interleaved" else 1
            actions = SCHEDULES[name].build_actions(pp, 2 * pp, v)
            found[(name, pp)] = replay_nccl(_lone_groups(actions, v)).completes
    assert found == {(name, pp): name == "gpipe" for name in SCHEDULES for pp in (2, 4)}, found


def _print(rows):
    print("\n" + check_nccl_order.table(rows))
    bad = [r for r in rows if not r["completes"] or not r["planned"]]
    assert not bad, "\n".join(f"{r['schedule']} m={r['m']}: {r['report']}" for r in bad)


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_recorded_schedules_complete(dist_run, pp):
    rows = check_nccl_order.check_layout(dist_run, 1, pp, 1)
    assert {r["schedule"] for r in rows} == set(SCHEDULES)
    assert {r["m"] for r in rows if r["schedule"] == "1f1b"} == {1, pp, pp + 1, 2 * pp}
    _print(rows)


def test_recorded_hybrid_222_completes(dist_run):
    """(dp, pp, tp) = (2, 2, 2): tensor-parallel stages (their all-reduces are not p2p) under
    DDP; the p2p of all 8 ranks, every schedule, m = 1 (where accepted), 2, 3, 4."""
    rows = check_nccl_order.check_layout(dist_run, 2, 2, 2)
    assert len({r["schedule"] for r in rows}) == len(SCHEDULES)
    _print(rows)


# ---------------------------------------------------------------------------------------------
# Every tensor on the stage's device, from the mesh (also a stage without parameters)
# ---------------------------------------------------------------------------------------------
def test_stage_device_comes_from_the_mesh_not_the_parameters():
    import torch
    from torch import nn

    from triton_parallel_layers.parallel_layers.pipeline import PipelineStage, Schedule1F1B

    # no parameters at all, on a device this machine may not have: nothing is allocated yet
    stage = PipelineStage(nn.Tanh(), 0, 1, device="cuda:0")
    schedule = Schedule1F1B(stage, 2, torch.nn.functional.mse_loss)
    assert stage.device == schedule.device == schedule.transport.device == torch.device("cuda:0")
    assert stage.shared.device == torch.device("cuda:0")
    # parameters on meta do not decide it either: no process group -> the CPU
    with torch.device("meta"):
        lin = nn.Linear(4, 4)
    assert PipelineStage(lin, 0, 1).device == torch.device("cpu")


def _paramless_stage_run(schedule: str) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from triton_parallel_layers.parallel_layers import ParallelDims
    from triton_parallel_layers.parallel_layers.pipeline import (
        build_stages,
        get_schedule,
        partition_layers,
    )
    from triton_parallel_layers.parallel_layers.pipeline.p2p_check import record_p2p

    dims = ParallelDims(pp=dist.get_world_size())
    torch.manual_seed(0)
    # the middle stages have no parameters
    layers = [nn.Linear(4, 4)] + [nn.Tanh() for _ in range(dims.pp - 2)] + [nn.Linear(4, 4)]
    stages = build_stages(layers, partition_layers(layers, dims.pp), dims.pp_group)
    sched = get_schedule(schedule)(stages, 2, F.mse_loss)
    with record_p2p() as log:
        loss = sched.step(torch.randn(4, 4), torch.randn(4, 4))
    return {
        "device": str(stages[0].device),
        "expected": str(dims.device),
        "has_params": any(True for s in stages for _ in s.parameters()),
        "posted": sorted({o.device for g in log.groups for o in g}),
        "groups": log.groups,
        "loss_device": str(loss.device),
        "grad": [float(p.grad.abs().sum()) for s in stages for p in s.parameters()],
    }


def test_stage_without_parameters_on_the_mesh_device(dist_run):
    for schedule in ("1f1b", "zb-h1"):
        results = dist_run(3, _paramless_stage_run, schedule)
        assert [r["has_params"] for r in results] == [True, False, True]
        replay = replay_nccl([r["groups"] for r in results])
        assert replay.ok, replay.report()
        for r in results:
            assert r["device"] == r["expected"] == r["loss_device"]
            assert r["posted"] == [r["device"]], r["posted"]  # headers, activations, gradients
        assert all(g > 0 for r in results for g in r["grad"])  # gradients crossed the middle


# ---------------------------------------------------------------------------------------------
# The training engine's evaluation and sampling: the forward-only schedule, same transport
# ---------------------------------------------------------------------------------------------
ENGINE_GPT = dict(vocab_size=256, n_layers=4, n_heads=2, embed_dim=32, max_seq_len=16,
                  vocab_pad_multiple=8, bias=True)  # fmt: skip


def _build_gpt():
    from triton_parallel_layers.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**ENGINE_GPT), seed=0)


def _engine_eval_and_sample(pp: int, tp: int, schedule: str, chunks: int) -> dict:
    import torch
    import torch.distributed as dist

    from triton_parallel_layers.models.gpt import GPT_TP_PLAN, GPTConfig
    from triton_parallel_layers.parallel_layers import ParallelDims
    from triton_parallel_layers.parallel_layers.pipeline.p2p_check import record_p2p
    from triton_parallel_layers.training.config import ParallelConfig
    from triton_parallel_layers.training.engine import build_engine
    from triton_parallel_layers.training.tasks import sample_text

    dims = ParallelDims(pp=pp, tp=tp)
    parallel = ParallelConfig(pp=pp, tp=tp, schedule=schedule, microbatches=2, chunks=chunks)
    engine = build_engine(_build_gpt, GPT_TP_PLAN, dims, parallel)
    gen = seeded(0)
    tokens = torch.randint(0, 256, (4, 13), generator=gen)
    with record_p2p() as eval_log:
        losses = [float(engine.eval_loss(tokens[:, :-1], tokens[:, 1:])) for _ in range(2)]
    with record_p2p() as sample_log:
        text = sample_text(engine, GPTConfig(**ENGINE_GPT), "ab", 5, temperature=0.0)
    # after evaluation, training still works (the forward-only transport is separate)
    loss = float(engine.train_step(tokens[:, :-1], tokens[:, 1:]))
    ref = None
    if dist.get_rank() == 0:  # the single-device model from the same seed
        with torch.device("meta"):
            model = _build_gpt()
        model.to_empty(device=torch.get_default_device())
        model.init_weights()
        with torch.no_grad():
            ref_loss = float(model.loss(model(tokens[:, :-1]), tokens[:, 1:]))
        ids = list(b"ab")
        with torch.no_grad():
            for _ in range(5):
                logits = model(torch.tensor([ids[-16:]]))[0, -1, :256]
                ids.append(int(logits.argmax()))
        ref = {"loss": ref_loss, "text": bytes(ids).decode("utf-8", errors="replace")}
    return {
        "eval": eval_log.groups,
        "sample": sample_log.groups,
        "losses": losses,
        "text": text,
        "train_loss": loss,
        "ref": ref,
    }


@pytest.mark.parametrize(
    "pp,tp,schedule,chunks", [(2, 1, "1f1b", 1), (4, 1, "1f1b", 1), (2, 2, "interleaved", 2)]
)
def test_engine_eval_and_sampling_traffic(dist_run, pp, tp, schedule, chunks):
    """Evaluation (two batches, 2 microbatches each) and sampling (5 tokens, one microbatch, a
    longer sequence every call) at pp = 2 and 4 and (pp, tp) = (2, 2) with 2 chunks per rank:
    the p2p of every call completes under NCCL's rule, and the results equal one device's."""
    pytest.importorskip("triton_parallel_layers.models.gpt")
    results = dist_run(pp * tp, _engine_eval_and_sample, pp, tp, schedule, chunks, timeout=300)
    for what in ("eval", "sample"):
        logs = [r[what] for r in results]
        assert sum(len(g) for g in logs) > 0
        replay = replay_nccl(logs)
        assert replay.ok, f"{what}: {replay.report()}"
        # the forward-only traffic is batched too: no lone blocking send/recv any more
        assert {o.api for g in logs for grp in g for o in grp} == {"batch_isend_irecv"}
    ref = results[0]["ref"]
    for r in results:
        assert r["losses"] == pytest.approx([ref["loss"]] * 2, rel=1e-5)
        assert r["text"] == ref["text"]
        assert r["train_loss"] == pytest.approx(ref["loss"], rel=1e-5)
