"""Tests of kernels/conv.py: the fused conv2d + bias + ReLU kernel against PyTorch.

On CPU the kernel runs under Triton's interpreter (the ``triton`` fixture); the GPU tests
(``-m gpu``) run the compiled kernel in bf16/fp16/fp32 on ResNet-like shapes.

Tolerance rule (DESIGN.md): against an fp64 reference computed from the same inputs, the kernel's
max error is at most twice PyTorch's own error in the same dtype, plus a small atol relative to
the size of the result.

Gradients: with ReLU, the gradient depends on the kernel's output only through the mask
``out > 0``. Where the pre-activation is within rounding of 0, our output and PyTorch's may fall on
different sides of it, which would flip a whole gradient entry; so the gradient references use
the mask our output implies, and the mask itself is checked against the fp64 pre-activation
wherever that is decisively away from 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import needs_interpreter
from triton_parallel_layers.kernels import conv as conv_mod
from triton_parallel_layers.kernels import conv2d_bias_relu, force_backend
from triton_parallel_layers.kernels.conv import (
    conv2d_bias_act,
    conv2d_bias_act_ref,
    conv2d_bias_relu_ref,
)

# atol relative to max|reference|, per dtype
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _assert_within_torch_error(ours, theirs, ref, dtype, what, atol=None) -> float:
    """Assert max|ours - ref| <= 2 * max|theirs - ref| + atol; return that bound."""
    scale = max(1.0, ref.abs().max().item())
    atol = (ATOL[dtype] if atol is None else atol) * scale
    err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    bound = 2 * torch_err + atol
    assert err <= bound, (
        f"{what}: max error {err:.3g} vs fp64 > 2 x PyTorch's {torch_err:.3g} + atol "
        f"{atol:.3g} ({dtype})"
    )
    return bound


def _check_conv(
    n: int,
    c: int,
    h: int,
    w: int,
    k: int,
    kernel: int | tuple[int, int],
    stride,
    padding,
    dilation,
    *,
    dtype: torch.dtype,
    channels_last: bool,
    bias: bool,
    activation: str | None,
    weight_channels_last: bool | None = None,
    atol: float | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> None:
    """Forward and all gradients of conv2d_bias_act against PyTorch and an fp64 reference.

    ``atol`` (relative to max|reference|) overrides the dtype's entry in ATOL.
    """
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, c, h, w, generator=gen)
    w0 = torch.randn(k, c, kh, kw, generator=gen) / math.sqrt(c * kh * kw)
    b0 = torch.randn(k, generator=gen) * 0.5 if bias else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if weight_channels_last is None:
        weight_channels_last = channels_last
    w_fmt = torch.channels_last if weight_channels_last else torch.contiguous_format

    def leaf(t, dt, memory_format=torch.contiguous_format):
        if t is None:
            return None
        t = t.to(device=device, dtype=dt).contiguous(memory_format=memory_format)
        return t.requires_grad_()

    x, wt, b = leaf(x0, dtype, fmt), leaf(w0, dtype, w_fmt), leaf(b0, dtype)
    out = conv2d_bias_act(x, wt, b, stride, padding, dilation, activation=activation)

    # Output: shape, dtype, memory format follow the input.
    expected_fmt = conv_mod._memory_format(x)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=expected_fmt), f"output not in {expected_fmt}"
    act = torch.relu if activation == "relu" else (lambda t: t)
    xs, ws = leaf(x0, dtype, fmt), leaf(w0, dtype, w_fmt)
    bs = leaf(b0, dtype)
    pre_theirs = F.conv2d(xs, ws, bs, stride, padding, dilation)
    x64, w64, b64 = leaf(x0, torch.float64), leaf(w0, torch.float64), leaf(b0, torch.float64)
    pre_ref = F.conv2d(x64, w64, b64, stride, padding, dilation)
    assert out.shape == pre_ref.shape
    bound = _assert_within_torch_error(
        out.detach(), act(pre_theirs).detach(), act(pre_ref).detach(), dtype, "output", atol
    )

    # Gradients: all three, against PyTorch (same dtype) and fp64, with our output's mask.
    dy = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    out.backward(dy)
    if activation == "relu":
        mask = out.detach() > 0
        decisive = pre_ref.detach().abs() > bound
        wrong = (mask != (pre_ref.detach() > 0)) & decisive
        assert not wrong.any(), f"ReLU mask wrong at {wrong.sum().item()} decisive positions"
        dy = dy * mask
    theirs = torch.autograd.grad(pre_theirs, [t for t in (xs, ws, bs) if t is not None], dy)
    refs = torch.autograd.grad(pre_ref, [t for t in (x64, w64, b64) if t is not None], dy.double())
    ours = [t.grad for t in (x, wt, b) if t is not None]
    for name, g_ours, g_theirs, g_ref in zip(("x", "weight", "bias"), ours, theirs, refs):
        assert g_ours is not None and g_ours.dtype == dtype, f"grad of {name}"
        _assert_within_torch_error(g_ours, g_theirs, g_ref, dtype, f"grad of {name}", atol)


# ----------------------------------------------------------------------------------------------
# Interpreter tests (CPU): odd shapes, a representative subset of the combinations
# ----------------------------------------------------------------------------------------------

# (batch, in ch, out ch, kernel, stride, padding, dilation, bias, activation) on 7x9 images;
# each runs in fp32 and fp16 and in both memory formats.
CASES = [
    (1, 3, 13, 1, 1, 0, 1, True, "relu"),
    (3, 13, 3, 3, 1, 1, 1, True, "relu"),
    (3, 3, 13, 3, 2, 1, 1, False, "relu"),
    (1, 13, 13, 5, 1, (2, 1), 1, True, "relu"),
    (3, 13, 13, 3, 1, 1, 2, True, None),
    (1, 3, 13, 7, 1, 3, 1, True, "relu"),
    (3, 13, 3, 3, 2, (2, 1), 2, False, None),
    (1, 13, 3, 5, 2, 0, 1, True, "relu"),
    (3, 3, 13, (3, 5), (2, 1), (1, 2), (1, 2), True, "relu"),
]


def _case_id(case) -> str:
    n, c, k, kernel, stride, padding, dilation, bias, act = case
    return f"n{n}-c{c}-k{k}-f{kernel}-s{stride}-p{padding}-d{dilation}-b{int(bias)}-{act}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv_matches_torch(triton, case, dtype, channels_last):
    n, c, k, kernel, stride, padding, dilation, bias, act = case
    _check_conv(
        n, c, 7, 9, k, kernel, stride, padding, dilation,
        dtype=dtype, channels_last=channels_last, bias=bias, activation=act,
    )  # fmt: skip


# The tap-major reduction loop (C >= 32 by default): forced on 13 channels, and by default on 37
# channels (three channel blocks of the interpreter's BLOCK_K=16, the last one partial).
@pytest.mark.parametrize(
    "n, c, k, kernel, stride, padding, dilation, force_tap",
    [
        (3, 13, 13, 3, 1, 1, 1, True),
        (1, 13, 3, 5, 2, (2, 1), 2, True),
        (2, 37, 19, 3, 2, 1, 1, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conv_tap_major_loop(
    triton, monkeypatch, n, c, k, kernel, stride, padding, dilation, force_tap, dtype
):
    if force_tap:
        monkeypatch.setattr(conv_mod, "_FLAT_K_BELOW_CHANNELS", 0)
    assert force_tap or c >= conv_mod._FLAT_K_BELOW_CHANNELS
    _check_conv(
        n, c, 7, 9, k, kernel, stride, padding, dilation,
        dtype=dtype, channels_last=bool(n % 2), bias=True, activation="relu",
    )  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["x-nchw", "x-nhwc"])
def test_conv_mixed_memory_formats(triton, channels_last):
    """x and weight in different memory formats; the output follows x."""
    _check_conv(
        3, 13, 7, 9, 13, 3, 1, 1, 1, dtype=torch.float32, channels_last=channels_last,
        weight_channels_last=not channels_last, bias=True, activation="relu",
    )  # fmt: skip


def test_conv_strided_input_view(triton):
    """A non-contiguous view in neither memory format is read through its strides."""
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(2, 13, 9, 11, generator=gen)
    x = big[:, :, 1:8, 2:11]  # 7x9 window of a larger image
    w = torch.randn(5, 13, 3, 3, generator=gen)
    out = conv2d_bias_relu(x, w, None, 1, 1)
    torch.testing.assert_close(out, F.relu(F.conv2d(x, w, None, 1, 1)), rtol=1e-5, atol=1e-5)


def test_conv_empty_batch(triton):
    x = torch.randn(0, 3, 7, 9, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = conv2d_bias_relu(x, w, None, 1, 1)
    assert out.shape == (0, 4, 7, 9)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0


def test_relu_and_act_agree(triton):
    gen = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(1, 3, 7, 9, generator=gen), torch.randn(4, 3, 3, 3), torch.randn(4)
    assert torch.equal(conv2d_bias_relu(x, w, b, 1, 1), conv2d_bias_act(x, w, b, 1, 1))
    pre = conv2d_bias_act(x, w, b, 1, 1, activation=None)
    assert (pre < 0).any(), "the test needs negative pre-activations"
    torch.testing.assert_close(torch.relu(pre), conv2d_bias_relu(x, w, b, 1, 1))


def test_saves_only_x_weight_and_output(triton):
    """Memory: autograd keeps x, weight and the returned output; no pre-activation copy."""
    x = torch.randn(1, 3, 7, 9, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for activation, expected in (("relu", 3), (None, 2)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = conv2d_bias_act(x, w, b, 1, 1, activation=activation)
        ptrs = {t.data_ptr() for t in saved}
        assert len(saved) == expected, [tuple(t.shape) for t in saved]
        assert {x.data_ptr(), w.data_ptr()} <= ptrs
        if activation == "relu":
            assert out.data_ptr() in ptrs


@needs_interpreter
def test_dispatch(monkeypatch):
    """CPU without a forced backend runs the reference; the triton fixture runs the kernel."""
    calls = []
    launch = conv_mod._conv2d_fwd
    monkeypatch.setattr(conv_mod, "_conv2d_fwd", lambda *a: calls.append(1) or launch(*a))
    x, w = torch.randn(1, 3, 7, 9), torch.randn(4, 3, 3, 3)
    with force_backend("ref"):
        out = conv2d_bias_relu(x, w)
    assert not calls
    assert torch.equal(out, F.relu(F.conv2d(x, w)))
    assert torch.equal(out, conv2d_bias_relu_ref(x, w))
    with force_backend("triton"):
        conv2d_bias_relu(x, w)
    assert calls == [1]


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, on either path, before any kernel runs
# ----------------------------------------------------------------------------------------------

_X, _W = torch.randn(2, 3, 7, 9), torch.randn(4, 3, 3, 3)
BAD_INPUTS = [
    ("groups", ValueError, "groups=3", (torch.randn(2, 3, 7, 9), torch.randn(3, 1, 3, 3)),
     {"groups": 3}),
    ("grouped weight", ValueError, r"weight.shape=\(4, 1, 3, 3\).*grouped",
     (_X, torch.randn(4, 1, 3, 3)), {}),
    ("channels", ValueError, r"weight.shape=\(4, 5, 3, 3\).*== 3", (_X, torch.randn(4, 5, 3, 3)),
     {}),
    ("3-D x", ValueError, r"x.shape=\(3, 7, 9\).*4-D", (_X[0], _W), {}),
    ("2-D weight", ValueError, r"weight.shape=\(4, 27\)", (_X, _W.flatten(1)), {}),
    ("bias shape", ValueError, r"bias.shape=\(3,\).*\(4,\)", (_X, _W, torch.randn(3)), {}),
    ("dtype", TypeError, "weight.dtype=torch.float16", (_X, _W.half()), {}),
    ("bias dtype", TypeError, "bias.dtype=torch.float64", (_X, _W, torch.randn(4).double()), {}),
    ("int dtype", TypeError, "x.dtype=torch.int64", (_X.long(), _W.long()), {}),
    ("device", ValueError, "weight.device=meta", (_X, _W.to("meta")), {}),
    ("not a tensor", TypeError, "weight: expected a torch.Tensor", (_X, [[1.0]]), {}),
    ("stride 0", ValueError, r"stride=0.*>= 1", (_X, _W), {"stride": 0}),
    ("stride triple", ValueError, r"stride=\(1, 1, 1\)", (_X, _W), {"stride": (1, 1, 1)}),
    ("padding", ValueError, r"padding=-1.*>= 0", (_X, _W), {"padding": -1}),
    ("padding str", ValueError, "padding='same'", (_X, _W), {"padding": "same"}),
    ("dilation", ValueError, r"dilation=\(1, 0\)", (_X, _W), {"dilation": (1, 0)}),
    ("empty output", ValueError, r"output size \(-1, 1\) is empty",
     (_X, torch.randn(4, 3, 5, 5)), {"dilation": 2}),
    ("activation", ValueError, "activation='gelu'", (_X, _W), {"activation": "gelu"}),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize(
    "exc, match, args, kwargs", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_raises(backend, exc, match, args, kwargs):
    with force_backend(backend), pytest.raises(exc, match=match):
        conv2d_bias_act(*args, **kwargs)


def test_unsupported_dtype_on_triton_path(triton):
    with pytest.raises(TypeError, match="x.dtype=torch.float64.*supports"):
        conv2d_bias_relu(_X.double(), _W.double())
    # the reference path takes fp64 (for gradcheck and the like)
    with force_backend("ref"):
        assert conv2d_bias_relu(_X.double(), _W.double()).dtype == torch.float64


def test_reference_matches_functional():
    x, w, b = torch.randn(2, 3, 7, 9), torch.randn(4, 3, 3, 3), torch.randn(4)
    expected = F.conv2d(x, w, b, 2, (2, 1), 2)
    assert torch.equal(conv2d_bias_act_ref(x, w, b, 2, (2, 1), 2, activation=None), expected)
    assert torch.equal(conv2d_bias_relu_ref(x, w, b, 2, (2, 1), 2), F.relu(expected))


# ----------------------------------------------------------------------------------------------
# The benchmark's CPU smoke mode
# ----------------------------------------------------------------------------------------------


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_conv.py"
    spec = importlib.util.spec_from_file_location("bench_conv", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@needs_interpreter
def test_bench_smoke(tmp_path):
    bench = _load_bench()
    json_path = bench.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads(Path(json_path).read_text())
    assert data["meta"]["torch"] == torch.__version__ and "triton" in data["meta"]
    assert data["errors"] == [] and data["skipped"] == []
    rows = data["results"]
    assert {r["provider"] for r in rows} >= {"triton", "torch"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert list(tmp_path.glob("*.png")), "no plot written"


# ----------------------------------------------------------------------------------------------
# GPU tests: compiled kernel, bf16/fp16/fp32, ResNet-like shapes
# ----------------------------------------------------------------------------------------------

# (batch, in ch, H=W, out ch, kernel, stride, padding)
GPU_SHAPES = [
    (4, 3, 224, 64, 7, 2, 3),  # ResNet stem (flat reduction loop)
    (8, 64, 56, 64, 3, 1, 1),
    (8, 256, 56, 128, 1, 1, 0),
    (8, 128, 56, 128, 3, 2, 1),
    (8, 512, 28, 1024, 1, 2, 0),  # strided 1x1 downsample
    (8, 512, 7, 512, 3, 1, 1),
    (32, 1, 28, 32, 3, 1, 1),  # the example CNN's first conv
    (5, 72, 17, 40, 5, 1, (2, 1)),  # odd: channels not a multiple of 16, odd image
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_gpu_conv_resnet_shapes(triton, shape, dtype):
    n, c, hw, k, kernel, stride, padding = shape
    _check_conv(
        n, c, hw, hw, k, kernel, stride, padding, 1,
        dtype=dtype, channels_last=True, bias=True, activation="relu", device="cuda",
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-tf32", "fp16"])
def test_gpu_conv_nchw_and_no_act(triton, monkeypatch, dtype):
    # fp32 with TF32 on (PyTorch's default for convolutions): both sides multiply 10-bit
    # mantissas, but the tensor-core input conversion may round (cuDNN) or truncate (Triton),
    # which can double the error; hence an atol at TF32's scale rather than fp32's.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    _check_conv(
        8, 64, 28, 30, 96, 3, 1, 1, (2, 1),
        dtype=dtype, channels_last=False, bias=False, activation=None, device="cuda",
        atol=2e-3 if dtype == torch.float32 else None,
    )  # fmt: skip


@pytest.mark.gpu
def test_gpu_conv_autotuned(triton, monkeypatch):
    """The autotuned launch (the default; the GPU check script turns it off for the rest)."""
    monkeypatch.setenv("TPL_CONV_AUTOTUNE", "1")
    _check_conv(
        8, 128, 28, 28, 256, 3, 1, 1, 1,
        dtype=torch.float16, channels_last=True, bias=True, activation="relu", device="cuda",
    )  # fmt: skip


@pytest.mark.gpu
def test_gpu_conv_fp32_ieee(triton, monkeypatch):
    """With TF32 off, fp32 products are exact: the kernel follows cudnn.allow_tf32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _check_conv(
        4, 64, 14, 14, 64, 3, 1, 1, 1,
        dtype=torch.float32, channels_last=True, bias=True, activation="relu", device="cuda",
    )  # fmt: skip


@pytest.mark.gpu
def test_gpu_conv_int64_offsets(triton):
    """More than 2**31 elements in x and out: image offsets must not overflow int32."""
    n, c, hw, k = 2050, 64, 128, 64  # 2.15e9 elements each, 4.3 GB in fp16
    x = torch.empty(n, c, hw, hw, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last).normal_()
    w = torch.randn(k, c, 1, 1, device="cuda", dtype=torch.float16) / 8
    out = conv2d_bias_relu(x, w)
    for i in (0, n - 1):
        expected = F.relu(F.conv2d(x[i : i + 1].float(), w.float()))
        torch.testing.assert_close(out[i : i + 1].float(), expected, rtol=2e-3, atol=2e-3)
    del x, out
    torch.cuda.empty_cache()
