"""``parallelize`` on models it does not know, from user-written plans; plan errors on every rank."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_close, chunk, expect_error
from triton_parallel_layers.parallel_layers import (
    ColumnParallelLinear,
    ParallelDims,
    ParallelSelfAttention,
    RowParallelLinear,
    parallelize,
)
from triton_parallel_layers.parallel_layers.init import init_by_name_
from triton_parallel_layers.parallel_layers.parallelize import match_plan
from triton_parallel_layers.parallel_layers.sequence_parallel import (
    SequenceParallelLayerNorm,
    allreduce_sequence_parallel_grads,
)
from triton_parallel_layers.parallel_layers.sharding import param_sharding


def _mlp() -> nn.Sequential:
    """A user's model: two residual-free MLP layers and a LayerNorm, in an nn.Sequential."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16))


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """Normwise: ``max|actual - expected| <= rtol * max|expected|`` (reductions cross ranks)."""
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    assert err <= rtol, f"{what}: normwise relative error {err:.3g} > {rtol}"


def _check_grads(par: nn.Module, ref: nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    for mname, module in par.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            dim, parts, rank = param_sharding(module, pname)
            full = ref_params[f"{mname}.{pname}"].grad
            local = full if dim is None else full.chunk(parts, dim)[rank]
            _close(p.grad, local, f"{mname}.{pname} grad")


def _user_mlp_case(sequence_parallel: bool) -> None:
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    ref = _mlp()
    plan = {"0": "colwise", "2": "rowwise", "3": "sequence_parallel"}
    par = parallelize(copy.deepcopy(ref), plan, dims, sequence_parallel=sequence_parallel)
    if dims.tp > 1:
        assert isinstance(par[0], ColumnParallelLinear) and isinstance(par[2], RowParallelLinear)
        assert isinstance(par[3], SequenceParallelLayerNorm) == sequence_parallel
    x, dy = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    y_ref = ref(x)
    y_ref.backward(dy)
    x_local = chunk(x, 1) if sequence_parallel else x  # (B, S/tp, E) under SP
    y = par(x_local)
    y.backward(chunk(dy, 1) if sequence_parallel else dy)
    allreduce_sequence_parallel_grads(par)  # under SP, the LayerNorm's: summed over the TP group
    _close(y.detach(), chunk(y_ref.detach(), 1) if sequence_parallel else y_ref.detach(), "output")
    _check_grads(par, ref)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("world_size", [2, 4])
def test_user_mlp_from_a_user_plan(dist_run, world_size, sequence_parallel):
    dist_run(world_size, _user_mlp_case, sequence_parallel)


class _Net(nn.Module):
    """Nested user modules: wildcards select the same layer in every block; MHA and a tie."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 32)
        self.layers = nn.ModuleList(  # head dim 16: the attention kernel's smallest
            nn.ModuleDict({"attn": nn.MultiheadAttention(32, 2, batch_first=True),
                           "up": nn.Linear(32, 48), "down": nn.Linear(48, 32)})
            for _ in range(2)
        )  # fmt: skip
        self.out = nn.Linear(32, 32, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer["attn"](x, x, x, need_weights=False)[0]
            x = x + layer["down"](torch.relu(layer["up"](x)))
        return self.out(x)


NET_PLAN = {
    "embed": "vocab",
    "layers.*.attn": {"style": "attention", "causal": False},
    "layers.*.up": "colwise",
    "layers.*.down": "rowwise",
    "out": {"style": "colwise", "gather_output": True},
}


def _nested_case() -> None:
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    ref = _Net()
    par = parallelize(copy.deepcopy(ref), NET_PLAN, dims)
    assert isinstance(par.layers[1]["attn"], ParallelSelfAttention)
    assert par.out.weight is par.embed.weight  # re-tied: both hold rows chunk(V, tp)[rank]
    ids = torch.randint(0, 32, (2, 6))
    y_ref, y = ref(ids), par(ids)
    _close(y.detach(), y_ref.detach(), "logits")
    y_ref.square().sum().backward()
    y.square().sum().backward()
    _close(par.embed.weight.grad, chunk(ref.embed.weight.grad, 0), "tied grad")
    _close(
        par.layers[0]["down"].weight.grad, chunk(ref.layers[0]["down"].weight.grad, 1), "down grad"
    )


def test_nested_model_with_wildcards_mha_and_a_tie(dist_run):
    dist_run(2, _nested_case)


def _meta_user_case() -> None:
    """A user model built on meta, parallelized, materialized and initialized by name holds the
    shards of the same model initialized by name on one device."""
    dims = ParallelDims(tp=dist.get_world_size())

    def init_fn(name, module, shape, gen):
        return torch.randn(shape, generator=gen)

    full = _mlp()
    init_by_name_(full, 3, init_fn)
    with torch.device("meta"):
        model = _mlp()
    model = parallelize(model, {"0": "colwise", "2": "rowwise"}, dims)
    model.to_empty(device=torch.get_default_device())
    init_by_name_(model, 3, init_fn)
    assert_close(model[0].weight.detach(), chunk(full[0].weight.detach(), 0), exact=True)
    assert_close(model[0].bias.detach(), chunk(full[0].bias.detach(), 0), exact=True)
    assert_close(model[2].weight.detach(), chunk(full[2].weight.detach(), 1), exact=True)
    assert_close(model[2].bias.detach(), full[2].bias.detach(), exact=True)


def test_meta_build_of_a_user_model(dist_run):
    dist_run(2, _meta_user_case)


def _bad_plan_case() -> None:
    """Every plan error is raised on every rank, before any collective, listing all names."""
    dims = ParallelDims(tp=dist.get_world_size())  # 4
    g = dims.tp_group
    msg = expect_error(ValueError, r"match no module", parallelize, _mlp(),
                       {"0": "colwise", "5": "rowwise", "blocks.*.fc": "colwise"}, g)  # fmt: skip
    assert "'5'" in msg and "'blocks.*.fc'" in msg, msg
    odd = nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 18), nn.Linear(18, 6))
    msg = expect_error(ValueError, r"not divisible", parallelize, odd,
                       {"0": "colwise", "2": "rowwise", "3": "colwise"}, g)  # fmt: skip
    assert "0: out_features=30" in msg and "2: in_features=30" in msg, msg
    assert "3: out_features=6" in msg, msg
    cases = [
        ({"1": "colwise"}, r"1: style 'colwise' needs nn.Linear, found ReLU"),
        ({"0": "diagonal"}, r"unknown style 'diagonal'"),
        ({"0": {"style": "colwise", "bogus": 1}}, r"takes no option\(s\) \['bogus'\]"),
        ({"0": {"style": "colwise", "overlap_comm": True}}, r"overlap_comm=True needs sequence_parallel"),
        ({"*": "colwise", "0": "colwise"}, r"0: matched by two plan keys"),
        ({"": "colwise"}, r"the root cannot be replaced"),
        ({"0": 3}, r"neither a style name nor a dict"),
    ]  # fmt: skip
    for plan, match in cases:
        expect_error(ValueError, match, parallelize, _mlp(), plan, g)
    nested = nn.Sequential(nn.Sequential(nn.Linear(8, 8)))
    expect_error(ValueError, r"0: contains other plan-matched module\(s\) \['0.0'\]",
                 parallelize, nested, {"0": "sequence_parallel", "0.0": "colwise"}, g)  # fmt: skip
    tied = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    expect_error(ValueError, r"tied parameter \['0.weight', '1.weight'\] would be sharded",
                 parallelize, tied, {"0": "colwise", "1": "rowwise"}, g)  # fmt: skip
    untouched = _mlp()
    before = [type(m) for m in untouched]
    expect_error(ValueError, r"match no module", parallelize, untouched,
                 {"0": "colwise", "9": "rowwise"}, g)  # fmt: skip
    assert [type(m) for m in untouched] == before  # nothing was swapped
    # An option only the builder rejects (MHA not batch-first) also leaves the model untouched.
    mixed = nn.Sequential(nn.Linear(16, 16), nn.MultiheadAttention(16, 4))
    expect_error(ValueError, r"1: .*does not support \['batch_first=False'\]", parallelize,
                 mixed, {"0": "colwise", "1": "attention"}, g)  # fmt: skip
    assert type(mixed[0]) is nn.Linear
    x = torch.ones(1)
    dist.all_reduce(x, group=g)  # every rank got here
    assert x.item() == 4


def test_bad_plans_raise_on_every_rank(dist_run):
    dist_run(4, _bad_plan_case)


# -- single process ------------------------------------------------------------------------------
def test_wildcards_match_one_name_component():
    model = nn.ModuleDict(
        {"blocks": nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(2, 2)}) for _ in range(12))}
    )
    assert sorted(match_plan(model, {"blocks.*.fc1": "colwise"})) == sorted(
        f"blocks.{i}.fc1" for i in range(12)
    )
    assert list(match_plan(model, {"blocks.1?.fc1": "colwise"})) == [
        "blocks.10.fc1",
        "blocks.11.fc1",
    ]
    expect_error(ValueError, r"match no module", match_plan, model, {"*.fc1": "colwise"})


def test_dims_and_trivial_group():
    model = _mlp()
    expect_error(TypeError, r"expected a ParallelDims, a tensor-parallel ProcessGroup or None",
                 parallelize, model, {"0": "colwise"}, 2)  # fmt: skip
    out = parallelize(model, {"0": "colwise", "2": "rowwise"}, None)
    assert out is model and isinstance(model[0], nn.Linear)  # tp=1: nothing to swap
    expect_error(ValueError, r"match no module", parallelize, model, {"7": "colwise"}, None)
