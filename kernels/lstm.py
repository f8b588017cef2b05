"""A fused LSTM cell: the gate non-linearities and the cell update of one time step in one kernel.

An LSTM layer over a sequence ``x (T, B, I)`` with hidden size ``H`` is (PyTorch's ``nn.LSTM``,
gates in the order ``i, f, g, o``)::

    xg      = x @ W_ih^T + (b_ih + b_hh)                  (T, B, 4H)  one large GEMM, all steps
    for t in 0..T-1:
        z_t = xg[t] + h_{t-1} @ W_hh^T                    (B, 4H)     one GEMM per step
        i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)     \\
        c_t = f * c_{t-1} + i * g                                            |  the fused cell
        h_t = o * tanh(c_t)                                                  /  (this kernel)

The design trade-off: the recurrence makes the per-step work small (a ``(B, H) x (H, 4H)`` GEMM
and ``O(B H)`` elementwise math), so an unfused cell spends most of its time launching ~10
elementwise kernels and writing their intermediates. Fusing the gate math into one kernel reads
``z_t`` and ``c_{t-1}`` once and writes ``h_t`` and ``c_t`` once. The GEMMs stay cuBLAS's (the
input projection of all steps as one large GEMM up front, one ``addmm`` per step for the recurrent
term, which also adds ``xg[t]``). This file's op boundary is the cell, not the whole sequence, so
the same cell serves the tensor-parallel layer (:class:`~triton_parallel_layers.parallel_layers.lstm.ParallelLSTM`),
which all-gathers ``h_t`` between the steps: :func:`lstm_scan` takes that gather as a callable.

Backward of the cell (``dh``: the gradient reaching ``h_t``, ``dc``: the one reaching ``c_t`` from
step ``t+1``)::

    tc  = tanh(c_t)
    dc  = dc + dh * o * (1 - tc^2)                        total gradient of c_t
    dz_i = dc * g * i (1 - i)          dz_f = dc * c_{t-1} * f (1 - f)
    dz_g = dc * i * (1 - g^2)          dz_o = dh * tc * o (1 - o)
    dc_{t-1} = dc * f

The backward kernel recomputes the activations from the saved pre-activations ``z_t`` (saving them
costs the same as saving the activations, and the recomputation is a few exponentials per element).
The GEMMs of the backward (``dh_{t-1} = dz_t @ W_hh``, the weight gradients) are autograd's.

Numerics: the kernel loads ``z`` and ``c`` in their dtype (fp32, fp16 or bf16), computes in fp32,
and rounds ``h``, ``c`` (and the gradients) once at the store. ``tanh(x)`` is written as
``2 sigmoid(2x) - 1`` (Triton has no tanh): an absolute error of a few fp32 ulps near 0.

The cell is the ``torch.library`` custom op ``triton_parallel_layers::lstm_cell`` (with a fake
implementation and registered autograd, so ``torch.compile`` sees one opaque node per step) where
:func:`~triton_parallel_layers.kernels._dispatch.use_triton` picks the Triton kernel; on the
reference path :func:`lstm_cell` runs the pure-torch :func:`lstm_cell_ref` directly (autograd
differentiates it; the op's own torch implementation serves calls of the op itself). :func:`lstm` is one layer
batch-first like ``nn.LSTM``; :func:`lstm_ref` is the whole layer in plain torch ops (the unfused
cell), for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from triton_parallel_layers.kernels._dispatch import autocast_inputs, use_triton
from triton_parallel_layers.kernels._triton import tl, triton

__all__ = ["lstm", "lstm_cell", "lstm_cell_ref", "lstm_ref", "lstm_scan"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024  # elements of (B, H) per program on CUDA
_INTERPRETER_BLOCK = 256  # the interpreter's cost is per program and numpy call, not per element


# ----------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0  # 2 sigmoid(2x) - 1


@triton.jit
def _lstm_cell_fwd_kernel(
    z_ptr,  # pre-activations z, (B, 4H) contiguous, gates i|f|g|o along the row
    c_prev_ptr,  # c_{t-1}, (B, H) contiguous
    h_ptr,  # out: h_t, (B, H) contiguous
    c_ptr,  # out: c_t, (B, H) contiguous
    N,  # B * H
    H,  # hidden units (of this rank's shard)
    BLOCK: tl.constexpr,  # elements of (B, H) per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (b, j) indices
    mask = offs < N
    row = (offs // H).to(tl.int64)
    col = offs % H
    z = z_ptr + row * 4 * H + col  # z[b, j] of gate i; the others H, 2H, 3H further
    zi = tl.load(z, mask=mask, other=0.0).to(tl.float32)
    zf = tl.load(z + H, mask=mask, other=0.0).to(tl.float32)
    zg = tl.load(z + 2 * H, mask=mask, other=0.0).to(tl.float32)
    zo = tl.load(z + 3 * H, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(c_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = _sigmoid(zf) * c_prev + _sigmoid(zi) * _tanh(zg)  # fp32
    h = _sigmoid(zo) * _tanh(c)
    tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_cell_bwd_kernel(
    z_ptr,  # saved pre-activations z, (B, 4H) contiguous
    c_prev_ptr,  # saved c_{t-1}, (B, H) contiguous
    c_ptr,  # saved c_t, (B, H) contiguous
    dh_ptr,  # gradient of h_t, (B, H) contiguous
    dc_ptr,  # gradient of c_t from later steps, (B, H) contiguous
    dz_ptr,  # out: gradient of z, (B, 4H) contiguous
    dc_prev_ptr,  # out: gradient of c_{t-1}, (B, H) contiguous
    N,  # B * H
    H,  # hidden units (of this rank's shard)
    BLOCK: tl.constexpr,  # elements of (B, H) per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = (offs // H).to(tl.int64)
    col = offs % H
    z = z_ptr + row * 4 * H + col
    i = _sigmoid(tl.load(z, mask=mask, other=0.0).to(tl.float32))
    f = _sigmoid(tl.load(z + H, mask=mask, other=0.0).to(tl.float32))
    g = _tanh(tl.load(z + 2 * H, mask=mask, other=0.0).to(tl.float32))
    o = _sigmoid(tl.load(z + 3 * H, mask=mask, other=0.0).to(tl.float32))
    c_prev = tl.load(c_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tc = _tanh(tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dc = dc + dh * o * (1.0 - tc * tc)  # total gradient of c_t
    dz = dz_ptr + row * 4 * H + col
    ty = dz_ptr.dtype.element_ty
    tl.store(dz, (dc * g * i * (1.0 - i)).to(ty), mask=mask)
    tl.store(dz + H, (dc * c_prev * f * (1.0 - f)).to(ty), mask=mask)
    tl.store(dz + 2 * H, (dc * i * (1.0 - g * g)).to(ty), mask=mask)
    tl.store(dz + 3 * H, (dh * tc * o * (1.0 - o)).to(ty), mask=mask)
    tl.store(dc_prev_ptr + offs, (dc * f).to(dc_prev_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _grid(n: int, on_cuda: bool) -> tuple[tuple[int], int]:
    block = _BLOCK if on_cuda else _INTERPRETER_BLOCK
    return (triton.cdiv(n, block),), block


def _lstm_cell_fwd(z: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``z (B, 4H)``, ``c_prev (B, H)`` -> ``h, c (B, H)``."""
    z, c_prev = z.contiguous(), c_prev.contiguous()
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    n = c_prev.numel()
    if n:
        grid, block = _grid(n, z.is_cuda)
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _lstm_cell_fwd_kernel[grid](z, c_prev, h, c, n, c_prev.shape[1], BLOCK=block)
    return h, c


def _lstm_cell_bwd(
    z: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``dz (B, 4H)`` and ``dc_prev (B, H)``."""
    z, c_prev, c = z.contiguous(), c_prev.contiguous(), c.contiguous()
    dh, dc = dh.contiguous(), dc.contiguous()
    dz, dc_prev = torch.empty_like(z), torch.empty_like(c_prev)
    n = c_prev.numel()
    if n:
        grid, block = _grid(n, z.is_cuda)
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _lstm_cell_bwd_kernel[grid](
                z, c_prev, c, dh, dc, dz, dc_prev, n, c_prev.shape[1], BLOCK=block
            )
    return dz, dc_prev


# ----------------------------------------------------------------------------------------------
# The pure-torch cell (the reference path of the op)
# ----------------------------------------------------------------------------------------------


def lstm_cell_ref(z: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell in plain torch ops (differentiable by autograd): ``z (B, 4H)`` (pre-activations,
    gates ``i|f|g|o``), ``c_prev (B, H)`` -> ``h_t, c_t (B, H)``, computed in fp32, returned in
    ``c_prev``'s dtype."""
    zi, zf, zg, zo = z.float().chunk(4, dim=-1)  # 4 x (B, H)
    c = torch.sigmoid(zf) * c_prev.float() + torch.sigmoid(zi) * torch.tanh(zg)
    h = torch.sigmoid(zo) * torch.tanh(c)
    return h.to(c_prev.dtype), c.to(c_prev.dtype)


def _lstm_cell_bwd_ref(z, c_prev, c, dh, dc) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel's formulas in torch (fp32), for the reference path."""
    zi, zf, zg, zo = z.float().chunk(4, dim=-1)  # 4 x (B, H)
    i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
    tc = torch.tanh(c.float())
    dh, dc = dh.float(), dc.float()
    dc = dc + dh * o * (1 - tc * tc)
    dz = torch.cat(
        [dc * g * i * (1 - i), dc * c_prev.float() * f * (1 - f), dc * i * (1 - g * g),
         dh * tc * o * (1 - o)],
        dim=-1,
    )  # fmt: skip
    return dz.to(z.dtype), (dc * f).to(c_prev.dtype)


# ----------------------------------------------------------------------------------------------
# The custom op: forward, fake, autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("triton_parallel_layers::lstm_cell", mutates_args=())
def _lstm_cell_op(z: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(z, c_prev):
        return _lstm_cell_fwd(z, c_prev)
    with torch.no_grad():
        h, c = lstm_cell_ref(z, c_prev)
    return h.contiguous(), c.contiguous()


def _new(like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``like``'s shape, dtype and device (what both paths return)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


@_lstm_cell_op.register_fake
def _(z: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _new(c_prev), _new(c_prev)


@torch.library.custom_op("triton_parallel_layers::lstm_cell_backward", mutates_args=())
def _lstm_cell_bwd_op(
    z: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(z, c_prev, c, dh, dc):
        return _lstm_cell_bwd(z, c_prev, c, dh, dc)
    dz, dc_prev = _lstm_cell_bwd_ref(z, c_prev, c, dh, dc)
    return dz.contiguous(), dc_prev.contiguous()


@_lstm_cell_bwd_op.register_fake
def _(z, c_prev, c, dh, dc) -> tuple[torch.Tensor, torch.Tensor]:
    return _new(z), _new(c_prev)


def _setup_context(ctx, inputs, output) -> None:
    z, c_prev = inputs
    _, c = output
    ctx.save_for_backward(z, c_prev, c)


def _backward(ctx, dh: torch.Tensor | None, dc: torch.Tensor | None):
    z, c_prev, c = ctx.saved_tensors
    dh = torch.zeros_like(c) if dh is None else dh  # h_t or c_t unused downstream
    dc = torch.zeros_like(c) if dc is None else dc
    return _lstm_cell_bwd_op(z, c_prev, c, dh.to(c.dtype), dc.to(c.dtype))


_lstm_cell_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API and the whole-layer reference
# ----------------------------------------------------------------------------------------------


def lstm_cell(z: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused LSTM step from the pre-activations: ``(h_t, c_t)``, each ``(B, H)``.

    Args:
        z: ``(B, 4H)`` gate pre-activations ``x_t W_ih^T + h_{t-1} W_hh^T + b``, gates in
            ``nn.LSTM``'s order ``i, f, g, o``; fp32, fp16 or bf16.
        c_prev: ``(B, H)`` the previous cell state, ``z``'s dtype and device.

    Differentiable in both. Runs the custom op ``triton_parallel_layers::lstm_cell`` (the Triton
    kernel) where :func:`~triton_parallel_layers.kernels._dispatch.use_triton` says so, else
    :func:`lstm_cell_ref` (plain torch ops, differentiated by autograd).
    """
    if z.dim() != 2 or c_prev.dim() != 2 or z.shape != (c_prev.shape[0], 4 * c_prev.shape[1]):
        raise ValueError(
            f"lstm_cell: z of shape {tuple(z.shape)} and c_prev of shape "
            f"{tuple(c_prev.shape)}: expected (B, 4H) and (B, H)"
        )
    if z.dtype not in _DTYPES or c_prev.dtype != z.dtype:
        raise TypeError(
            f"lstm_cell: z.dtype={z.dtype}, c_prev.dtype={c_prev.dtype}: expected both the same, "
            f"one of {list(_DTYPES)}"
        )
    if not use_triton(z, c_prev):
        # The torch path as plain ops under autograd: in eager mode the custom op's dispatch costs
        # more than this small cell (~0.5 ms a step on a CPU), and torch.compile fuses the ops.
        return lstm_cell_ref(z, c_prev)
    return _lstm_cell_op(z, c_prev)


def lstm_scan(
    xg: torch.Tensor,
    weight_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    *,
    gather_hidden: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The recurrence of one LSTM layer over precomputed input projections, time-major.

    Args:
        xg: ``(T, B, 4H')`` ``x @ W_ih^T + b_ih + b_hh`` of every step (``H'``: the hidden units
            this call computes; ``H' = H`` on one device, ``H/tp`` on a tensor-parallel rank).
        weight_hh: ``(4H', H)`` recurrent weight (gates ``i|f|g|o``, each ``H'`` rows).
        h0: ``(B, H)`` the initial hidden state, whole.
        c0: ``(B, H')`` the initial cell state of these hidden units.
        gather_hidden: maps this call's ``h_t (B, H')`` to the whole ``(B, H)`` the next step's
            recurrent GEMM needs (an all-gather over the tensor-parallel group); ``None``: the
            identity (``H' = H``).

    Returns:
        ``([h_1, ..., h_T], c_T)``: the whole hidden states ``(B, H)`` of every step (the
        outputs of ``gather_hidden``) and the last cell state ``(B, H')``.
    """
    hs: list[torch.Tensor] = []
    h, c = h0, c0
    # unbind, not xg[t]: autograd then stacks the T step gradients once, where indexing would
    # write each into a fresh zero tensor of xg's whole size (O(T^2) memory traffic)
    for xg_t in xg.unbind(0):
        z = torch.addmm(xg_t, h, weight_hh.t())  # (B, 4H') = xg[t] + (B, H) @ (H, 4H')
        h_part, c = lstm_cell(z, c)  # (B, H') each
        h = h_part if gather_hidden is None else gather_hidden(h_part)  # (B, H)
        hs.append(h)
    return hs, c


def _check_lstm_args(x, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_first) -> None:
    if weight_ih.dim() != 2 or weight_hh.dim() != 2 or weight_ih.shape[0] % 4:
        raise ValueError(
            f"lstm: weight_ih of shape {tuple(weight_ih.shape)} and weight_hh of shape "
            f"{tuple(weight_hh.shape)}: expected (4H, I) and (4H, H)"
        )
    hidden = weight_ih.shape[0] // 4
    if tuple(weight_hh.shape) != (4 * hidden, hidden):
        raise ValueError(
            f"lstm: weight_hh of shape {tuple(weight_hh.shape)}: expected ({4 * hidden}, {hidden})"
        )
    if x.dim() != 3 or x.shape[-1] != weight_ih.shape[1]:
        layout = "(B, T, I)" if batch_first else "(T, B, I)"
        raise ValueError(
            f"lstm: input of shape {tuple(x.shape)}: expected {layout} with I={weight_ih.shape[1]}"
        )
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None and tuple(b.shape) != (4 * hidden,):
            raise ValueError(f"lstm: {name} of shape {tuple(b.shape)}: expected ({4 * hidden},)")
    if hx is not None:
        batch = x.shape[0] if batch_first else x.shape[1]
        for name, s in zip(("h0", "c0"), hx):
            if tuple(s.shape) != (batch, hidden):
                raise ValueError(
                    f"lstm: {name} of shape {tuple(s.shape)}: expected {(batch, hidden)}"
                )


def lstm(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    batch_first: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One unidirectional LSTM layer on the fused cell: what a one-layer ``nn.LSTM`` computes.

    Args:
        x: ``(B, T, I)`` (``(T, B, I)`` when not ``batch_first``).
        weight_ih: ``(4H, I)``; weight_hh: ``(4H, H)``; bias_ih, bias_hh: ``(4H,)`` or ``None``
            (``nn.LSTM``'s ``weight_ih_l0``, ... with gates ``i|f|g|o``).
        hx: ``(h0, c0)``, each ``(B, H)``; zeros when ``None``.

    Returns:
        ``(out, (h_n, c_n))``: ``out (B, T, H)`` (``(T, B, H)``), ``h_n, c_n (B, H)``.

    The input projection of all steps is one GEMM; each step is one ``addmm`` and one fused cell
    (:func:`lstm_scan`). Differentiable in every tensor argument. Under ``torch.autocast`` the
    inputs are cast as ``nn.LSTM``'s would be.
    """
    _check_lstm_args(x, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_first)
    h0, c0 = hx if hx is not None else (None, None)
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0 = autocast_inputs(
        x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0
    )
    xt = x.transpose(0, 1) if batch_first else x  # (T, B, I)
    batch, hidden = xt.shape[1], weight_hh.shape[1]
    if h0 is None:
        h0 = c0 = xt.new_zeros(batch, hidden)
    bias = _sum_biases(bias_ih, bias_hh)
    xg = F.linear(xt, weight_ih, bias)  # (T, B, 4H): the input projection of every step at once
    hs, c_n = lstm_scan(xg, weight_hh, h0, c0)
    out = torch.stack(hs) if hs else xt.new_zeros(0, batch, hidden)  # (T, B, H)
    h_n = hs[-1] if hs else h0
    return (out.transpose(0, 1) if batch_first else out), (h_n, c_n)


def _sum_biases(bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None) -> torch.Tensor | None:
    if bias_ih is None:
        return bias_hh
    return bias_ih if bias_hh is None else bias_ih + bias_hh


def lstm_ref(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    hx: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    batch_first: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lstm` in plain torch ops, one unfused cell per step (the textbook formulation):
    the same arguments, shapes and results."""
    _check_lstm_args(x, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_first)
    xt = x.transpose(0, 1) if batch_first else x  # (T, B, I)
    batch, hidden = xt.shape[1], weight_hh.shape[1]
    h, c = hx if hx is not None else (xt.new_zeros(batch, hidden),) * 2
    outs = []
    for x_t in xt.unbind(0):  # (B, I) each; unbind's backward stacks the gradients once
        z = F.linear(x_t, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)  # (B, 4H)
        zi, zf, zg, zo = z.chunk(4, dim=-1)
        c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
        h = torch.sigmoid(zo) * torch.tanh(c)
        outs.append(h)
    out = torch.stack(outs) if outs else xt.new_zeros(0, batch, hidden)
    return (out.transpose(0, 1) if batch_first else out), (h, c)
