"""FSDP2 (``--dp-shard fsdp``) over the dp axis, with TP and with the pipeline schedules, on gloo.

Parity: from the same seed and batches, five AdamW steps under FSDP2 give the losses and the
(gathered) parameters of the same layout under DDP. Checkpoints written FSDP-sharded load at
other layouts, DDP or FSDP. ZB-H1 refuses FSDP with a clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers import expect_error
from triton_parallel_layers.kernels.collectives import all_gather

_GPT = dict(vocab_size=96, n_layers=4, n_heads=4, n_kv_heads=2, embed_dim=64, max_seq_len=16,
            vocab_pad_multiple=8)  # fmt: skip
STEPS, BATCH = 5, 8


def _build_gpt():
    from triton_parallel_layers.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**_GPT), seed=5)


def _engine(dp_shard: str, **layout):
    from triton_parallel_layers.models.gpt import GPT_TP_PLAN
    from triton_parallel_layers.parallel_layers import ParallelDims
    from triton_parallel_layers.training.config import OptimConfig, ParallelConfig
    from triton_parallel_layers.training.engine import build_engine
    from triton_parallel_layers.training.trainer import _make_optimizer

    dims_kw = {k: layout[k] for k in ("dp", "pp", "tp") if k in layout}
    parallel = ParallelConfig(dp_shard=dp_shard, **layout)
    engine = build_engine(_build_gpt, GPT_TP_PLAN, ParallelDims(**dims_kw), parallel)
    return engine, _make_optimizer(engine, OptimConfig(), lr=3e-3)


@torch.no_grad()
def _full(engine, t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The single-device tensor of a parameter (or of its optimizer state) ``t``."""
    local = t.detach()
    if isinstance(t, DTensor):  # FSDP: torch.chunk(tp_shard, dp, 0), the last chunks padded
        # (gathered over the dp group object: DTensor.full_tensor() resolves the group by its
        # name, which intermittently failed here once several meshes had been built)
        rows, dp = t.shape[0], engine.dims.dp
        per = -(-rows // dp)
        shard = t.to_local()
        padded = shard.new_zeros((per, *t.shape[1:]))
        padded[: shard.shape[0]] = shard
        gathered = padded.new_empty((per * dp, *t.shape[1:]))
        dist.all_gather_into_tensor(gathered, padded, group=engine.dims.dp_group)
        local = gathered[:rows]
    return local if dim is None else all_gather(local.contiguous(), engine.dims.tp_group, dim)


def _train(dp_shard: str, layout: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine, optimizer = _engine(dp_shard, **layout)
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, _GPT["vocab_size"], (BATCH, 17), generator=gen)
    mine = tokens.chunk(engine.dims.dp)[engine.dims.dp_rank]
    losses = []
    for _ in range(STEPS):  # one batch, again and again: the loss must fall
        loss = engine.train_step(mine[:, :-1], mine[:, 1:])
        engine.clip_grad_norm_(0.5, loss)  # small enough to clip: the FSDP norm is checked too
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {p.name: _full(engine, p.param, p.dim) for p in engine.params}


LAYOUTS = [
    dict(dp=2, tp=2, microbatches=2, sequence_parallel=True),
    dict(dp=2, pp=2, schedule="gpipe", microbatches=2),
    dict(dp=2, pp=2, schedule="1f1b", microbatches=4),
    dict(dp=2, pp=2, schedule="interleaved", microbatches=2),
]


def _parity_case(layout: dict) -> None:
    ddp_losses, ddp_params = _train("ddp", layout)
    fsdp_losses, fsdp_params = _train("fsdp", layout)
    assert fsdp_params.keys() == ddp_params.keys()
    torch.testing.assert_close(fsdp_losses, ddp_losses, rtol=1e-5, atol=1e-6)
    assert ddp_losses[-1] < ddp_losses[0]  # it trains
    for name, p in ddp_params.items():
        torch.testing.assert_close(fsdp_params[name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_fsdp_equals_ddp_over_five_steps(dist_run, layout):
    dist_run(4, _parity_case, layout, timeout=300)


def _checkpoint_case(root: str) -> None:
    from triton_parallel_layers.parallel_layers.checkpoint import (
        init_optimizer_state_,
        load_checkpoint,
        model_state,
        optimizer_state,
        save_checkpoint,
    )

    def state(engine, optimizer):
        mesh = engine.dims.tp_mesh
        return {
            **model_state(engine.params, mesh),
            **optimizer_state(optimizer, engine.params, mesh),
        }

    def full_state(engine, optimizer):
        out = {}
        for p in engine.params:
            out[p.name] = _full(engine, p.param, p.dim)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{p.name}/{key}"] = _full(engine, optimizer.state[p.param][key], p.dim)
        return out

    engine, optimizer = _engine("fsdp", dp=2, tp=2)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, _GPT["vocab_size"], (4, 17), generator=gen)
    engine.train_step(tokens[:, :-1], tokens[:, 1:])
    optimizer.step()
    saved = full_state(engine, optimizer)
    path = save_checkpoint(root, 1, state(engine, optimizer), {"step": 1})

    others = [("ddp", dict(dp=4)), ("ddp", dict(pp=2, tp=2)), ("fsdp", dict(dp=4)),
              ("fsdp", dict(dp=2, pp=2))]  # fmt: skip
    for shard, layout in others:
        engine, optimizer = _engine(shard, **layout)
        init_optimizer_state_(optimizer)
        load_checkpoint(path, state(engine, optimizer))
        loaded = full_state(engine, optimizer)
        assert loaded.keys() <= saved.keys() and len(loaded) > 0
        for name, t in loaded.items():
            assert torch.equal(t, saved[name]), (shard, layout, name)


def test_fsdp_checkpoint_loads_at_other_layouts(dist_run, tmp_path):
    dist_run(4, _checkpoint_case, str(tmp_path), timeout=300)


def _zb_h1_case() -> None:
    from triton_parallel_layers.parallel_layers import ParallelDims
    from triton_parallel_layers.parallel_layers.pipeline import ScheduleZBH1, build_stages
    from triton_parallel_layers.parallel_layers.pipeline.partition import partition_layers
    from triton_parallel_layers.training.config import ParallelConfig

    expect_error(
        ValueError,
        r"--dp-shard=fsdp does not run the zb-h1 schedule: its deferred weight-gradient",
        ParallelConfig,
        dp=2,
        pp=2,
        schedule="zb-h1",
        microbatches=4,
        dp_shard="fsdp",
    )
    dims = ParallelDims(dp=2, pp=2)
    layers = [torch.nn.Linear(8, 8) for _ in range(4)]
    stages = build_stages(
        layers, partition_layers(layers, 2, "params"), dims.pp_group, dp_mesh=dims.dp_mesh
    )
    assert "FSDP over 2" in repr(stages[0])
    expect_error(
        ValueError,
        r"the zb-h1 schedule cannot run FSDP-sharded stages",
        ScheduleZBH1,
        stages,
        4,
        lambda out, target: out.sum(),
    )
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == 4


def test_zb_h1_refuses_fsdp_on_every_rank(dist_run):
    dist_run(4, _zb_h1_case)


def _bytes_case() -> list[dict]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import fsdp_memory

    rows = []
    for dp, tp in [(4, 1), (2, 2)]:
        for mode in ("ddp", "fsdp"):
            rows.append(fsdp_memory.measure(mode, dp, tp, _build_gpt, _GPT["max_seq_len"]))
    return rows


def test_per_rank_bytes_are_the_analytic_share(dist_run):
    """FSDP's parameters, gradients and AdamW state per rank are exactly each TP shard's dim-0
    chunk on this dp rank (1/dp of DDP's up to uneven chunks), and add up to DDP's over dp. The
    step's data-parallel bytes in the comm ledger (FSDP2's all-gathers and reduce-scatters, DDP's
    all-reduce) are the analytic count."""
    rows = [r for ranks in zip(*dist_run(4, _bytes_case, timeout=300)) for r in ranks]
    for r in rows:
        assert r["param_bytes"] == r["analytic_param_bytes"], r
        assert r["grad_bytes"] == r["param_bytes"], r
        assert r["optimizer_bytes"] == r["analytic_optimizer_bytes"], r
        if r["dp_shard"] == "fsdp" or r["tp"] == 1:
            assert r["dp_comm_bytes"] == r["analytic_dp_comm_bytes"] > 0, r
    for dp, tp in [(4, 1), (2, 2)]:
        for tp_rank in range(tp):
            fsdp = [r for r in rows if (r["dp"], r["tp"], r["dp_shard"]) == (dp, tp, "fsdp")]
            fsdp = [r for r in fsdp if r["rank"] % tp == tp_rank]
            ddp = [r for r in rows if (r["dp"], r["tp"], r["dp_shard"]) == (dp, tp, "ddp")]
            ddp = [r for r in ddp if r["rank"] % tp == tp_rank]
            assert sum(r["param_bytes"] for r in fsdp) == ddp[0]["param_bytes"]
            assert max(r["param_bytes"] for r in fsdp) <= 1.05 * ddp[0]["param_bytes"] / dp
