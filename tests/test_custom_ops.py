"""The kernels as ``torch.library`` custom ops: ``torch.library.opcheck`` for every op.

opcheck runs each op through its schema check, the fake (meta) implementation against the real
one, the registered autograd, and AOT dispatch with static and dynamic shapes. On CPU the ops take
the torch reference path (``use_triton=False``); under Triton's interpreter the matmul and the
conv also run their Triton kernels. Where conftest switches the interpreter on, the ops are plain
``custom_op``s with explicit fakes; a subprocess without the interpreter checks the
``triton_op`` registration (whose fake implementation is the op's body run on fake tensors).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import triton_parallel_layers.kernels  # noqa: F401  (registers the ops)

OPS = torch.ops.triton_parallel_layers


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _randn(*shape, requires_grad=True, **kwargs) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(), **kwargs).requires_grad_(requires_grad)


def opcheck_cases(use_triton: bool) -> dict[str, tuple]:
    """``name -> (op, args)``: small shapes, odd sizes, each op's optional arguments both ways."""
    q, k, v = _randn(1, 4, 5, 16), _randn(1, 2, 7, 16), _randn(1, 2, 7, 16)
    out, lse = (t.detach() for t in OPS.flash_attention_fwd(q, k, v, True, 0.25, False))
    dout, dlse = _randn(1, 4, 5, 16, requires_grad=False), _randn(1, 4, 5, requires_grad=False)
    x, w, b = _randn(2, 3, 7, 9), _randn(4, 3, 3, 3), _randn(4)
    x_cl = _randn(2, 3, 7, 9).contiguous(memory_format=torch.channels_last)
    a, wt, bias, part = _randn(2, 5, 13), _randn(11, 13), _randn(11), _randn(2, 5, 11)
    cases = {
        "matmul": (OPS.matmul, (a, wt, None, None, use_triton)),
        "matmul-bias-partial": (OPS.matmul, (a, wt, bias, part, use_triton)),
        "conv-relu": (OPS.conv2d_bias_act, (x, w, b, [1, 1], [1, 1], [1, 1], True, use_triton)),
        "conv-cl-strided": (
            OPS.conv2d_bias_act, (x_cl, w, None, [2, 1], [0, 2], [1, 2], False, use_triton)
        ),
    }  # fmt: skip
    # k, v as the attention layer makes them: strided views of one fused projection
    kv = _randn(1, 7, 2, 2, 16).permute(2, 0, 3, 1, 4)  # (2, B, Hkv, Sk, D), not contiguous
    k_view, v_view = kv[0], kv[1]
    # The backward op is not itself differentiable (no double backward), so no input needs grad.
    qd, kd, vd = (t.detach() for t in (q, k, v))
    if not use_triton:  # the attention kernels are too slow to interpret this many times
        cases["attention-fwd-causal-gqa"] = (OPS.flash_attention_fwd, (q, k, v, True, 0.25, False))
        cases["attention-fwd"] = (OPS.flash_attention_fwd, (q, k, v, False, 0.3, False))
        cases["attention-fwd-strided-kv"] = (
            OPS.flash_attention_fwd, (q, k_view, v_view, True, 0.25, False)
        )  # fmt: skip
        cases["attention-bwd-strided-kv"] = (
            OPS.flash_attention_bwd,
            (qd, k_view.detach(), v_view.detach(), out, lse, dout, dlse, True, 0.25, False),
        )
        cases["attention-bwd"] = (
            OPS.flash_attention_bwd, (qd, kd, vd, out, lse, dout, dlse, True, 0.25, False)
        )  # fmt: skip
        cases["attention-bwd-no-dlse"] = (
            OPS.flash_attention_bwd, (qd, kd, vd, out, lse, dout, None, False, 0.25, False)
        )  # fmt: skip
    return cases


def run_opchecks(use_triton: bool = False, names: list[str] | None = None) -> list[str]:
    """opcheck the cases ``names`` (default all); returns the names checked."""
    cases = opcheck_cases(use_triton)
    for name in names or list(cases):
        op, args = cases[name]
        try:
            torch.library.opcheck(op, args)
        except Exception as err:
            raise AssertionError(f"opcheck failed for {name}: {err}") from err
    return names or list(cases)


@pytest.mark.parametrize("name", list(opcheck_cases(False)))
def test_opcheck_reference_path(name):
    op, args = opcheck_cases(False)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", list(opcheck_cases(True)))
def test_opcheck_interpreted_kernels(triton, name):
    op, args = opcheck_cases(True)[name]
    torch.library.opcheck(op, args)


def _collective_opchecks() -> None:
    """On every rank of a gloo group: opcheck the communicating linear ops (the group by name):
    the all-gather ring and its plain twin (both save the input shard: their backward takes it),
    the input-gradient all-reduce, and the reduce-scatter ring."""
    name = dist.group.WORLD.group_name
    x, w, b = _randn(2, 3, 5), _randn(7, 5), _randn(7)
    xd, wd = x.detach(), w.detach()
    g_ag = _randn(2, 3 * dist.get_world_size(), 7, requires_grad=False)
    g_ar = _randn(2, 3, 7, requires_grad=False)
    x_rs = _randn(2, 4, 5)
    g_rs = _randn(2, 4 // dist.get_world_size(), 7, requires_grad=False)
    cases = [(OPS.matmul_reduce_scatter_fwd, (x_rs, w, name, 1))]
    for needs in ([True, True], [False, True]):
        cases.append((OPS.matmul_reduce_scatter_bwd, (g_rs, x_rs.detach(), wd, name, 1, needs)))
    for fwd, bwd in (
        (OPS.all_gather_matmul_fwd, OPS.all_gather_matmul_bwd),
        (OPS.all_gather_linear_fwd, OPS.all_gather_linear_bwd),
    ):
        cases += [(fwd, (x, w, b, name, 1)), (fwd, (x, w, None, name, 0))]
        for needs in ([True, True, True], [False, True, False]):
            cases.append((bwd, (g_ag, xd, wd, name, 1, needs)))
    cases += [
        (OPS.linear_allreduce_dgrad_fwd, (x, w, b, name)),
        (OPS.linear_allreduce_dgrad_bwd, (g_ar, xd, wd, name, [True, True, True])),
        (OPS.linear_allreduce_dgrad_bwd, (g_ar, xd, wd, name, [True, False, False])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_collective_matmuls(dist_run):
    dist_run(2, _collective_opchecks, timeout=300)


def test_every_kernel_is_a_registered_op():
    expected = {"flash_attention_fwd", "flash_attention_bwd", "conv2d_bias_act", "matmul",
                "all_gather_matmul_fwd", "all_gather_matmul_bwd", "matmul_reduce_scatter_fwd",
                "matmul_reduce_scatter_bwd"}  # fmt: skip
    registered = {name for name in expected if hasattr(OPS, name)}
    assert registered == expected


def test_opcheck_as_triton_ops_without_the_interpreter():
    """Without the interpreter the ops are ``triton_op``s: opcheck them there too (reference
    path: there is no GPU to launch on)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TPL_KERNEL_BACKEND": "ref"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests")])
    code = (
        "import test_custom_ops as t; from torch._library.triton import triton_ops_to_kernels; "
        "assert 'triton_parallel_layers::matmul' in triton_ops_to_kernels; "
        "print(t.run_opchecks(False, ['matmul-bias-partial', 'conv-cl-strided', "
        "'attention-fwd-causal-gqa', 'attention-bwd']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention-bwd" in proc.stdout


def test_flop_counter_counts_attention():
    """``FlopCounterMode`` sees the attention ops (registered flop formulas): the forward's two
    products in full, ``4 B H S^2 D``, and twice that in the backward (PyTorch's SDPA
    convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from triton_parallel_layers.kernels import flash_attention

    q, k, v = _randn(2, 4, 24, 16), _randn(2, 2, 24, 16), _randn(2, 2, 24, 16)
    with FlopCounterMode(display=False) as fwd:
        out = flash_attention(q, k, v, causal=True)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert fwd.get_total_flops() == 4 * 2 * 4 * 24 * 24 * 16
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()
