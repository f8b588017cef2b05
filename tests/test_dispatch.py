"""The dispatch rule of kernels/_dispatch.py and the kernels' behaviour under torch.autocast."""

import pytest
import torch
import torch.nn.functional as F

from triton_parallel_layers.kernels import (
    _dispatch,
    conv2d_bias_relu,
    flash_attention,
    force_backend,
    use_triton,
)
from triton_parallel_layers.kernels._dispatch import kernel_backend


def test_force_backend_nests_and_validates():
    with force_backend("ref"):
        assert kernel_backend() == "ref" and not use_triton(torch.ones(1))
        with force_backend("triton"):
            assert kernel_backend() == "triton"
        assert kernel_backend() == "ref"
    with pytest.raises(ValueError, match="backend='cuda': expected one of"), force_backend("cuda"):
        pass


def test_meta_tensors_take_the_reference_path():
    with force_backend("triton"):
        assert not use_triton(torch.empty(2, device="meta"))
    q = torch.empty(1, 2, 8, 16, device="meta")
    assert flash_attention(q, q, q, causal=True).shape == (1, 2, 8, 16)
    x, w = torch.empty(2, 3, 9, 9, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    assert conv2d_bias_relu(x, w, padding=1).shape == (2, 4, 9, 9)


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with force_backend("triton"), pytest.raises(RuntimeError, match="Triton needs CUDA tensors"):
        use_triton(torch.ones(1))


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [("3.6.0", "2.4.1", True), ("3.6.0+git1a2b", "2.3.5", False), ("3.7.0", "2.4.1", False)],
)
def test_the_interpreter_refuses_a_known_broken_pairing(triton_version, numpy_version, broken):
    """Triton 3.6's interpreter fails on every kernel with a runtime loop bound under NumPy 2.4
    (141 CPU tests with torch 2.11's Triton 3.6): a clear error instead, at the first kernel call,
    not an InterpreterError inside a kernel."""
    problem = _dispatch.interpreter_problem_for(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert f"Triton {triton_version}'s interpreter" in problem
        assert "Install 'numpy<2.4' or Triton >= 3.7" in problem


def test_a_broken_interpreter_is_an_error_at_the_first_kernel_call(triton, monkeypatch):
    monkeypatch.setattr(_dispatch, "_INTERPRETER_PROBLEM", "Triton 3.6.0's interpreter ...")
    with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's interpreter"):
        use_triton(torch.ones(1))
    assert use_triton(torch.ones(1, device="meta")) is False  # no interpreter involved
    monkeypatch.undo()
    assert use_triton(torch.ones(1))  # the installed pairing works (this suite runs on it)


def test_kernels_follow_autocast_like_the_ops_they_replace():
    """Under autocast the reference paths compute in the autocast dtype, as SDPA and F.conv2d
    do, and accept mixed input dtypes as those do."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    x, w, b = torch.randn(2, 3, 7, 9), torch.randn(4, 3, 3, 3), torch.randn(4)
    with force_backend("ref"), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = flash_attention(q, k, v, causal=True)
        assert out.dtype == sdpa.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), sdpa.float(), rtol=2e-2, atol=2e-2)
        conv = F.relu(F.conv2d(x, w, b))
        fused = conv2d_bias_relu(x.bfloat16(), w, b)  # bf16 activation, fp32 weight
        assert fused.dtype == conv.dtype == torch.bfloat16
        torch.testing.assert_close(fused, conv)
