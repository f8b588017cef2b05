"""Fused scaled-dot-product attention (FlashAttention-2 style) in Triton, with a torch reference.

Design trade-off
----------------
Attention ``O = softmax(scale * Q K^T) V`` done naively materializes the ``(Sq, Sk)`` score matrix
per head: memory grows quadratically with the sequence and, worse, the op becomes bound by HBM
traffic rather than by the tensor cores. This file follows FlashAttention-2 instead:

* **Forward**: one program owns a block of ``BLOCK_M`` query rows of one (batch, head), keeps them
  on chip and streams the keys/values through in blocks of ``BLOCK_N``, maintaining the softmax
  with the *online* rescaling trick (running max ``m``, running sum ``l``, fp32). Nothing of size
  ``Sq x Sk`` ever reaches memory; besides the output we save one fp32 number per query row, the
  log-sum-exp ``lse``, which is all the backward needs to rebuild the probabilities.
* **Backward**: recomputes the probabilities block by block from ``lse`` (recompute is cheaper
  than storing ``P``). It is split into two kernels so that no two programs ever write the same
  gradient element, hence **no atomics** (deterministic, and bit-identical run to run):
  ``_attn_bwd_dkdv_kernel`` owns a block of keys and loops over all query blocks (and, for
  grouped-query attention, over every query head sharing that key/value head), and
  ``_attn_bwd_dq_kernel`` owns a block of queries and loops over all key blocks. The price is
  that ``Q K^T`` and ``dO V^T`` are computed twice (once per kernel), i.e. backward costs about
  3.5 forward matmul units instead of 2.5 with atomics; we take determinism and simplicity.
* Causal attention skips the key blocks entirely above the diagonal, and splits the remaining
  ones into an unmasked stage (blocks wholly below the diagonal, no per-element compare) and a
  masked stage (the blocks the diagonal or a ragged tail cuts through).

Semantics match ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
enable_gqa=True)``: q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Sk, D)``, query head ``h`` reads key/value
head ``h // (Hq // Hkv)``; the causal mask is top-left aligned (query ``i`` sees keys ``j <= i``,
also when ``Sq != Sk``).

The math, per (batch, head), with ``s = scale`` and ``log2(e)`` folded in so the kernels use the
cheaper ``exp2``:

    forward      S = s * Q K^T                       (never stored)
                 P = softmax(S) = exp(S - lse)       lse_i = log sum_j exp(S_ij)
                 O = P V
    backward     dV    = P^T dO
                 dP    = dO V^T
                 delta_i = sum_j P_ij dP_ij = sum_d O_id dO_id          (precomputed, one kernel)
                 dS    = P * (dP - delta[:, None])   (+ P * dlse[:, None] when lse is an output)
                 dQ    = s * dS K,    dK = s * dS^T Q

In the kernels scores are kept in log2 units: ``S2 = S * log2(e)``, so ``exp(S - lse) =
exp2(S2 - lse * log2(e))``.

Layout and dtypes: inputs of any strides are read through their strides (no copy), except that a
tensor whose last (head) dim is not unit-stride is made contiguous first so loads stay coalesced.
The output ``(B, Hq, Sq, D)`` is stored heads-inside-sequence, as a contiguous ``(B, Sq, Hq, D)``
seen through ``transpose(1, 2)`` (FlashAttention's own output layout): the output projection's
``out.transpose(1, 2).reshape(B, Sq, Hq * D)`` is then a view, so the tensor the attention saves
for its backward is the very tensor the projection saves, not a rearranged copy of it. The
log-sum-exp is contiguous ``(B, Hq, Sq)``; the gradients of q, k, v are contiguous.
fp16/bf16/fp32 inputs; matmuls run in the input dtype on the tensor cores with fp32 accumulation,
softmax statistics are fp32, the output has the input dtype. fp32 inputs use exact fp32 (IEEE)
dot products unless ``torch.backends.cuda.matmul.allow_tf32`` is set. Head dims 16, 32, 64, 128.

Block sizes are autotuned on CUDA (set ``TPL_ATTENTION_AUTOTUNE=0`` before import to use one
default configuration and skip the tuning); under the interpreter one small configuration is used.

Dispatch (DESIGN.md): CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, run the kernels;
other CPU tensors run :func:`attention_ref`; :func:`triton_parallel_layers.kernels.force_backend` overrides.
Both paths run inside the custom ops ``triton_parallel_layers::flash_attention_fwd`` and
``flash_attention_bwd`` (see :mod:`triton_parallel_layers.kernels._library`); the reference path's
backward is :func:`_attn_bwd_ref`, the kernels' math in torch.
"""

# No `from __future__ import annotations`: Triton reads the `tl.constexpr` annotations of the jitted
# functions, which is safest with real (not stringified) annotations across Triton versions.
import math
import os

import torch
from einops import repeat
from torch.utils.flop_counter import register_flop_formula

from triton_parallel_layers.kernels._dispatch import (
    autocast_inputs,
    autocast_off,
    interpreter_enabled,
    use_triton,
)
from triton_parallel_layers.kernels._library import kernel_op, launch
from triton_parallel_layers.kernels._triton import tl, triton

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "attention_ref",
    "attention_ref_with_lse",
    "flash_attention",
    "flash_attention_with_lse",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)  # exp(x) == exp2(x * log2(e)); the kernels spell out 1.4426950408889634

# ------------------------------------------------------------------------------------------------
# Block-size configurations
#
# On CUDA each kernel is autotuned over a few (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates,
# keyed on the head dim, the causal flag and the sequence lengths rounded up to a power of two (so
# a training run with slightly varying lengths does not re-tune every step; the input dtype is
# part of the key automatically). The candidates are few on purpose: every one is compiled per
# (dtype, head dim, causal) combination. fp32 inputs get their own small blocks: exact fp32 dots
# run on the CUDA cores, take twice the shared memory and compile slowly with big tiles; they
# exist for checking, not speed. Under Triton's interpreter autotuning would re-run the slow
# interpreted kernel per candidate, so there is exactly one small configuration; its
# BLOCK_M != BLOCK_N on purpose, to exercise the diagonal bookkeeping in the tests.
#
# Each tile names the head dims it serves: every tile here compiles for sm_80 and sm_90 without
# register spills and within shared memory at those head dims, in its dtypes, causal or not
# (`python bench/aot_compile.py`, Triton 3.6 and 3.9; bench/results/aot_compile_triton*.md). The
# accumulators a program keeps grow with the head dim (dK and dV: 2 * BLOCK_N * HEAD_DIM fp32
# values over 32 * num_warps threads), so the big tiles stop short of 128; the figures after a
# tile are the spilled bytes per thread (worst of fp16/bf16, causal or not) that excluded it
# from a head dim. The first tile serving a head dim is the one used with autotuning off.
# ------------------------------------------------------------------------------------------------

_SMALL_HEAD_DIMS = (16, 32, 64)
_ALL_HEAD_DIMS = (16, 32, 64, 128)
# (BLOCK_M, BLOCK_N, num_warps, num_stages, head dims); BLOCK_M = query rows, BLOCK_N = key rows.
_CUDA_CONFIGS = {
    # forward: a query block stays resident, key/value blocks stream through.
    "fwd": [
        (128, 64, 4, 3, _SMALL_HEAD_DIMS),  # hd128: 892 B on sm_80, 396 B on sm_90
        (128, 64, 8, 2, (128,)),
        (128, 64, 8, 3, _SMALL_HEAD_DIMS),  # hd128: 12 B on sm_80
        (128, 128, 8, 2, _SMALL_HEAD_DIMS),  # hd128: 40 B on sm_80
        (64, 64, 4, 3, (16, 64, 128)),  # hd32, causal: 4 B on sm_80
    ],
    # dK/dV: a key block stays resident, query blocks stream through (small BLOCK_M).
    "dkdv": [
        (32, 128, 4, 3, (16,)),  # hd32: 48 B on sm_80 (Triton 3.6); hd64: 352 B; hd128: 20 KB
        (32, 64, 4, 3, (16, 32)),  # hd64: 32 B on sm_80 (Triton 3.6); hd128: 296 B
        (16, 128, 8, 2, (64,)),
        (16, 64, 4, 3, (64,)),
        (32, 64, 8, 2, (32, 128)),  # hd64: 20 B on sm_80 (Triton 3.6)
        (64, 128, 8, 2, (16,)),  # hd32: 32 B on sm_80 (Triton 3.6); hd64: 44 B; hd128: 492 B
        (64, 64, 4, 2, (16,)),  # hd32: 20 B on sm_80 (Triton 3.6); hd64: 68 B; hd128: 604 B
    ],
    # dQ: a query block stays resident, key blocks stream through (small BLOCK_N).
    "dq": [
        (128, 32, 4, 3, _SMALL_HEAD_DIMS),  # hd128: 160 B on sm_90
        (128, 32, 8, 3, (128,)),
        (128, 64, 8, 2, _SMALL_HEAD_DIMS),  # hd128: 36 B on sm_80
        (64, 64, 4, 3, _ALL_HEAD_DIMS),
        (64, 32, 4, 3, _ALL_HEAD_DIMS),
    ],
}
# fp32 (exact IEEE dots hold their operands in registers): 8 warps from hd64 (4 spill 0.7-30 KB) and
# key blocks of 16 rows at hd128 (on sm_90 32- and 64-row ones spill 0.4-1.2 KB; dK/dV: 16x32).
# Every tile is also checked with TF32 dots (torch.backends.cuda.matmul.allow_tf32 = True): dQ
# 32x32 on 8 warps spills 12 B there at hd32, causal, on sm_80 (Triton 3.6).
_CUDA_FP32_CONFIGS = {
    "fwd": [(64, 32, 4, 2, (16, 32)), (64, 32, 8, 2, (64,)), (32, 32, 8, 2, (64,)),
            (32, 16, 8, 2, (128,))],
    "dkdv": [(16, 32, 8, 2, (128,)), (16, 32, 4, 2, (32, 64)), (32, 32, 8, 2, (16,))],
    "dq": [(32, 32, 4, 2, (32, 64)), (32, 32, 8, 2, (16, 64)), (64, 16, 8, 2, (128,)),
           (32, 16, 4, 2, (128,))],
}  # fmt: skip
_INTERPRETER_CONFIGS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
_AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "seq_q_bucket", "seq_k_bucket"]


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages
    )


def _autotune(kernel: str):
    """``triton.autotune`` for ``kernel`` (``fwd``, ``dkdv`` or ``dq``).

    The 16-bit candidates plus the fp32 ones, pruned before tuning to those of the input's dtype
    that serve its head dim (Triton 3.9 runs a list of one without benchmarking).
    ``TPL_ATTENTION_AUTOTUNE=0`` (read at import) keeps only the first of those, to save compile
    time in quick GPU tests. Under the interpreter: one fixed small configuration.
    """
    if interpreter_enabled():
        configs = [_config(*_INTERPRETER_CONFIGS[kernel], num_warps=4, num_stages=1)]
        return triton.autotune(configs=configs, key=_AUTOTUNE_KEY)
    autotune = os.environ.get("TPL_ATTENTION_AUTOTUNE", "1") != "0"
    serves = {}  # (for fp32, tile) -> the head dims it serves
    for fp32, tiles in ((False, _CUDA_CONFIGS[kernel]), (True, _CUDA_FP32_CONFIGS[kernel])):
        for *tile, head_dims in tiles:
            serves[(fp32, tuple(tile))] = head_dims
    configs = [_config(*tile) for _, tile in serves]

    def for_dtype_and_head_dim(configs, named_args, **kwargs):
        # The pointers arrive in named_args, the constexprs (HEAD_DIM) as keyword arguments.
        fp32 = named_args["Q"].dtype == torch.float32
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        kept = []
        for c in configs:
            tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if head_dim in serves.get((fp32, tile), ()):
                kept.append(c)
        return kept if autotune else kept[:1]

    return triton.autotune(
        configs=configs,
        key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": for_dtype_and_head_dim},
    )


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc,  # [BLOCK_M, HEAD_DIM] fp32 running numerator  sum_j exp2(S2_ij - m_i) V_j
    l_i,  # [BLOCK_M] fp32 running denominator  sum_j exp2(S2_ij - m_i)
    m_i,  # [BLOCK_M] fp32 running row max of S2 (log2 units)
    q,  # [BLOCK_M, HEAD_DIM] the query block, input dtype
    k_base,  # pointer to K[b, h_kv, 0, 0]
    v_base,  # pointer to V[b, h_kv, 0, 0]
    stride_kn,  # K stride between key rows
    stride_kd,  # K stride along the head dim
    stride_vn,  # V stride between key rows
    stride_vd,  # V stride along the head dim
    offs_m,  # [BLOCK_M] absolute query row indices of this block
    offs_d,  # [HEAD_DIM] 0..HEAD_DIM-1
    lo,  # first key row to visit (multiple of BLOCK_N)
    hi,  # one past the last key row to visit
    seq_k,  # number of keys Sk
    qk_scale,  # softmax_scale * log2(e)
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # False: every (row, key) pair in [lo, hi) is visible and in bounds
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_k, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_k, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        # S2 = scale * log2(e) * q k^T: [BLOCK_M, HEAD_DIM] @ [HEAD_DIM, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < seq_k  # ragged tail of the keys
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])  # top-left aligned
            qk = tl.where(visible, qk, float("-inf"))
        # Online softmax: raise the running max, rescale what was accumulated under the old max.
        # Key 0 is visible to every row and is in the first block visited, so m_new is finite
        # from the first iteration on and exp2(-inf - finite) = 0 handles the initial state.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)  # [BLOCK_M] rescale factor for the old statistics
        p = tl.math.exp2(qk - m_new[:, None])  # [BLOCK_M, BLOCK_N] unnormalized probabilities
        l_i = l_i * alpha + tl.sum(p, 1)
        # acc = acc * alpha + P V: [BLOCK_M, BLOCK_N] @ [BLOCK_N, HEAD_DIM] -> [BLOCK_M, HEAD_DIM].
        # P is rounded to the input dtype to run on the tensor cores (as FlashAttention does).
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("fwd")
@triton.jit
def _attn_fwd_kernel(
    Q,  # pointer to q (B, Hq, Sq, HEAD_DIM)
    K,  # pointer to k (B, Hkv, Sk, HEAD_DIM)
    V,  # pointer to v (B, Hkv, Sk, HEAD_DIM)
    Out,  # pointer to the output (B, Hq, Sq, HEAD_DIM), input dtype (stored (B, Sq, Hq, D))
    Lse,  # pointer to the log-sum-exp (B, Hq, Sq), fp32, contiguous, natural log
    qk_scale,  # softmax_scale * log2(e)
    stride_qb,  # q stride between batches
    stride_qh,  # q stride between heads
    stride_qm,  # q stride between query rows
    stride_qd,  # q stride along the head dim
    stride_kb,  # k stride between batches
    stride_kh,  # k stride between heads
    stride_kn,  # k stride between key rows
    stride_kd,  # k stride along the head dim
    stride_vb,  # v stride between batches
    stride_vh,  # v stride between heads
    stride_vn,  # v stride between key rows
    stride_vd,  # v stride along the head dim
    stride_ob,  # out stride between batches
    stride_oh,  # out stride between heads
    stride_om,  # out stride between query rows
    stride_od,  # out stride along the head dim
    num_q_heads,  # Hq
    group_size,  # Hq // Hkv: query heads per key/value head
    seq_q,  # Sq
    seq_k,  # Sk
    seq_q_bucket,  # next power of two of Sq: autotune key only
    seq_k_bucket,  # next power of two of Sk: autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only matters for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The float arguments arrive as fp32 from Triton's launcher but as fp64 from Inductor's
    # (torch.compile types Python floats fp64), which would promote the softmax to fp64.
    qk_scale = tl.cast(qk_scale, tl.float32)
    # grid = (cdiv(Sq, BLOCK_M), B * Hq): one program per query block per (batch, query head).
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)  # int64: batch * stride can pass 2**31
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    off_hkv = off_h // group_size  # the key/value head this query head reads (SDPA's enable_gqa)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs += offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_q, other=0.0)  # [BLOCK_M, HEAD_DIM]
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key range [0, hi) this block can see, split at full_hi: blocks before it are visible to
    # every row of this query block and lie inside Sk (no per-element mask); [full_hi, hi) is cut
    # by the diagonal or by the ragged end of the keys. Causal: rows start_m.. see keys <= row,
    # so keys >= start_m + BLOCK_M are skipped outright and a key block is wholly visible when its
    # last key <= start_m.
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
        full_hi = (tl.minimum(start_m + 1, seq_k) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_hi = (seq_k // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, full_hi, seq_k, qk_scale,
        CAUSAL, False, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, full_hi, hi, seq_k, qk_scale,
        CAUSAL, True, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip

    # Epilogue: O = acc / l; lse (natural log) = (m + log2(l)) * ln(2), from log2 units.
    row_ok = offs_m < seq_q
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln(2)
    tl.store(Lse + (off_b * num_q_heads + off_h) * seq_q + offs_m, lse, mask=row_ok)
    out = acc / l_i[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # pointer to the forward output (B, Hq, Sq, HEAD_DIM)
    DOut,  # pointer to its gradient dO (B, Hq, Sq, HEAD_DIM)
    DLse,  # pointer to the gradient of lse (B, Hq, Sq), fp32 contiguous; unused if not HAS_DLSE
    Delta,  # pointer to the result delta (B, Hq, Sq), fp32 contiguous
    stride_ob,  # out stride between batches
    stride_oh,  # out stride between heads
    stride_om,  # out stride between query rows
    stride_od,  # out stride along the head dim
    stride_dob,  # dO stride between batches
    stride_doh,  # dO stride between heads
    stride_dom,  # dO stride between query rows
    stride_dod,  # dO stride along the head dim
    num_q_heads,  # Hq
    seq_q,  # Sq
    HAS_DLSE: tl.constexpr,  # whether lse itself received a gradient
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d O_id dO_id (= sum_j P_ij dP_ij), minus dlse_i when lse has a gradient:
    # the lse term adds P * dlse to dS, which is the same as lowering delta by dlse.
    # grid = (cdiv(Sq, BLOCK_M), B * Hq).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    do_ptrs = DOut + off_b * stride_dob + off_h * stride_doh
    do_ptrs += offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)  # [BLOCK_M] fp32
    row_base = (off_b * num_q_heads + off_h) * seq_q
    if HAS_DLSE:
        delta -= tl.load(DLse + row_base + offs_m, mask=row_ok, other=0.0)
    tl.store(Delta + row_base + offs_m, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,  # [BLOCK_N, HEAD_DIM] fp32 accumulator of dS^T Q (scale applied at the end)
    dv,  # [BLOCK_N, HEAD_DIM] fp32 accumulator of P^T dO
    k,  # [BLOCK_N, HEAD_DIM] this program's key block, input dtype
    v,  # [BLOCK_N, HEAD_DIM] this program's value block, input dtype
    q_base,  # pointer to Q[b, h, 0, 0] for the query head being visited
    do_base,  # pointer to dO[b, h, 0, 0]
    lse_base,  # pointer to Lse[b, h, 0]
    delta_base,  # pointer to Delta[b, h, 0]
    stride_qm,  # q stride between query rows
    stride_qd,  # q stride along the head dim
    stride_dom,  # dO stride between query rows
    stride_dod,  # dO stride along the head dim
    offs_n,  # [BLOCK_N] absolute key indices of this program's block
    offs_d,  # [HEAD_DIM] 0..HEAD_DIM-1
    lo,  # first query row to visit (multiple of BLOCK_M)
    hi,  # end of the query rows to visit (multiple of BLOCK_M, may pass Sq)
    seq_q,  # Sq
    qk_scale,  # softmax_scale * log2(e)
    MASKED: tl.constexpr,  # True on the blocks the causal diagonal cuts through
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_q
        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None],
            other=0.0,
        )  # [BLOCK_M, HEAD_DIM]
        do = tl.load(
            do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
            mask=row_ok[:, None],
            other=0.0,
        )  # [BLOCK_M, HEAD_DIM]
        # Rows past Sq get lse = +inf, so their probabilities exp2(0 - inf) are exactly 0 and
        # they add nothing: no mask is needed for the ragged end of the queries.
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        lse2 = lse * 1.4426950408889634  # in log2 units: times log2(e)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # P^T = exp2(S2^T - lse2): [BLOCK_N, HEAD_DIM] @ [HEAD_DIM, BLOCK_M] -> [BLOCK_N, BLOCK_M]
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse2[None, :])
        if MASKED:
            # Causal: query i sees key j iff j <= i. tl.where (not a product) so that an inf from a
            # masked score far above lse cannot turn into NaN.
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        # dV += P^T dO: [BLOCK_N, BLOCK_M] @ [BLOCK_M, HEAD_DIM]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # dP^T = V dO^T: [BLOCK_N, HEAD_DIM] @ [HEAD_DIM, BLOCK_M] -> [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T, fp32
        # dK += dS^T Q: [BLOCK_N, BLOCK_M] @ [BLOCK_M, HEAD_DIM]
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@_autotune("dkdv")
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # pointer to q (B, Hq, Sq, HEAD_DIM)
    K,  # pointer to k (B, Hkv, Sk, HEAD_DIM)
    V,  # pointer to v (B, Hkv, Sk, HEAD_DIM)
    DOut,  # pointer to dO (B, Hq, Sq, HEAD_DIM)
    DK,  # pointer to the result dk (B, Hkv, Sk, HEAD_DIM), input dtype
    DV,  # pointer to the result dv (B, Hkv, Sk, HEAD_DIM), input dtype
    Lse,  # pointer to the forward lse (B, Hq, Sq), fp32 contiguous, natural log
    Delta,  # pointer to delta (B, Hq, Sq), fp32 contiguous
    softmax_scale,  # the softmax scale s (natural units)
    qk_scale,  # s * log2(e)
    stride_qb,  # q stride between batches
    stride_qh,  # q stride between heads
    stride_qm,  # q stride between query rows
    stride_qd,  # q stride along the head dim
    stride_kb,  # k stride between batches
    stride_kh,  # k stride between heads
    stride_kn,  # k stride between key rows
    stride_kd,  # k stride along the head dim
    stride_vb,  # v stride between batches
    stride_vh,  # v stride between heads
    stride_vn,  # v stride between key rows
    stride_vd,  # v stride along the head dim
    stride_dob,  # dO stride between batches
    stride_doh,  # dO stride between heads
    stride_dom,  # dO stride between query rows
    stride_dod,  # dO stride along the head dim
    stride_dkb,  # dk stride between batches
    stride_dkh,  # dk stride between heads
    stride_dkn,  # dk stride between key rows
    stride_dkd,  # dk stride along the head dim
    stride_dvb,  # dv stride between batches
    stride_dvh,  # dv stride between heads
    stride_dvn,  # dv stride between key rows
    stride_dvd,  # dv stride along the head dim
    num_q_heads,  # Hq
    num_kv_heads,  # Hkv
    group_size,  # Hq // Hkv
    seq_q,  # Sq
    seq_k,  # Sk
    seq_q_bucket,  # autotune key only
    seq_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # key rows owned by this program
):
    # fp32 whichever launcher typed them (see _attn_fwd_kernel)
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    # grid = (cdiv(Sk, BLOCK_N), B * Hkv): one program per key block per (batch, key/value head).
    # It alone writes dK/dV for its keys, summing over every query head of its group: no atomics.
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_hkv = (pid_bh % num_kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Key rows past Sk load as zeros; their (finite or not) results are never stored and each
    # row of dK/dV depends only on its own row, so they need no further masking.
    key_ok = offs_n[:, None] < seq_k
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh
    k = tl.load(
        k_ptrs + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=key_ok, other=0.0
    )
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh
    v = tl.load(
        v_ptrs + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=key_ok, other=0.0
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query rows to visit: [lo, q_end). Causal: rows < start_n see none of these keys, so start
    # at the query block holding row start_n; rows [lo, mid) straddle the diagonal (masked),
    # rows >= mid = (first block start >= last key of the block) see every key (unmasked).
    q_end = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, q_end)
    else:
        lo = 0
        mid = 0
    for g in range(0, group_size):  # the query heads sharing this key/value head
        off_h = off_hkv * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DOut + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * num_q_heads + off_h) * seq_q
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
            stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
            lo, mid, seq_q, qk_scale, True, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
            stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
            mid, q_end, seq_q, qk_scale, False, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip

    dk *= softmax_scale  # S = s Q K^T, so dK = s dS^T Q
    dk_ptrs = DK + off_b * stride_dkb + off_hkv * stride_dkh
    dk_ptrs += offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=key_ok)
    dv_ptrs = DV + off_b * stride_dvb + off_hkv * stride_dvh
    dv_ptrs += offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # [BLOCK_M, HEAD_DIM] fp32 accumulator of dS K (scale applied at the end)
    q,  # [BLOCK_M, HEAD_DIM] this program's query block
    do,  # [BLOCK_M, HEAD_DIM] its output gradient
    lse2,  # [BLOCK_M] lse in log2 units
    delta,  # [BLOCK_M] delta
    k_base,  # pointer to K[b, h_kv, 0, 0]
    v_base,  # pointer to V[b, h_kv, 0, 0]
    stride_kn,  # k stride between key rows
    stride_kd,  # k stride along the head dim
    stride_vn,  # v stride between key rows
    stride_vd,  # v stride along the head dim
    offs_m,  # [BLOCK_M] absolute query row indices
    offs_d,  # [HEAD_DIM] 0..HEAD_DIM-1
    lo,  # first key row to visit (multiple of BLOCK_N)
    hi,  # one past the last key row to visit
    seq_k,  # Sk
    qk_scale,  # softmax_scale * log2(e)
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # False: every (row, key) pair in [lo, hi) is visible and in bounds
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_k, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_k, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        # P = exp2(S2 - lse2): [BLOCK_M, HEAD_DIM] @ [HEAD_DIM, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            visible = offs_n[None, :] < seq_k
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(visible, p, 0.0)
        # dP = dO V^T: [BLOCK_M, HEAD_DIM] @ [HEAD_DIM, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # fp32
        # dQ += dS K: [BLOCK_M, BLOCK_N] @ [BLOCK_N, HEAD_DIM]
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@_autotune("dq")
@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # pointer to q (B, Hq, Sq, HEAD_DIM)
    K,  # pointer to k (B, Hkv, Sk, HEAD_DIM)
    V,  # pointer to v (B, Hkv, Sk, HEAD_DIM)
    DOut,  # pointer to dO (B, Hq, Sq, HEAD_DIM)
    DQ,  # pointer to the result dq (B, Hq, Sq, HEAD_DIM), input dtype
    Lse,  # pointer to the forward lse (B, Hq, Sq), fp32 contiguous, natural log
    Delta,  # pointer to delta (B, Hq, Sq), fp32 contiguous
    softmax_scale,  # the softmax scale s (natural units)
    qk_scale,  # s * log2(e)
    stride_qb,  # q stride between batches
    stride_qh,  # q stride between heads
    stride_qm,  # q stride between query rows
    stride_qd,  # q stride along the head dim
    stride_kb,  # k stride between batches
    stride_kh,  # k stride between heads
    stride_kn,  # k stride between key rows
    stride_kd,  # k stride along the head dim
    stride_vb,  # v stride between batches
    stride_vh,  # v stride between heads
    stride_vn,  # v stride between key rows
    stride_vd,  # v stride along the head dim
    stride_dob,  # dO stride between batches
    stride_doh,  # dO stride between heads
    stride_dom,  # dO stride between query rows
    stride_dod,  # dO stride along the head dim
    stride_dqb,  # dq stride between batches
    stride_dqh,  # dq stride between heads
    stride_dqm,  # dq stride between query rows
    stride_dqd,  # dq stride along the head dim
    num_q_heads,  # Hq
    group_size,  # Hq // Hkv
    seq_q,  # Sq
    seq_k,  # Sk
    seq_q_bucket,  # autotune key only
    seq_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per inner step
):
    # fp32 whichever launcher typed them (see _attn_fwd_kernel)
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    # grid = (cdiv(Sq, BLOCK_M), B * Hq): one program per query block per (batch, query head);
    # it alone writes dQ for its rows.
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    off_hkv = off_h // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q = tl.load(
        q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )
    do_ptrs = DOut + off_b * stride_dob + off_h * stride_doh
    do = tl.load(
        do_ptrs + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=row_ok[:, None],
        other=0.0,
    )
    # Rows past Sq compute finite garbage (q = dO = lse = 0) that is never stored.
    row_base = (off_b * num_q_heads + off_h) * seq_q
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # log2(e)
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The same key ranges as the forward pass (see _attn_fwd_kernel).
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
        full_hi = (tl.minimum(start_m + 1, seq_k) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_hi = (seq_k // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, full_hi, seq_k, qk_scale, CAUSAL, False, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, full_hi, hi, seq_k, qk_scale, CAUSAL, True, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip

    dq *= softmax_scale  # S = s Q K^T, so dQ = s dS K
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh
    dq_ptrs += offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

# The backward's delta preprocessing: one plain launch, no tuning. 8 warps: on 4 the fp32 block
# spills 4 B per thread at head dim 128 on sm_90 (Triton 3.6; bench/aot_compile.py).
_PREPROCESS_BLOCK_M = 64
_PREPROCESS_NUM_WARPS = 8


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 dots unless torch itself allows TF32 matmuls. Ignored for 16-bit."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """Any strides are read as they are, but the head dim must be unit-stride (coalesced loads)."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """The attention output for query ``q (B, Hq, Sq, D)``, uninitialized: ``(B, Hq, Sq, D)`` over a
    contiguous ``(B, Sq, Hq, D)`` buffer (the file header says why). The kernels, the reference
    path and the fake implementation all allocate it here, so their strides agree."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    shape = (batch, seq_q, num_q_heads, head_dim)
    return q.new_empty(shape).transpose(1, 2)


def _attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out (B, Hq, Sq, D) in q's dtype (stored (B, Sq, Hq, D)),
    lse (B, Hq, Sq) fp32."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    out = _empty_out(q)  # the kernel writes through its strides
    lse = torch.empty((batch, num_q_heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seq_k == 0:  # no keys: SDPA returns zeros; the empty log-sum-exp is -inf
        return out.zero_(), lse.fill_(float("-inf"))

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * num_q_heads)

    launch(_attn_fwd_kernel)[grid](
        q, k, v, out, lse, softmax_scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_q_heads, num_q_heads // num_kv_heads, seq_q, seq_k,
        triton.next_power_of_2(seq_q), triton.next_power_of_2(seq_k),
        HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def _attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta preprocessing, then the dK/dV and dQ kernels. Returns dq, dk, dv."""
    batch, num_q_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group_size = num_q_heads // num_kv_heads
    # Contiguous gradients whatever the inputs' strides (the kernels write through strides): the
    # layout the op's fake implementation promises.
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if seq_q == 0 or seq_k == 0 or batch == 0 or num_q_heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout = _unit_stride_last(dout.to(q.dtype))
    precision = _dot_precision(q.dtype)
    buckets = (triton.next_power_of_2(seq_q), triton.next_power_of_2(seq_k))

    delta = torch.empty_like(lse)  # (B, Hq, Sq) fp32
    has_dlse = dlse is not None
    if has_dlse:
        dlse = dlse.to(torch.float32).contiguous()
    grid = (triton.cdiv(seq_q, _PREPROCESS_BLOCK_M), batch * num_q_heads)
    launch(_attn_bwd_preprocess_kernel)[grid](
        out, dout, dlse if has_dlse else delta, delta,
        *out.stride(), *dout.stride(), num_q_heads, seq_q,
        HAS_DLSE=has_dlse, HEAD_DIM=head_dim, BLOCK_M=_PREPROCESS_BLOCK_M,
        num_warps=_PREPROCESS_NUM_WARPS,
    )  # fmt: skip

    def grid_dkdv(meta):
        return (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * num_kv_heads)

    launch(_attn_bwd_dkdv_kernel)[grid_dkdv](
        q, k, v, dout, dk, dv, lse, delta, softmax_scale, softmax_scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        num_q_heads, num_kv_heads, group_size, seq_q, seq_k, *buckets,
        HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION=precision,
    )  # fmt: skip

    def grid_dq(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * num_q_heads)

    launch(_attn_bwd_dq_kernel)[grid_dq](
        q, k, v, dout, dq, lse, delta, softmax_scale, softmax_scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        num_q_heads, group_size, seq_q, seq_k, *buckets,
        HEAD_DIM=head_dim, CAUSAL=causal, DOT_PRECISION=precision,
    )  # fmt: skip
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Autograd Function, functional API and the torch reference
# ------------------------------------------------------------------------------------------------


def _attn_bwd_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`attention_ref_with_lse` in torch, fp32: the kernels' math (see the
    file header) with the ``(Sq, Sk)`` probabilities materialized. Returns dq, dk, dv."""
    group_size = q.shape[1] // k.shape[1]
    q32, do32 = q.float(), dout.float()
    k32 = repeat(k.float(), "b h s d -> b (h g) s d", g=group_size)  # (B, Hq, Sk, D)
    v32 = repeat(v.float(), "b h s d -> b (h g) s d", g=group_size)
    scores = torch.einsum("bhqd,bhkd->bhqk", q32, k32) * softmax_scale  # (B, Hq, Sq, Sk)
    if causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))  # P; rows with no visible key are 0
    dp = torch.einsum("bhqd,bhkd->bhqk", do32, v32)  # dP = dO V^T
    delta = (out.float() * do32).sum(-1)  # (B, Hq, Sq): rowsum(P * dP)
    if dlse is not None:
        delta = delta - dlse.float()  # lse's own gradient: dS += P * dlse
    ds = probs * (dp - delta.unsqueeze(-1))  # (B, Hq, Sq, Sk)
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, k32) * softmax_scale
    # Key/value head j collects the gradients of its group_size query heads.
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, q32) * softmax_scale
    dv = torch.einsum("bhqk,bhqd->bhkd", probs, do32)
    dk = dk.unflatten(1, (k.shape[1], group_size)).sum(2)
    dv = dv.unflatten(1, (k.shape[1], group_size)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _fake_attn_fwd(q, k, v, causal, softmax_scale, use_triton):
    batch, num_q_heads, seq_q, _ = q.shape
    return _empty_out(q), q.new_empty((batch, num_q_heads, seq_q), dtype=torch.float32)


@kernel_op("flash_attention_fwd", fake=_fake_attn_fwd)
def _flash_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Sq, D) stored (B, Sq, Hq, D), lse (B, Hq, Sq) fp32)``: the Triton forward,
    or the reference."""
    if use_triton:
        q, k, v = (_unit_stride_last(t) for t in (q, k, v))
        return _attn_fwd(q, k, v, causal, softmax_scale)
    with autocast_off(q):  # the reference accumulates in fp32 whatever autocast says
        out32, lse = _attention_ref_fp32(q, k, v, causal, softmax_scale)
    # rounded to q's dtype straight into the kernel's (and the fake's) layout: one pass
    return _empty_out(q).copy_(out32), lse.contiguous()


def _fake_attn_bwd(q, k, v, out, lse, dout, dlse, causal, softmax_scale, use_triton):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


@kernel_op("flash_attention_bwd", fake=_fake_attn_bwd)
def _flash_attention_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, from ``dout`` ``(B, Hq, Sq, D)`` (any strides) and ``dlse``
    ``(B, Hq, Sq)`` (or None)."""
    if use_triton:
        q, k, v = (_unit_stride_last(t) for t in (q, k, v))
        return _attn_bwd(q, k, v, out, lse, dout, dlse, causal, softmax_scale)
    with autocast_off(q):
        grads = _attn_bwd_ref(q, k, v, out, lse, dout, dlse, causal, softmax_scale)
    return tuple(g.contiguous() for g in grads)  # the kernels' (and the fake's) layout


def _attn_setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, softmax_scale, use_triton = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (causal, softmax_scale, use_triton)


def _attn_backward(ctx, dout, dlse):
    """Both outputs are differentiable: a gradient reaching ``lse`` (from merging partial
    attentions) is folded into ``delta``. The kernels' backward is not itself differentiable."""
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_attention_bwd_op(q, k, v, out, lse, dout, dlse, *ctx.args)
    return dq, dk, dv, None, None, None


_flash_attention_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


# FLOPs of the ops for torch.utils.flop_counter.FlopCounterMode (MFU, the pipeline's "flops"
# partition, the planner's profiles), by PyTorch's convention for SDPA: the two products of the
# forward, ``Q K^T`` and ``P V``, in full (causal masking not discounted), and twice that in the
# backward (dV, dP, dQ, dK; the recomputed ``Q K^T`` not counted).
def _attn_flops(q_shape, k_shape, v_shape) -> int:
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


@register_flop_formula(torch.ops.triton_parallel_layers.flash_attention_fwd)
def _attn_fwd_flop_formula(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return _attn_flops(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.triton_parallel_layers.flash_attention_bwd)
def _attn_bwd_flop_formula(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return 2 * _attn_flops(q_shape, k_shape, v_shape)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None,
    *,
    for_kernel: bool,
) -> float:
    """Validate q, k, v (see :func:`flash_attention`); return the softmax scale to use.

    ``for_kernel`` adds the kernel's limits (dtype fp16/bf16/fp32, head dim 16/32/64/128); the
    reference alone takes any floating dtype (fp64 for exact checks) and any head dim.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if for_kernel and q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported: expected one of {_SUPPORTED_DTYPES}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"dtype {q.dtype} is not supported: expected a floating-point dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    (batch, num_q_heads, _, head_dim), (kv_batch, num_kv_heads, _, kv_head_dim) = q.shape, k.shape
    if kv_batch != batch:
        raise ValueError(f"q has batch size {batch} but k/v have {kv_batch}")
    if kv_head_dim != head_dim:
        raise ValueError(f"q has head dim {head_dim} but k/v have {kv_head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({num_q_heads}) must be a multiple of the number of "
            f"key/value heads ({num_kv_heads})"
        )
    if for_kernel and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {head_dim} is not supported: expected one of {SUPPORTED_HEAD_DIMS}"
        )
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def attention_ref_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch attention with fp32 accumulation, plus the per-row log-sum-exp.

    Args: q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``.
    Returns: ``out`` ``(B, Hq, Sq, D)`` in q's dtype and ``lse`` ``(B, Hq, Sq)`` fp32 (natural log
    of the sum over visible keys of ``exp(scale * q.k)``). Materializes the ``(Sq, Sk)`` scores:
    a reference, and the fast path for CPU training, not for long sequences.
    """
    scale = _check_inputs(q, k, v, softmax_scale, for_kernel=False)
    out, lse = _attention_ref_fp32(q, k, v, causal, scale)
    return out.to(q.dtype), lse


def _attention_ref_fp32(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_ref_with_lse` on checked inputs, the output left in fp32."""
    group_size = q.shape[1] // k.shape[1]
    # Query head h reads key/value head h // group_size: repeat each kv head group_size times.
    k32 = repeat(k.float(), "b h s d -> b (h g) s d", g=group_size)
    v32 = repeat(v.float(), "b h s d -> b (h g) s d", g=group_size)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k32) * scale  # (B, Hq, Sq, Sk) fp32
    if causal:  # top-left aligned, as SDPA: query i sees keys j <= i
        seq_q, seq_k = q.shape[2], k.shape[2]
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Sq)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("bhqk,bhkd->bhqd", probs, v32), lse


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Pure-torch attention, fp32 accumulation: q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Sk, D)``
    -> ``(B, Hq, Sq, D)`` in q's dtype. See :func:`attention_ref_with_lse`."""
    return attention_ref_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale)[0]


def flash_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flash_attention` that also returns the per-row log-sum-exp.

    Returns ``out`` ``(B, Hq, Sq, D)`` in the input dtype (laid out as :func:`flash_attention`'s)
    and ``lse`` ``(B, Hq, Sq)`` fp32 contiguous, natural log, so that attentions over disjoint key
    sets merge exactly:
    ``lse = logaddexp(lse1, lse2)``, ``out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2``.
    Both outputs are differentiable.
    """
    q, k, v = autocast_inputs(q, k, v)  # as SDPA under torch.autocast
    scale = _check_inputs(q, k, v, softmax_scale, for_kernel=True)
    # The path is chosen here, at call time (under torch.compile: at trace time, guarded), and
    # passed into the op: see triton_parallel_layers.kernels._library.
    return _flash_attention_fwd_op(q, k, v, bool(causal), scale, use_triton(q, k, v))


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Fused attention, the same result as
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
    enable_gqa=True)``; differentiable in q, k, v.

    Args:
        q: ``(B, Hq, Sq, D)``; k, v: ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (grouped-query
            attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``). One dtype
            (fp16, bf16 or fp32) and one device for all three; ``D`` in 16, 32, 64, 128 (checked
            on every path, so code that runs on CPU also runs on GPU). Any strides.
        causal: mask keys after the query, top-left aligned (query ``i`` sees keys ``j <= i``).
        softmax_scale: defaults to ``1 / sqrt(D)``.

    Returns: ``(B, Hq, Sq, D)`` in the input dtype, stored as a contiguous ``(B, Sq, Hq, D)``
    (``out.transpose(1, 2)`` is contiguous), so merging the heads back into the features,
    ``out.transpose(1, 2).reshape(B, Sq, Hq * D)``, is a view and costs no copy.

    CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) run the Triton kernels, other CPU
    tensors :func:`attention_ref`; :func:`triton_parallel_layers.kernels.force_backend` picks one explicitly.
    """
    return flash_attention_with_lse(q, k, v, causal=causal, softmax_scale=softmax_scale)[0]
