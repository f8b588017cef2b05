"""Tests of kernels/attention.py: the Triton flash attention and its torch reference against SDPA.

CPU tests run the kernels under Triton's interpreter (the ``triton`` fixture), in fp32 and fp16,
on small odd shapes; the interpreter is slow, so the shapes are a representative subset of the
(dtype x causal x GQA x Sq x Sk x head dim) product rather than all of it. GPU tests (``-m gpu``)
add bf16 and real sizes.

Tolerance (DESIGN.md): against an exact reference computed from the same inputs (fp64 here), our
error is at most twice PyTorch's own error in the same dtype, plus a small atol scaled by the
magnitude of the values.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from triton_parallel_layers.kernels import attention as attention_mod
from triton_parallel_layers.kernels import force_backend
from triton_parallel_layers.kernels.attention import (
    attention_ref,
    attention_ref_with_lse,
    flash_attention,
    flash_attention_with_lse,
)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, hq, hkv, seq_q, seq_k, head_dim, dtype, device=DEVICE, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    q = rand(batch, hq, seq_q, head_dim)
    k = rand(batch, hkv, seq_k, head_dim)
    v = rand(batch, hkv, seq_k, head_dim)
    dout = rand(batch, hq, seq_q, head_dim)
    return q, k, v, dout


def _sdpa(causal, scale=None):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=True
        )

    return fn


def _run(fn, q, k, v, dout, dtype):
    """Output and input gradients of ``fn`` on copies of q, k, v cast to ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(dtype))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _assert_within_torch_error(ours, theirs, exact, dtype):
    """Each of our tensors is within 2x torch's own error (same dtype) of ``exact``, + atol."""
    for name, want in exact.items():
        want = want.to(torch.float64)
        assert ours[name].dtype == dtype, f"{name}: dtype {ours[name].dtype}, expected {dtype}"
        assert ours[name].shape == want.shape, f"{name}: shape {ours[name].shape} vs {want.shape}"
        err = (ours[name].to(torch.float64) - want).abs().max().item() if want.numel() else 0.0
        torch_err = (
            (theirs[name].to(torch.float64) - want).abs().max().item() if want.numel() else 0.0
        )
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        bound = 2 * torch_err + ATOL[dtype] * scale
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (torch's {torch_err:.3e})"


def _check_against_sdpa(shape, causal, dtype, scale=None, device=DEVICE):
    batch, hq, hkv, seq_q, seq_k, head_dim = shape
    q, k, v, dout = _inputs(batch, hq, hkv, seq_q, seq_k, head_dim, dtype, device)
    exact = _run(_sdpa(causal, scale), q, k, v, dout, torch.float64)
    theirs = _run(_sdpa(causal, scale), q, k, v, dout, dtype)

    def ours_fn(q, k, v):
        return flash_attention(q, k, v, causal=causal, softmax_scale=scale)

    ours = _run(ours_fn, q, k, v, dout, dtype)
    _assert_within_torch_error(ours, theirs, exact, dtype)


# ------------------------------------------------------------------------------------------------
# The kernels under the interpreter (CPU) or compiled (CUDA), small odd shapes
# ------------------------------------------------------------------------------------------------

# (batch, Hq, Hkv, Sq, Sk, head_dim)
SHAPES_FP32 = [
    pytest.param((1, 2, 2, 17, 17, 16), id="mha-17x17-d16"),
    pytest.param((2, 2, 1, 97, 130, 32), id="mqa-97x130-d32"),
    pytest.param((1, 4, 2, 130, 97, 16), id="gqa-130x97-d16"),
    pytest.param((1, 4, 1, 1, 97, 32), id="mqa-1x97-d32"),
    pytest.param((2, 2, 2, 97, 1, 16), id="mha-97x1-d16"),
    pytest.param((1, 2, 1, 130, 130, 64), id="mqa-130x130-d64"),
    pytest.param((1, 2, 1, 33, 45, 128), id="mqa-33x45-d128"),
]
SHAPES_FP16 = [
    pytest.param((2, 4, 2, 97, 97, 64), id="gqa-97x97-d64"),
    pytest.param((1, 4, 1, 130, 17, 32), id="mqa-130x17-d32"),
    pytest.param((1, 2, 2, 17, 130, 16), id="mha-17x130-d16"),
    pytest.param((1, 2, 1, 1, 1, 16), id="mqa-1x1-d16"),
    pytest.param((1, 2, 2, 64, 64, 32), id="mha-64x64-d32-whole-blocks"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES_FP32)
def test_flash_attention_fp32_matches_sdpa(triton, shape, causal):
    _check_against_sdpa(shape, causal, torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES_FP16)
def test_flash_attention_fp16_matches_sdpa(triton, shape, causal):
    _check_against_sdpa(shape, causal, torch.float16)


def test_custom_softmax_scale(triton):
    _check_against_sdpa((1, 2, 1, 33, 47, 32), True, torch.float32, scale=0.37)


def test_kernel_path_is_taken(triton, monkeypatch):
    """The triton fixture launches the kernels (forward and backward); force_backend("ref") runs
    the reference inside the same op."""
    calls = []
    for name in ("_attn_fwd", "_attn_bwd"):
        launcher = getattr(attention_mod, name)
        monkeypatch.setattr(
            attention_mod, name, lambda *a, _n=name, _f=launcher: calls.append(_n) or _f(*a)
        )
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    q.requires_grad_()
    flash_attention(q, k, v).sum().backward()
    assert calls == ["_attn_fwd", "_attn_bwd"]
    with force_backend("ref"):
        flash_attention(q, k, v).sum().backward()
    assert calls == ["_attn_fwd", "_attn_bwd"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lse_matches_reference_logsumexp(triton, causal):
    q, k, v, _ = _inputs(2, 4, 2, 41, 70, 32, torch.float32)
    out, lse = flash_attention_with_lse(q, k, v, causal=causal)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, dim=1))
    scores = scores / math.sqrt(32)
    if causal:
        scores = scores.masked_fill(
            torch.ones(41, 70, dtype=torch.bool).tril().logical_not(), -math.inf
        )
    want = torch.logsumexp(scores, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 41)
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=2e-5)
    ref_out, ref_lse = attention_ref_with_lse(q, k, v, causal=causal)
    torch.testing.assert_close(ref_lse.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_lse_gradient_matches_reference(request, backend):
    """A gradient reaching lse (e.g. from merging partial attentions) flows into q and k, on the
    kernels and on the reference's own backward (the op's reference path)."""
    if backend == "triton":
        request.getfixturevalue("triton")
    q, k, v, dout = _inputs(1, 2, 1, 37, 53, 16, torch.float32)
    dlse = torch.randn(1, 2, 37, generator=torch.Generator().manual_seed(1)).to(q.device)

    def grads(fn, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out, lse = fn(qq, kk, vv, causal=True)
        ((out * dout.to(dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()).backward()
        return qq.grad, kk.grad, vv.grad

    with force_backend("ref"):
        want = grads(attention_ref_with_lse, torch.float64)
    with force_backend(backend):
        got = grads(flash_attention_with_lse, torch.float32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5)


def test_merging_partial_attentions_with_lse(triton):
    """Attention over two halves of the keys, merged by their lse, equals attention over all."""
    q, k, v, _ = _inputs(1, 4, 2, 29, 61, 32, torch.float32)
    full = flash_attention(q, k, v)
    out1, lse1 = flash_attention_with_lse(q, k[:, :, :30], v[:, :, :30])
    out2, lse2 = flash_attention_with_lse(q, k[:, :, 30:], v[:, :, 30:])
    lse = torch.logaddexp(lse1, lse2)
    merged = torch.exp(lse1 - lse)[..., None] * out1 + torch.exp(lse2 - lse)[..., None] * out2
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-5)


def test_non_contiguous_inputs(triton):
    """(B, S, H, D) views, a slice of a wider tensor, and a non-unit-stride head dim."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, seq, head_dim = 2, 2, 37, 32
    q = torch.randn(batch, seq, heads, head_dim, generator=gen).transpose(1, 2)  # BSHD -> BHSD
    k = torch.randn(batch, heads, seq, 2 * head_dim, generator=gen)[..., :head_dim]
    v = torch.randn(batch, heads, head_dim, seq, generator=gen).transpose(2, 3)  # stride(-1) != 1
    dout = torch.randn(batch, seq, heads, head_dim, generator=gen).transpose(1, 2)
    q, k, v, dout = (t.to(DEVICE) for t in (q, k, v, dout))
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    exact = _run(_sdpa(True), q, k, v, dout, torch.float64)
    theirs = _run(_sdpa(True), q, k, v, dout, torch.float32)

    def ours_fn(qq, kk, vv):  # keep the original strides: _run's .to() would make copies
        return flash_attention(qq, kk, vv, causal=True)

    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    assert not any(t.is_contiguous() for t in (qq, kk, vv))
    out = ours_fn(qq, kk, vv)
    out.backward(dout)
    ours = {"out": out.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad}
    _assert_within_torch_error(ours, theirs, exact, torch.float32)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_output_is_stored_sequence_major(request, backend):
    """On every path the output (B, H, S, D) is a contiguous (B, S, H, D) underneath, so merging
    the heads into the features is a view of it (the output projection saves no second copy);
    lse and the input gradients are contiguous."""
    if backend == "triton":
        request.getfixturevalue("triton")
    q, k, v, dout = (t.requires_grad_() for t in _inputs(2, 4, 2, 19, 19, 16, torch.float32))
    with force_backend(backend):
        out, lse = flash_attention_with_lse(q, k, v, causal=True)
        out.backward(dout)
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous(), out.stride()
    assert lse.is_contiguous()
    merged = out.transpose(1, 2).reshape(2, 19, 4 * 16)  # (B, S, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view
    assert all(t.grad.is_contiguous() for t in (q, k, v))


@pytest.mark.parametrize("seq_q, seq_k", [(0, 5), (3, 0)], ids=["no-queries", "no-keys"])
def test_empty_sequences_match_sdpa(triton, seq_q, seq_k):
    q, k, v, dout = _inputs(1, 2, 1, seq_q, seq_k, 16, torch.float32)
    want = _run(_sdpa(False), q, k, v, dout, torch.float32)
    got = _run(lambda q, k, v: flash_attention(q, k, v), q, k, v, dout, torch.float32)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_backward_is_deterministic(triton):
    q, k, v, dout = _inputs(1, 4, 2, 45, 45, 16, torch.float16)
    first = _run(lambda *a: flash_attention(*a, causal=True), q, k, v, dout, torch.float16)
    second = _run(lambda *a: flash_attention(*a, causal=True), q, k, v, dout, torch.float16)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ------------------------------------------------------------------------------------------------
# Input validation and the reference path
# ------------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


BAD_INPUTS = [
    pytest.param(
        lambda: (_t(2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)), ValueError, "4-D", id="3d-q"
    ),
    pytest.param(
        lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16, dtype=torch.float16), _t(1, 2, 8, 16)),
        TypeError,
        "share a dtype",
        id="dtype-mismatch",
    ),
    pytest.param(
        lambda: tuple(_t(1, 2, 8, 16, dtype=torch.float64) for _ in range(3)),
        TypeError,
        "torch.float64",
        id="float64",
    ),
    pytest.param(
        lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16, device="meta"), _t(1, 2, 8, 16)),
        ValueError,
        "one device",
        id="device-mismatch",
    ),
    pytest.param(
        lambda: (_t(1, 3, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)),
        ValueError,
        r"query heads \(3\).*key/value heads \(2\)",
        id="heads-not-divisible",
    ),
    pytest.param(
        lambda: (_t(2, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16)),
        ValueError,
        "batch size 2",
        id="batch-mismatch",
    ),
    pytest.param(
        lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16)),
        ValueError,
        "same shape",
        id="k-v-mismatch",
    ),
    pytest.param(
        lambda: (_t(1, 2, 8, 32), _t(1, 2, 8, 16), _t(1, 2, 8, 16)),
        ValueError,
        "head dim 32",
        id="head-dim-mismatch",
    ),
    pytest.param(
        lambda: tuple(_t(1, 2, 8, 80) for _ in range(3)),
        ValueError,
        "head dim 80",
        id="head-dim-80",
    ),
    pytest.param(
        lambda: ([[1.0]], _t(1, 2, 8, 16), _t(1, 2, 8, 16)), TypeError, "torch.Tensor", id="list"
    ),
]


@pytest.mark.parametrize("backend", ["triton", "ref"])
@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_bad_input_raises(backend, make, exc, match):
    with force_backend(backend), pytest.raises(exc, match=match):
        flash_attention(*make())


def test_bad_softmax_scale_raises():
    q = _t(1, 2, 8, 16)
    with pytest.raises(TypeError, match="softmax_scale"):
        flash_attention(q, q, q, softmax_scale="0.5")


def test_reference_accepts_any_head_dim():
    q, k, v, dout = _inputs(1, 2, 1, 9, 11, 80, torch.float32, device="cpu")
    torch.testing.assert_close(attention_ref(q, k, v), _sdpa(False)(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4, 2, 97, 130, 64), (1, 4, 1, 130, 97, 32), (1, 2, 2, 1, 17, 16), (3, 6, 3, 64, 64, 128)],
    ids=["gqa-97x130", "mqa-130x97", "mha-1x17", "gqa-64x64-d128"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_reference_path_matches_sdpa(shape, causal, dtype):
    with force_backend("ref"):
        _check_against_sdpa(shape, causal, dtype, device="cpu")


# ------------------------------------------------------------------------------------------------
# The benchmark's smoke mode
# ------------------------------------------------------------------------------------------------


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke_writes_json_and_plot(tmp_path):
    bench = _load_bench()
    # Smoke mode runs on CPU tensors: the kernel under the interpreter if it is on, else the ref.
    backend = "triton" if bench.interpreter_enabled() else "ref"
    paths = bench.main(["--smoke", "--out-dir", str(tmp_path), "--backend", backend])
    data = json.loads(paths["json"].read_text())
    meta = data["meta"]
    for key in ("gpu", "torch", "triton", "date"):
        assert meta[key], key
    assert meta["torch"] == torch.__version__
    assert meta["complete"] is True and meta["time_budget_exhausted"] is False
    rows = data["results"]
    flash = [r for r in rows if r["provider"] == "flash"]
    assert {(r["mode"], r["causal"]) for r in flash} == {
        (m, c) for m in ("fwd", "bwd", "fwd_bwd") for c in (False, True)
    }
    assert all(r["path"] == backend for r in flash)
    assert any(r["provider"] == "sdpa-math" for r in rows)
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0
        assert r["max_abs_err_vs_sdpa"] < 1e-4
    # Backends that cannot run here are listed with a reason, not silently dropped.
    measured_or_skipped = {r["provider"] for r in rows} | {s["provider"] for s in data["skipped"]}
    assert measured_or_skipped == set(bench.PROVIDERS)
    assert all(s["reason"] for s in data["skipped"])
    assert paths["png"].stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# GPU: bf16/fp16 at real sizes, fp32 exactness, and a pytest-benchmark entry
# ------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param((2, 16, 16, 1024, 1024, 128), True, id="mha-1024-d128-causal"),
    pytest.param((2, 16, 16, 1024, 1024, 128), False, id="mha-1024-d128-full"),
    pytest.param((1, 16, 4, 2048, 2048, 128), True, id="gqa-2048-d128-causal"),
    pytest.param((4, 8, 8, 1000, 1000, 64), True, id="mha-1000-d64-causal-ragged"),
    pytest.param((2, 8, 2, 777, 1500, 64), False, id="gqa-777x1500-d64-full"),
    pytest.param((2, 8, 8, 1500, 777, 128), True, id="mha-1500x777-d128-causal"),
    pytest.param((2, 4, 4, 300, 300, 32), True, id="mha-300-d32-causal"),
    pytest.param((2, 4, 1, 257, 257, 16), False, id="mqa-257-d16-full"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape, causal", GPU_SHAPES)
def test_gpu_matches_sdpa(shape, causal, dtype):
    _check_against_sdpa(shape, causal, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_fp32_matches_sdpa(causal):
    _check_against_sdpa((2, 4, 2, 513, 513, 64), causal, torch.float32, device="cuda")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v, dout = _inputs(2, 8, 2, 1024, 1024, 128, torch.bfloat16, device="cuda")
    runs = [
        _run(lambda *a: flash_attention(*a, causal=True), q, k, v, dout, torch.bfloat16)
        for _ in range(2)
    ]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.gpu
def test_gpu_lse_matches_reference():
    q, k, v, _ = _inputs(2, 8, 4, 1024, 2048, 128, torch.bfloat16, device="cuda")
    _, lse = flash_attention_with_lse(q, k, v, causal=True)
    _, want = attention_ref_with_lse(q, k, v, causal=True)
    torch.testing.assert_close(lse, want, rtol=0, atol=1e-3)


if importlib.util.find_spec("pytest_benchmark") is not None:

    @pytest.mark.gpu
    @pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
    @pytest.mark.parametrize("provider", ["flash", "sdpa"])
    def test_pytest_benchmark_flash_attention(benchmark, provider, mode):
        """pytest-benchmark statistics for bf16, B=4, H=16, S=2048, D=128, causal."""
        q, k, v, dout = _inputs(4, 16, 16, 2048, 2048, 128, torch.bfloat16, device="cuda")
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn = flash_attention if provider == "flash" else _sdpa(True)
        kwargs = {"causal": True} if provider == "flash" else {}

        def step():
            out = fn(q, k, v, **kwargs)
            if mode == "fwd_bwd":
                out.backward(dout)
                q.grad = k.grad = v.grad = None
            torch.cuda.synchronize()

        step()  # compile / autotune outside the measurement
        benchmark.group = f"attention-{mode}"
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)

else:

    @pytest.mark.skip(reason="pytest-benchmark is not installed")
    def test_pytest_benchmark_flash_attention():
        pass
