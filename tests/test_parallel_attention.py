"""ParallelSelfAttention against the single-device module, on gloo at TP = 1, 2, 4."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_close, chunk, expect_error, needs_interpreter
from triton_parallel_layers.kernels import force_backend, use_triton
from triton_parallel_layers.parallel_layers import (
    ParallelDims,
    ParallelSelfAttention,
    allreduce_sequence_parallel_grads,
)
from triton_parallel_layers.parallel_layers.attention import (
    apply_rotary,
    apply_rotary_qk,
    rotary_cos_sin,
)

B, S = 2, 12  # S divisible by 4 for sequence parallelism


def _grads(attn: ParallelSelfAttention) -> dict:
    out = {"qkv.weight": attn.qkv.weight.grad, "proj.weight": attn.proj.weight.grad}
    if attn.qkv.bias is not None:
        out["qkv.bias"], out["proj.bias"] = attn.qkv.bias.grad, attn.proj.bias.grad
    return out


SHARD_DIM = {"qkv.weight": 0, "proj.weight": 1, "qkv.bias": 0, "proj.bias": None}


def _attention_case(embed, heads, kv_heads, causal, bias, rope, sequence_parallel, backend):
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    ref = ParallelSelfAttention(embed, heads, kv_heads, causal=causal, bias=bias, rope=rope)
    with torch.no_grad():  # non-zero biases, so a misplaced one shows
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    par = ParallelSelfAttention.from_attention(
        ref, dims.tp_group, sequence_parallel=sequence_parallel
    )
    x = torch.randn(B, S, embed)
    dy = torch.randn(B, S, embed)

    with force_backend(backend):
        assert use_triton(x) == (backend == "triton")
        x_ref = x.clone().requires_grad_()
        y_ref = ref(x_ref)
        y_ref.backward(dy)
        x_par = (chunk(x, 1) if sequence_parallel else x.clone()).requires_grad_()
        y = par(x_par)
        y.backward(chunk(dy, 1) if sequence_parallel else dy)
    allreduce_sequence_parallel_grads(par)  # the proj bias's per-rank partial sums under SP

    seq = (lambda t: chunk(t, 1)) if sequence_parallel else (lambda t: t)
    assert_close(y.detach(), seq(y_ref.detach()), what="output")
    assert_close(x_par.grad, seq(x_ref.grad), what="input grad")
    for name, grad in _grads(par).items():
        full = _grads(ref)[name]
        expected = full if SHARD_DIM[name] is None else chunk(full, SHARD_DIM[name])
        assert_close(grad, expected, what=f"{name} grad")


CASES = [
    # embed, heads, kv_heads, causal, bias, rope, sequence_parallel
    (64, 4, 4, True, False, True, False),
    (64, 4, 4, True, True, True, True),
    (128, 8, 4, True, False, True, False),  # grouped-query: 2 query heads per kv head
    (128, 8, 4, False, True, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_matches_single_device(dist_run, world_size, case):
    dist_run(world_size, _attention_case, *case, "ref")


@needs_interpreter
def test_through_the_triton_kernel(dist_run):
    """One case through the Triton attention kernel (interpreted on CPU): the same equality."""
    dist_run(2, _attention_case, 64, 4, 2, True, True, True, True, "triton", timeout=300)


def _mha_case(embed, heads, bias, causal):
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=True)
    par = ParallelSelfAttention.from_mha(copy.deepcopy(mha), dims.tp_group, causal=causal)
    x = torch.randn(B, S, embed)
    mask = torch.ones(S, S, dtype=torch.bool).triu(1) if causal else None
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = mha(x_ref, x_ref, x_ref, attn_mask=mask, need_weights=False)[0]
    y_ref.square().sum().backward()
    y = par(x_par)
    y.square().sum().backward()
    assert_close(y.detach(), y_ref.detach(), what="output")
    assert_close(x_par.grad, x_ref.grad, what="input grad")
    assert_close(par.proj.weight.grad, chunk(mha.out_proj.weight.grad, 1), what="out_proj grad")


@pytest.mark.parametrize("bias,causal", [(True, True), (False, False)])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_from_multihead_attention(dist_run, world_size, bias, causal):
    dist_run(world_size, _mha_case, 64, 4, bias, causal)


def _init_parity_case():
    """Built after the same seed, the TP shards are the chunks of the single-device weights."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(5)
    ref = ParallelSelfAttention(128, 8, 4, bias=True)
    torch.manual_seed(5)
    par = ParallelSelfAttention(128, 8, 4, bias=True, tp_group=dims.tp_group)
    assert_close(par.qkv.weight.detach(), chunk(ref.qkv.weight.detach(), 0), exact=True)
    assert_close(par.proj.weight.detach(), chunk(ref.proj.weight.detach(), 1), exact=True)
    assert_close(par.proj.bias.detach(), ref.proj.bias.detach(), exact=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_initialization_parity(dist_run, world_size):
    dist_run(world_size, _init_parity_case)


def _bad_input_case():
    dims = ParallelDims(tp=dist.get_world_size())
    g = dims.tp_group
    expect_error(ValueError, r"num_heads=6 is not divisible by the tensor-parallel size 4",
                 ParallelSelfAttention, 96, 6, tp_group=g)  # fmt: skip
    expect_error(ValueError, r"num_kv_heads=2 is not divisible by the tensor-parallel size 4",
                 ParallelSelfAttention, 128, 8, 2, tp_group=g)  # fmt: skip
    expect_error(ValueError, r"num_heads=8 is not a multiple of num_kv_heads=3",
                 ParallelSelfAttention, 128, 8, 3, tp_group=g)  # fmt: skip
    expect_error(ValueError, r"head dim embed_dim / num_heads = 48 / 2 = 24 is not supported",
                 ParallelSelfAttention, 48, 2)  # fmt: skip
    attn = ParallelSelfAttention(64, 4, tp_group=g)
    expect_error(ValueError, r"last dim 32, expected 64", attn, torch.randn(2, 4, 32))
    expect_error(ValueError, r"does not support \['batch_first=False'\]",
                 ParallelSelfAttention.from_mha, nn.MultiheadAttention(64, 4), g)  # fmt: skip
    x = torch.ones(1)
    dist.all_reduce(x, group=g)
    assert x.item() == 4


def test_bad_input_raises_on_every_rank(dist_run):
    dist_run(4, _bad_input_case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_recomputes_its_tables_and_matches_autograd(dtype):
    """``apply_rotary_qk`` saves no tensor for its backward (its cos/sin are recomputed there) and
    gives ``apply_rotary``'s output and autograd gradients bit for bit."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 16, generator=gen).to(dtype)
    k = torch.randn(2, 2, 13, 16, generator=gen).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    q1, k1, q2, k2 = (t.clone().requires_grad_() for t in (q, k, q, k))
    cos, sin = rotary_cos_sin(13, 16, 500.0, q.device, dtype)
    torch.autograd.backward((apply_rotary(q1, cos, sin), apply_rotary(k1, cos, sin)), (dq, dk))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rq, rk = apply_rotary_qk(q2, k2, 500.0)
    torch.autograd.backward((rq, rk), (dq, dk))
    assert saved == []
    assert torch.equal(rq, apply_rotary(q, cos, sin)) and torch.equal(rk, apply_rotary(k, cos, sin))
    assert torch.equal(q2.grad, q1.grad) and torch.equal(k2.grad, k1.grad)
