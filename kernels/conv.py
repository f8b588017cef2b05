"""Fused conv2d + bias + ReLU as an implicit-GEMM Triton kernel.

``conv2d_bias_relu(x, w, b, stride, padding, dilation)`` computes
``F.relu(F.conv2d(x, w, b, stride, padding, dilation))`` in one kernel: the convolution is a
matrix product whose operands are gathered straight from the NCHW tensors (no im2col buffer),
and bias and ReLU are applied to the fp32 accumulator before the single store of the output.

Design trade-off
----------------
* Forward in Triton, backward in cuDNN. The fused forward saves a full read and write of the
  output (bias add and ReLU are free in the epilogue). The backward is two convolutions (input
  and weight gradient) that cuDNN already does well, so it calls
  ``torch.ops.aten.convolution_backward`` on the ReLU-masked output gradient. The mask is taken
  from the saved post-ReLU output (``out > 0``), so nothing beyond x, weight and out is kept.
* One kernel for both memory formats. Tensors are read through their strides, so contiguous
  NCHW and channels_last (NHWC in memory) both work; channels_last is the fast path because the
  reduction loop runs with channels innermost, where channels_last is contiguous (coalesced,
  vectorisable loads). Contiguous NCHW inputs are gathered with stride H*W along the channels.
* Two orders of the reduction loop, chosen per call (a ``constexpr``):
  - *tap-major* (C >= 32): for each filter tap (r, s), blocks of channels. The spatial index
    math and padding mask are per output pixel only (1-D), so the loop body is little more
    than a strided load and a ``tl.dot``; a channel block that does not fill BLOCK_K wastes the
    rest of the tile, which is negligible once C is a few tiles wide. It is one loop over
    (tap, channel block) pairs, not two nested loops, so that Triton's software pipelining
    overlaps loads and MMAs across taps even when C fits in one or two blocks.
  - *flat* (C < 32, e.g. the RGB stem or a 1-channel MNIST conv): the reduction index
    k = (r*KW + s)*C + c runs over all C*KH*KW values in BLOCK_K steps, recovering (r, s, c)
    per element with integer division. More index math, but no padding of C up to BLOCK_K
    (a 3-channel 7x7 stem would otherwise waste 80-90% of every tile).
* The weight is copied once per call into (KH, KW, C, K) order (a few MB at most, against the
  activation traffic of the convolution): the B operand then reads output channels contiguously
  and its rows follow the same (r, s, c) order as the reduction.
* groups=1 only. Grouped and depthwise convolutions are a different kernel (no shared
  reduction across groups); they raise a ValueError rather than silently running slowly.

Implicit-GEMM index math
------------------------
With x (N, C, H, W), weight (K, C, KH, KW), out (N, K, OH, OW),
``OH = (H + 2*pad_h - dil_h*(KH-1) - 1) // stride_h + 1`` (likewise OW), the convolution is

    out[n, k, oh, ow] = bias[k] + sum_{c, r, s} x[n, c, ih, iw] * weight[k, c, r, s]
    ih = oh*stride_h - pad_h + r*dil_h,   iw = ow*stride_w - pad_w + s*dil_w

(x read as 0 outside 0 <= ih < H, 0 <= iw < W: the padding). As a GEMM  A (M x Kg) @ B (Kg x K):

    row     m  = (n*OH + oh)*OW + ow             M  = N*OH*OW   (one row per output pixel)
    column  k  = output channel                  K  = out channels
    reduce  kg = (r*KW + s)*C + c                Kg = C*KH*KW   (channels innermost)
    A[m, kg] = x[n, c, oh*stride_h - pad_h + r*dil_h, ow*stride_w - pad_w + s*dil_w]
    B[kg, k] = weight[k, c, r, s]

Each program computes one BLOCK_M x BLOCK_N tile of out (BLOCK_M pixels x BLOCK_N channels),
accumulating fp32 over Kg in BLOCK_K steps.

Tile sizes are autotuned per GEMM shape on CUDA among the candidates for the operands' width
(``TPL_CONV_AUTOTUNE=0``: one fixed tile per shape, no tuning); the interpreter uses one small tile.

Numerics: fp16/bf16 operands, fp32 accumulation, bias added in fp32, one rounding to the output
dtype at the store. fp32 inputs use TF32 tensor cores when PyTorch's convolutions may
(``torch.backends.cudnn.allow_tf32``, on by default), IEEE fp32 products otherwise.
"""

from __future__ import annotations

import os

import torch

from triton_parallel_layers.kernels._dispatch import autocast_inputs, use_triton
from triton_parallel_layers.kernels._library import kernel_op, launch
from triton_parallel_layers.kernels._tiles import TilesByWidth, grouped_tile
from triton_parallel_layers.kernels._triton import tl, triton

__all__ = [
    "conv2d_bias_act",
    "conv2d_bias_act_ref",
    "conv2d_bias_relu",
    "conv2d_bias_relu_ref",
]

ACTIVATIONS = ("relu", None)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Reduction-loop order: below this many input channels the flat (r, s, c) loop is used, at or
# above it the tap-major loop (see the trade-off above). Module-level so tests can force either.
_FLAT_K_BELOW_CHANNELS = 32


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "pad_h", "pad_w", "GEMM_M"])
def _conv2d_fwd_kernel(
    x_ptr,  # input x, (N, C, H, W) in any memory format, read through the strides below
    w_ptr,  # weight, (K, C, KH, KW), read through the strides below
    b_ptr,  # bias, (K,); not read when HAS_BIAS is False (any pointer then)
    out_ptr,  # output, (N, K, OH, OW) in any memory format, written through the strides below
    C,  # input channels
    H,  # input height
    W,  # input width
    K_OUT,  # output channels (the GEMM's N)
    OH,  # output height
    OW,  # output width
    conv_stride_h,  # convolution stride along H
    conv_stride_w,  # convolution stride along W
    pad_h,  # zero padding above and below
    pad_w,  # zero padding left and right
    dil_h,  # dilation along H
    dil_w,  # dilation along W
    stride_xn,  # elements between x[n, c, h, w] and x[n+1, c, h, w] (H*W*C for either format)
    stride_xc,  # ... and x[n, c+1, h, w]: H*W for contiguous NCHW, 1 for channels_last
    stride_xh,  # ... and x[n, c, h+1, w]: W for NCHW, W*C for channels_last
    stride_xw,  # ... and x[n, c, h, w+1]: 1 for NCHW, C for channels_last
    stride_wk,  # elements between weight[k, c, r, s] and weight[k+1, c, r, s]
    stride_wc,  # ... and weight[k, c+1, r, s]
    stride_wr,  # ... and weight[k, c, r+1, s]
    stride_ws,  # ... and weight[k, c, r, s+1]
    stride_on,  # elements between out[n, k, oh, ow] and out[n+1, k, oh, ow]
    stride_ok,  # ... and out[n, k+1, oh, ow]
    stride_oh,  # ... and out[n, k, oh+1, ow]
    stride_ow,  # ... and out[n, k, oh, ow+1]
    GEMM_M,  # N*OH*OW, output pixels: the rows of the GEMM
    GEMM_K,  # C*KH*KW, the reduction length
    KH: tl.constexpr,  # filter height
    KW: tl.constexpr,  # filter width
    HAS_BIAS: tl.constexpr,  # add bias[k] in the epilogue
    APPLY_RELU: tl.constexpr,  # clamp at 0 in the epilogue
    FLAT_K: tl.constexpr,  # True: flat (r, s, c) reduction loop; False: tap-major loop
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; None (default) for 16-bit
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row-tiles per group in the L2-friendly program order
):
    # ---- which output tile: programs are grouped GROUP_M row-tiles at a time, so that the
    # programs running together share weight columns and neighbouring input rows in L2.
    pid_m, pid_n = grouped_tile(
        tl.program_id(0), tl.cdiv(GEMM_M, BLOCK_M), tl.cdiv(K_OUT, BLOCK_N), GROUP_M
    )

    # ---- rows: m -> (n, oh, ow), and the top-left input pixel each output pixel reads.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_ok = offs_m < GEMM_M
    n_img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    ih0 = oh * conv_stride_h - pad_h  # [BLOCK_M] input row of filter tap r = 0
    iw0 = ow * conv_stride_w - pad_w  # [BLOCK_M] input column of filter tap s = 0
    # int64 image offset: N*C*H*W may exceed 2**31 at large batch; offsets within one image
    # (C*H*W, likewise K*OH*OW for out) stay int32.
    x_img = x_ptr + n_img.to(tl.int64) * stride_xn  # [BLOCK_M] pointers to x[n, 0, 0, 0]

    # ---- columns: output channels.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < K_OUT
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        num_iters = tl.cdiv(GEMM_K, BLOCK_K)
    else:
        c_blocks = tl.cdiv(C, BLOCK_K)
        num_iters = KH * KW * c_blocks
    for it in range(num_iters):
        if FLAT_K:
            # kg = (r*KW + s)*C + c for BLOCK_K consecutive kg: (r, s, c) per element.
            kg = it * BLOCK_K + offs_k  # [BLOCK_K]
            k_ok = kg < GEMM_K
            tap = kg // C
            c = kg - tap * C
            r = tap // KW
            s = tap - r * KW
            ih = ih0[:, None] + (r * dil_h)[None, :]  # [BLOCK_M, BLOCK_K]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_mask = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_img[:, None] + ih * stride_xh + iw * stride_xw + (c * stride_xc)[None, :]
            w_row = r * stride_wr + s * stride_ws + c * stride_wc  # [BLOCK_K]
        else:
            # One filter tap (r, s) and one block of channels c0 .. c0+BLOCK_K per step.
            tap = it // c_blocks
            r = tap // KW
            s = tap - r * KW
            c = (it - tap * c_blocks) * BLOCK_K + offs_k  # [BLOCK_K]
            k_ok = c < C
            ih = ih0 + r * dil_h  # [BLOCK_M]
            iw = iw0 + s * dil_w
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # padding, per pixel
            a_mask = pix_ok[:, None] & k_ok[None, :]
            a_ptrs = x_img[:, None] + (ih * stride_xh + iw * stride_xw)[:, None]
            a_ptrs = a_ptrs + (c * stride_xc)[None, :]
            w_row = r * stride_wr + s * stride_ws + c * stride_wc  # [BLOCK_K]
        # A: [BLOCK_M, BLOCK_K] gathered input pixels (0 in the padding). B: [BLOCK_K, BLOCK_N]
        # weight rows; with the (KH, KW, C, K) copy from the launcher, contiguous along n.
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b_ptrs = w_ptr + w_row[:, None] + (offs_n * stride_wk)[None, :]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N] -> [BLOCK_M, BLOCK_N], accumulated in fp32
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # ---- epilogue on the fp32 accumulator: + bias, ReLU, one rounding to the output dtype.
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    out_row = n_img.to(tl.int64) * stride_on + oh * stride_oh + ow * stride_ow  # [BLOCK_M]
    out_ptrs = out_ptr + out_row[:, None] + (offs_n * stride_ok)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Tile configurations: autotuned on CUDA, one small fixed tile under the interpreter
# ----------------------------------------------------------------------------------------------


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_stages=stages, num_warps=warps)


# No 128x256x64 tile: with Triton 3.6 it spills 48 B per thread on sm_80 (bench/aot_compile.py).
_CUDA_CONFIGS_16BIT = [
    _config(128, 128, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),  # few output pixels (7x7 maps): more programs to fill the GPU
    _config(128, 32, 32, 4, 4),  # few output channels
    _config(128, 32, 16, 4, 4),  # few output channels and a short reduction (1-channel 3x3)
]
# fp32 operands take twice the registers of 16-bit ones for the operand loads and their
# addresses, more still with exact products (torch.backends.cudnn.allow_tf32 = False). Spilling
# there (bench/aot_compile.py, sm_80/sm_90, Triton 3.6 and 3.9): 64x64x64 on 4 warps (the 7x7
# stem: 12-220 B per thread; the 3x3 channels_last: 8 B), 128x32x16 on 4 warps (the 1-channel 3x3:
# 4 B), and with exact products 128x32x32 on 4 warps (3x3 and stem channels_last: 8-132 B) and
# 64x64x32 in 4 stages (the NCHW stem: 4 B). These compile without spills in both precisions.
_CUDA_CONFIGS_FP32 = [
    _config(64, 64, 32, 3, 8),
    _config(128, 32, 32, 4, 8),  # few output channels (channels_last only: see below)
    _config(128, 32, 16, 4, 8),  # few output channels and a short reduction (1-channel 3x3)
]
_TILES = TilesByWidth(_CUDA_CONFIGS_16BIT, _CUDA_CONFIGS_FP32)
_CUDA_CONFIGS = _TILES.configs

# Shared memory a tile's pipeline holds: num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K operands, which
# must fit an A100's 163 KiB per block (H100/H200: 227 KiB) with Triton's own scratch. Measured
# (bench/aot_compile.py): 16-bit 128x128x64 takes 97 KiB in 3 stages on sm_90, 32 KiB a stage plus
# 1 KiB.
_SHARED_MEMORY_BUDGET = 160 * 1024

# Contiguous NCHW input (channels strided by H*W): the A operand cannot be loaded as vectors along
# the channels, and the per-element addresses and masks of every pipeline stage stay in registers.
# Compiled for sm_80 and sm_90 (bench/aot_compile.py, 3x3 from 64 to 256 channels, fp16/bf16),
# every wider tile spills there (128x128x64: 500-568 B per thread; 128x32x32: 332-468 B, in fp32
# 428-492 B; 256x128x64: 5-16 KB) and only these do not. channels_last (the fast path) takes them
# all.
_STRIDED_CHANNEL_TILES = {(64, 64, 64), (64, 64, 32), (128, 32, 16)}

# The flat reduction loop (C < 32) recovers (r, s, c) per element: more live index math, so
# 128x64x64 spills there (76 B per thread on sm_90, the 7x7 RGB stem).
_FLAT_K_SPILLING_TILES = {(128, 64, 64)}


def _prune_configs(configs, named_args, **kwargs):
    """The tiles worth trying for this launch: those of the operands' width
    (:data:`_CUDA_CONFIGS_16BIT` or :data:`_CUDA_CONFIGS_FP32`), none much wider than the problem
    (they only add autotuning time), none over an A100's shared memory, none that spills
    registers for the input's memory format and reduction loop (see the sets above)."""
    k_out, gemm_k = named_args["K_OUT"], named_args["GEMM_K"]
    elem = named_args["x_ptr"].element_size()
    candidates = _TILES.for_width(configs, elem)
    strided_channels = named_args["stride_xc"] != 1
    flat_k = named_args["C"] < _FLAT_K_BELOW_CHANNELS
    max_n = max(32, triton.next_power_of_2(k_out))
    kept = []
    for cfg in candidates:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if strided_channels:
            if (bm, bn, bk) not in _STRIDED_CHANNEL_TILES:
                continue
        elif bn > max_n:
            continue
        if flat_k and (bm, bn, bk) in _FLAT_K_SPILLING_TILES:
            continue
        # BLOCK_K=16 only for very short reductions, which also rule out wider K steps
        if (bk == 16) != (gemm_k <= 16):
            continue
        if cfg.num_stages * (bm + bn) * bk * elem > _SHARED_MEMORY_BUDGET:
            continue
        kept.append(cfg)
    return kept or candidates[-1:]


def _autotune_bench(kernel_call, quantiles):
    """Time one candidate tile: short warm-up and repetition keep tuning a new shape ~1 s."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# Re-tuned per (C, K, N*OH*OW, C*KH*KW, memory format, dtype): the GEMM's shape and layout.
_conv2d_fwd_kernel_autotuned = triton.autotune(
    configs=_CUDA_CONFIGS,
    key=["C", "K_OUT", "GEMM_M", "GEMM_K", "stride_xc"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_autotune_bench,
)(_conv2d_fwd_kernel)

# TPL_CONV_AUTOTUNE=0 skips tuning on CUDA: each shape runs the first tile that survives pruning
# (one compile per kernel variant instead of one per candidate; for quick GPU tests).
_AUTOTUNE_ENV = "TPL_CONV_AUTOTUNE"

# The interpreter runs the kernel with numpy, one program at a time: its cost grows with the
# number of programs and loop steps, not with the tile size, and autotuning it is slow.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out so (and not also plainly contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _out_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def _input_precision(dtype: torch.dtype) -> str | None:
    """fp32 products as PyTorch's own convolutions do them: TF32 if cuDNN may use it."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def _conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activation: str | None,
) -> torch.Tensor:
    """Launch the kernel: x (N, C, H, W), weight (K, C, KH, KW), bias (K,) -> (N, K, OH, OW).

    The output has x's dtype and memory format. Arguments are assumed validated.
    """
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"x.dtype={x.dtype}: the Triton conv2d kernel supports {list(_TRITON_DTYPES)}"
        )
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    out = torch.empty(
        (n, k_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
    )
    if out.numel() == 0:
        return out
    # (KH, KW, C, K) storage, viewed back as (K, C, KH, KW): B rows in (r, s, c) order, output
    # channels contiguous.
    w_kcrs = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    gemm_m, gemm_k = n * oh * ow, c * kh * kw
    args = (
        x,
        w_kcrs,
        bias if bias is not None else w_kcrs,  # never read without HAS_BIAS
        out,
        c,
        h,
        w,
        k_out,
        oh,
        ow,
        *stride,
        *padding,
        *dilation,
        *x.stride(),
        *w_kcrs.stride(),
        *out.stride(),
        gemm_m,
        gemm_k,
    )
    consts = {
        "KH": kh,
        "KW": kw,
        "HAS_BIAS": bias is not None,
        "APPLY_RELU": activation == "relu",
        "FLAT_K": c < _FLAT_K_BELOW_CHANNELS,
        "INPUT_PRECISION": _input_precision(x.dtype),
    }
    grid = lambda meta: (
        triton.cdiv(gemm_m, meta["BLOCK_M"]) * triton.cdiv(k_out, meta["BLOCK_N"]),
    )
    if not x.is_cuda:  # CPU tensors: only reached under TRITON_INTERPRET=1 (triton_parallel_layers.kernels._dispatch)
        launch(_conv2d_fwd_kernel)[grid](*args, **consts, **_INTERPRETER_META)
    elif os.environ.get(_AUTOTUNE_ENV, "1") == "0":  # one tile, no tuning: quick GPU tests
        named = {"K_OUT": k_out, "GEMM_K": gemm_k, "x_ptr": x, "C": c, "stride_xc": x.stride(1)}
        cfg = _prune_configs(_CUDA_CONFIGS, named)[0]
        with torch.cuda.device(x.device):
            launch(_conv2d_fwd_kernel)[grid](
                *args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )
    else:
        with torch.cuda.device(x.device):
            launch(_conv2d_fwd_kernel_autotuned)[grid](*args, **consts)
    return out


def _conv2d_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x, weight and bias from grad_out (N, K, OH, OW).

    ``out`` is the saved post-ReLU output (None without activation): relu'(pre) = (out > 0),
    applied by ``threshold_backward`` (what ``torch.relu`` itself uses: one fused kernel, no
    boolean mask tensor). A pre-activation that was positive but rounded to 0 in a 16-bit
    output gets gradient 0; it contributed 0 to the output as well.
    """
    if out is not None:
        grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
    # cuDNN picks its algorithms by memory format; give it the format of the forward.
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    k_out = weight.shape[0]
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out,
        x,
        weight,
        [k_out] if has_bias else None,
        list(stride),
        list(padding),
        list(dilation),
        False,  # transposed
        [0, 0],  # output_padding
        1,  # groups
        [needs[0], needs[1], needs[2] and has_bias],
    )
    # grad_b = grad_out.sum over (N, OH, OW) when requested
    return grad_x, grad_w, grad_b


def _fake_conv2d(x, weight, bias, stride, padding, dilation, relu, use_triton):
    n, _, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    return torch.empty(
        (n, k_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
    )


@kernel_op("conv2d_bias_act", fake=_fake_conv2d)
def _conv2d_bias_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
    use_triton: bool,
) -> torch.Tensor:
    """``act(conv2d(x, weight) + bias)`` ``(N, K, OH, OW)`` in x's dtype and memory format: the
    Triton kernel, or the torch reference. Arguments are validated by :func:`conv2d_bias_act`."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    activation = "relu" if relu else None
    if use_triton:
        return _conv2d_fwd(x, weight, bias, stride, padding, dilation, activation)
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
    out = torch.relu(out) if relu else out
    return out.contiguous(memory_format=_memory_format(x))  # as the kernel's (a no-op in practice)


def _conv2d_setup_context(ctx, inputs, output) -> None:
    """Saves x, weight and (with ReLU) the output; no pre-activation tensor."""
    x, weight, bias, stride, padding, dilation, relu, _ = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (tuple(stride), tuple(padding), tuple(dilation))
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, grad_out: torch.Tensor):
    """cuDNN's (or the CPU's) convolution backward on the ReLU-masked gradient, for both paths:
    the reference's autograd would compute the same two convolutions."""
    x, weight, out = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    needs = tuple(ctx.needs_input_grad[:3])
    grad_x, grad_w, grad_b = _conv2d_bwd(
        grad_out, x, weight, out, ctx.has_bias, stride, padding, dilation, needs
    )
    return grad_x, grad_w, grad_b, None, None, None, None, None


_conv2d_bias_act_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


# ----------------------------------------------------------------------------------------------
# Input checks, shared by the Triton and the reference path
# ----------------------------------------------------------------------------------------------


def int_pair(value: int | tuple[int, int], name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    pair = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise ValueError(f"{name}={value!r}: expected an int or a pair of ints")
    if min(pair) < minimum:
        raise ValueError(f"{name}={value!r}: expected values >= {minimum}")
    return int(pair[0]), int(pair[1])


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    activation: str | None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate the arguments; return (stride, padding, dilation) as pairs."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not (t is None and name == "bias") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    if groups != 1:
        raise ValueError(f"groups={groups!r}: only groups=1 is supported")
    if x.dim() != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected 4-D (N, C, H, W)")
    if weight.dim() != 4:
        raise ValueError(f"weight.shape={tuple(weight.shape)}: expected 4-D (K, C, KH, KW)")
    n, c, h, w = x.shape
    k_out, c_w, kh, kw = weight.shape
    if c_w != c:
        hint = " (grouped convolution is not supported)" if c_w and c % c_w == 0 else ""
        raise ValueError(
            f"weight.shape={tuple(weight.shape)}: expected weight.shape[1] == "
            f"x.shape[1] == {c} input channels{hint}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"weight.shape={tuple(weight.shape)}: expected a kernel size >= 1")
    if bias is not None and tuple(bias.shape) != (k_out,):
        raise ValueError(f"bias.shape={tuple(bias.shape)}: expected ({k_out},), one per channel")
    tensors = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name}.dtype={t.dtype}: expected x.dtype={x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}.device={t.device}: expected x.device={x.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x.dtype={x.dtype}: expected a floating-point dtype")
    stride = int_pair(stride, "stride", 1)
    padding = int_pair(padding, "padding", 0)
    dilation = int_pair(dilation, "dilation", 1)
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"x spatial size {(h, w)} with padding={padding} is smaller than the dilated kernel "
            f"{(dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)}: output size "
            f"{(oh, ow)} is empty; expected a larger input or more padding"
        )
    return stride, padding, dilation


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def conv2d_bias_act_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    activation: str | None = "relu",
) -> torch.Tensor:
    """Pure-torch reference of :func:`conv2d_bias_act`: ``act(F.conv2d(...))``."""
    stride, padding, dilation = _check_args(
        x, weight, bias, stride, padding, dilation, groups, activation
    )
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
    return torch.relu(out) if activation == "relu" else out


def conv2d_bias_relu_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Pure-torch reference of :func:`conv2d_bias_relu`: ``F.relu(F.conv2d(...))``."""
    return conv2d_bias_act_ref(x, weight, bias, stride, padding, dilation, groups)


def conv2d_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    activation: str | None = "relu",
) -> torch.Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation))`` in one fused kernel.

    Args:
        x: (N, C, H, W), contiguous or channels_last; fp16, bf16 or fp32 on the Triton path.
        weight: (K, C, KH, KW), same dtype and device as x.
        bias: (K,) or None.
        stride, padding, dilation: an int or an (h, w) pair, as in ``F.conv2d``.
        groups: must be 1 (grouped convolution is not supported: ValueError).
        activation: ``"relu"`` or ``None`` (bias only).

    Returns:
        (N, K, OH, OW) in x's dtype and memory format, with
        ``OH = (H + 2*padding - dilation*(KH-1) - 1) // stride + 1`` (likewise OW).
        Differentiable in x, weight and bias.

    Runs the Triton kernel or the torch reference as :func:`triton_parallel_layers.kernels._dispatch.use_triton` says.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)  # as F.conv2d under torch.autocast
    stride, padding, dilation = _check_args(
        x, weight, bias, stride, padding, dilation, groups, activation
    )
    # The path is chosen here, at call time, and passed into the op (kernels/_library.py).
    return _conv2d_bias_act_op(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        activation == "relu",
        use_triton(x, weight, bias),
    )


def conv2d_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.relu(F.conv2d(x, weight, bias, stride, padding, dilation))`` in one fused kernel.

    x (N, C, H, W) contiguous or channels_last, weight (K, C, KH, KW), bias (K,) or None ->
    (N, K, OH, OW) in x's dtype and memory format. See :func:`conv2d_bias_act`.
    """
    return conv2d_bias_act(x, weight, bias, stride, padding, dilation, groups, activation="relu")
