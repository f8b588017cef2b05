"""Tests of kernels/lstm.py: the fused LSTM cell against ``nn.LSTM`` with the same weights.

On CPU the kernel runs under Triton's interpreter (the ``triton`` fixture), in fp32 and fp16 (the
interpreter has no bf16 arithmetic); the GPU test adds bf16. Every case compares the output, the
final states and the gradients of the input, ``h0``, ``c0`` and all four weights and biases.

fp32: within ``helpers.TOLERANCES`` (1e-5). fp16: the rule of DESIGN.md, against the fp32 result
from the same (fp16-rounded) inputs, at most twice the error of ``nn.LSTM`` run in fp16 plus a small
atol.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_close, assert_close_lowp, expect_error
from triton_parallel_layers.kernels import force_backend, lstm, lstm_ref
from triton_parallel_layers.kernels.lstm import lstm_cell

NAMES = ("out", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh")


def _problem(batch: int, length: int, inp: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    """An ``nn.LSTM`` in ``dtype`` and inputs ``x, h0, c0`` and output gradients of that dtype."""
    torch.manual_seed(seed)
    module = nn.LSTM(inp, hidden, batch_first=True).to(dtype)
    x = torch.randn(batch, length, inp).to(dtype)
    h0, c0 = torch.randn(2, batch, hidden).to(dtype)
    grads = [torch.randn(batch, length, hidden).to(dtype)] + [
        torch.randn(batch, hidden).to(dtype) for _ in range(2)
    ]
    return module, x, h0, c0, grads


def _run_module(ref: nn.LSTM, x, h0, c0, grads, dtype: torch.dtype) -> dict:
    """Outputs and gradients of ``nn.LSTM`` (a copy of ``ref`` in ``dtype``)."""
    module = nn.LSTM(ref.input_size, ref.hidden_size, batch_first=True, device=x.device)
    module.load_state_dict(ref.state_dict())
    module.to(dtype)
    xs = [t.detach().to(dtype).requires_grad_() for t in (x, h0, c0)]
    out, (h_n, c_n) = module(xs[0], (xs[1][None], xs[2][None]))
    torch.autograd.backward([out, h_n[0], c_n[0]], [g.to(dtype) for g in grads])
    values = [out, h_n[0], c_n[0], *(t.grad for t in xs)]
    values += [module.weight_ih_l0.grad, module.weight_hh_l0.grad]
    values += [module.bias_ih_l0.grad, module.bias_hh_l0.grad]
    return {k: v.detach() for k, v in zip(NAMES, values)}


def _run_functional(fn, module: nn.LSTM, x, h0, c0, grads) -> dict:
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    xs = [t.detach().clone().requires_grad_() for t in (x, h0, c0)]
    out, (h_n, c_n) = fn(xs[0], *params, (xs[1], xs[2]))
    torch.autograd.backward([out, h_n, c_n], grads)
    values = [out, h_n, c_n, *(t.grad for t in xs), *(p.grad for p in params)]
    return {k: v.detach() for k, v in zip(NAMES, values)}


def _check(batch: int, length: int, hidden: int, dtype: torch.dtype, inp: int = 7) -> None:
    module, x, h0, c0, grads = _problem(batch, length, inp, hidden, dtype)
    ours = _run_functional(lstm, module, x, h0, c0, grads)
    theirs = _run_module(module, x, h0, c0, grads, dtype)
    truth = _run_module(module, x, h0, c0, grads, torch.float32)
    for name in NAMES:
        assert ours[name].dtype == dtype and ours[name].shape == theirs[name].shape, name
        assert_close_lowp(ours[name], theirs[name], truth[name], what=f"{name} ({dtype})")


# (batch, length, hidden): every listed size at least once per dtype, the interpreter kept to
# a few seconds per case (each step is one forward and one backward kernel launch).
CASES = [(5, 37, 13), (1, 1, 97), (1, 37, 13), (5, 1, 97)]


@pytest.mark.parametrize("batch, length, hidden", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lstm_matches_nn_lstm(triton, batch, length, hidden, dtype):
    _check(batch, length, hidden, dtype)


@pytest.mark.parametrize("batch, length, hidden", [(5, 37, 13), (1, 1, 97)])
def test_reference_path_matches_nn_lstm(batch, length, hidden):
    """The path CPU training takes (the op's torch implementation), and :func:`lstm_ref`."""
    _check(batch, length, hidden, torch.float32)
    module, x, h0, c0, grads = _problem(batch, length, 7, hidden, torch.float32)
    ours = _run_functional(lstm_ref, module, x, h0, c0, grads)
    theirs = _run_module(module, x, h0, c0, grads, torch.float32)
    for name in NAMES:
        assert_close(ours[name], theirs[name], what=f"lstm_ref {name}")


def test_default_state_and_time_major():
    """``hx=None`` is zeros, and ``batch_first=False`` takes and returns ``(T, B, *)``."""
    torch.manual_seed(0)
    module = nn.LSTM(5, 6)  # time-major
    x = torch.randn(4, 3, 5)  # (T, B, I)
    out, (h_n, c_n) = lstm(x, *module.parameters(), batch_first=False)
    ref_out, (ref_h, ref_c) = module(x)
    assert_close(out, ref_out.detach(), what="out")
    assert_close(h_n, ref_h[0].detach(), what="h_n")
    assert_close(c_n, ref_c[0].detach(), what="c_n")


def test_cell_op_registration():
    """The custom op's fake implementation and autograd pass ``torch.library.opcheck``."""
    z = torch.randn(3, 4 * 5, requires_grad=True)
    c = torch.randn(3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.triton_parallel_layers.lstm_cell.default, (z, c))


def test_bad_input():
    w_ih, w_hh = torch.randn(8, 3), torch.randn(8, 2)
    expect_error(ValueError, r"input of shape \(2, 4, 5\): expected \(B, T, I\) with I=3",
                 lstm, torch.randn(2, 4, 5), w_ih, w_hh)  # fmt: skip
    expect_error(ValueError, r"weight_hh of shape \(8, 3\): expected \(8, 2\)",
                 lstm, torch.randn(2, 4, 3), w_ih, torch.randn(8, 3))  # fmt: skip
    expect_error(ValueError, r"h0 of shape \(3, 2\): expected \(2, 2\)", lstm,
                 torch.randn(2, 4, 3), w_ih, w_hh, None, None, (torch.randn(3, 2),) * 2)  # fmt: skip
    expect_error(TypeError, r"c_prev.dtype=torch.float16", lstm_cell,
                 torch.randn(2, 8), torch.randn(2, 2).half())  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_lstm_gpu(dtype):
    """The compiled kernel against cuDNN's LSTM at a realistic size.

    The truth is cuDNN's LSTM in fp64, and the rule the low-precision one for every dtype: our
    error at most twice cuDNN's in the same dtype plus ``atol``. cuDNN's fp32 LSTM runs its GEMMs
    in TF32 under PyTorch's default ``torch.backends.cudnn.allow_tf32=True`` (outputs 1.7e-4 off
    exact fp32 on an H200), so it is compared with TF32 off, exact fp32 as cuBLAS gives the
    kernel's GEMMs by default. Then its weight gradient still differed from ours in the order of
    its 512-term sums (1.1e-5 at one of 98,304 elements, over a fixed fp32 tolerance of 1e-5).
    """
    torch.set_default_device("cuda")
    try:
        module, x, h0, c0, grads = _problem(8, 64, 96, 256, dtype)
        with force_backend("triton"):
            ours = _run_functional(lstm, module, x, h0, c0, grads)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            theirs = _run_module(module, x, h0, c0, grads, dtype)
            truth = _run_module(module, x, h0, c0, grads, torch.float64)
        for name in NAMES:
            assert_close_lowp(ours[name], theirs[name], truth[name], what=f"{name} ({dtype})")
    finally:
        torch.set_default_device(None)


def test_lstm_language_model_refuses_padding_targets_and_bad_ids():
    """``LSTMLM`` shares the GPT's forward and loss checks (``models.lm.LanguageModel``): a
    padding target is a device-side assert by default and a named ``ValueError`` under
    ``debug_checks``; a sequence longer than ``max_seq_len`` is an eager error."""
    from triton_parallel_layers.models.lstm import LSTMLM, LSTMConfig
    from triton_parallel_layers.parallel_layers.checks import debug_checks

    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=13, n_layers=1, embed_dim=8, hidden_size=12,
                              max_seq_len=6, vocab_pad_multiple=8))  # fmt: skip
    ids = torch.randint(0, 13, (2, 6))
    logits = model(ids)
    assert logits.shape == (2, 6, 16)
    target = ids.clone()
    target[1, 2] = 14
    expect_error(RuntimeError, r"a target id is a padding id \(>= 13\)", model.loss, logits, target)
    with debug_checks():
        expect_error(ValueError, r"LSTMLM.loss: target id 14 is a padding id", model.loss, logits,
                     target)  # fmt: skip
    expect_error(ValueError, r"LSTMLM: sequence length 7 exceeds max_seq_len=6", model,
                 torch.zeros(1, 7, dtype=torch.long))  # fmt: skip
