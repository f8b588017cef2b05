"""A Triton GEMM ``out = x @ w.T (+ bias) (+ partial)`` that writes into any strided output.

This is the compute half of the communication-overlapped matmuls
(:mod:`triton_parallel_layers.kernels.collective_matmul`): they cut one large GEMM into ``tp`` row chunks, each
multiplied as soon as its input has arrived and written straight into its rows of a preallocated
output, so the kernel here is built for that:

* **Any strides, no copies.** ``x``, ``w``, ``out`` and ``partial`` are read and written through
  their two strides each, so transposed operands (``g.T @ x`` for a weight gradient is
  ``matmul(g.t(), x.t())``) and slices of a larger output (one chunk's rows, or a block of
  columns) need no ``.contiguous()`` copy.
* **Fused epilogue.** The fp32 accumulator gets the bias and an incoming partial sum
  (``out = x @ w.T + partial``) before the single rounding to the output dtype. ``partial`` may be
  ``out`` itself: ``acc += x @ w.T`` in place, which is how a weight gradient accumulates chunk by
  chunk. Each output tile is read and written by one program, so the aliasing is safe.
* **Output dtype free.** fp16/bf16/fp32 operands, fp32 accumulation, and an output of any of the
  three dtypes (an fp32 accumulator for bf16 operands, say).

Math, with ``x (M, K)``, ``w (N, K)``::

    out[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n])  (+ partial[m, n])

Each program computes one ``BLOCK_M x BLOCK_N`` tile of ``out``, walking ``K`` in ``BLOCK_K``
steps with a ``tl.dot`` per step; programs are ordered ``GROUP_M`` row-tiles at a time so the
ones running together share ``w`` columns in L2 (Triton's matmul tutorial explains the trick).
Rows past ``M`` and columns past ``N`` are wrapped (``% M``) for the loads, so the inner loop
needs no row/column masks; only the store is masked. The reduction is masked only when ``K`` is
not a multiple of ``BLOCK_K``.

Numerics: fp32 accumulation; bias and partial are added in fp32; one rounding at the store. fp32
operands use TF32 tensor cores exactly when PyTorch's own matmuls do
(``torch.backends.cuda.matmul.allow_tf32``), exact fp32 products otherwise.

Tiles are autotuned on CUDA (keyed by ``M, N, K``; candidates per operand width); the interpreter
runs one small tile. Reference: :func:`matmul_ref`; :func:`matmul` dispatches between them
by :func:`triton_parallel_layers.kernels._dispatch.use_triton` and is differentiable when no ``out`` is given.
"""

from __future__ import annotations

import torch

from triton_parallel_layers.kernels._dispatch import use_triton
from triton_parallel_layers.kernels._library import eager_launches, kernel_op, launch
from triton_parallel_layers.kernels._tiles import TilesByWidth, grouped_tile
from triton_parallel_layers.kernels._triton import tl, triton

__all__ = ["matmul", "matmul_ref"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _matmul_fwd_kernel(
    x_ptr,  # x, (M, K), read through stride_xm, stride_xk
    w_ptr,  # w, (N, K), read through stride_wn, stride_wk (the product uses w.T)
    out_ptr,  # out, (M, N), written through stride_om, stride_on; any float dtype
    bias_ptr,  # bias, (N,) contiguous; not read without HAS_BIAS (any pointer then)
    partial_ptr,  # partial, (M, N), any float dtype; not read without HAS_PARTIAL; may be out_ptr
    M,  # rows of x and out
    N,  # rows of w: columns of out
    K,  # the reduction length
    stride_xm,  # elements between x[m, k] and x[m+1, k]
    stride_xk,  # ... and x[m, k+1] (1 for a row-major x, M for x = y.t())
    stride_wn,  # elements between w[n, k] and w[n+1, k]
    stride_wk,  # ... and w[n, k+1]
    stride_om,  # elements between out[m, n] and out[m+1, n] (the full row pitch for a slice)
    stride_on,  # ... and out[m, n+1]
    stride_pm,  # elements between partial[m, n] and partial[m+1, n]
    stride_pn,  # ... and partial[m, n+1]
    HAS_BIAS: tl.constexpr,  # add bias[n] in the epilogue
    HAS_PARTIAL: tl.constexpr,  # add partial[m, n] in the epilogue
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: the reduction loads need no mask
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "tf32" or "ieee"; None for 16-bit
    BLOCK_M: tl.constexpr,  # rows of out per program
    BLOCK_N: tl.constexpr,  # columns of out per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row-tiles per group in the L2-friendly program order
):
    # ---- which output tile: GROUP_M row-tiles at a time sweep all column tiles, so the programs
    # in flight together reuse the same columns of w (and rows of x) from L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of out
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of out
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    # Rows past M and columns past N are wrapped for the loads (never stored), so the loop loads
    # need no row/column mask. int64 row offsets: M * stride_xm may pass 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K  # the last step reads past K: those lanes load 0
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N] (a tile of w.T) -> [BLOCK_M, BLOCK_N], fp32
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue, in fp32: + bias[n] + partial[m, n], then one rounding at the store.
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc = acc + bias[None, :]
    if HAS_PARTIAL:
        p_ptrs = partial_ptr + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn
        acc = acc + tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Tile configurations: autotuned on CUDA, one small fixed tile under the interpreter
# ----------------------------------------------------------------------------------------------


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_stages=stages, num_warps=warps)


# Hopper (H100/H200) favours big 128x256 tiles with 8 warps (two warpgroups) and 3-4 stages for
# 16-bit operands; the smaller tiles serve thin or short problems.
_CUDA_CONFIGS_16BIT = [
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 256, 64, 4, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 64, 3, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(128, 128, 32, 4, 4),
    _config(64, 32, 32, 4, 4),  # tiny problems: enough programs to fill the GPU
]
# fp32 operands: exact products (the default) hold their operands in registers, so the 16-bit
# tiles that fit in shared memory spill there (bench/aot_compile.py, sm_80/sm_90, Triton 3.6 and
# 3.9: 128x128x32 on 4 warps 8-712 B per thread, 64x64x64 on 4 warps 4-980 B, 64x32x32 on 4 warps
# 4-12 B on sm_90). These compile without spills in both precisions (IEEE and TF32).
_CUDA_CONFIGS_FP32 = [
    _config(128, 128, 32, 3, 8),
    _config(64, 64, 16, 4, 4),
    _config(64, 32, 32, 4, 8),  # tiny problems
]
_TILES = TilesByWidth(_CUDA_CONFIGS_16BIT, _CUDA_CONFIGS_FP32)
_CUDA_CONFIGS = _TILES.configs


# Shared memory a tile's pipeline holds: num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K operands, which
# must fit an A100's 163 KiB per block (H100/H200: 227 KiB) with Triton's own scratch. Measured
# (bench/aot_compile.py): 16-bit 128x256x64 takes 145 KiB in 3 stages, 48 KiB a stage plus 1, so
# 4 stages would pass the A100's limit.
_SHARED_MEMORY_BUDGET = 160 * 1024


# With a partial sum to add, the epilogue holds a second [BLOCK_M, BLOCK_N] tile beside the fp32
# accumulator: tiles of 128 accumulator values per thread spill then (bf16 on sm_90, measured with
# bench/aot_compile.py: 128x256x64 on 8 warps 232 B per thread, 256x128x64 64 B, 128x128x64 on
# 4 warps 40 B, 128x128x32 on 4 warps 44 B); 64 per thread do not.
_MAX_ACC_PER_THREAD_WITH_PARTIAL = 64


def _prune_configs(configs, named_args, **kwargs):
    """The tiles of the operands' width (:data:`_CUDA_CONFIGS_16BIT` or
    :data:`_CUDA_CONFIGS_FP32`), less those far wider than the problem, those over an A100's
    shared memory, and those that spill registers with the partial-sum epilogue."""
    m, n = named_args["M"], named_args["N"]
    has_partial = kwargs.get("HAS_PARTIAL", named_args.get("HAS_PARTIAL", False))
    elem = named_args["x_ptr"].element_size()
    candidates = _TILES.for_width(configs, elem)
    max_m = max(64, triton.next_power_of_2(m))
    max_n = max(32, triton.next_power_of_2(n))
    kept = []
    for cfg in candidates:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        smem = (bm + bn) * bk * elem * cfg.num_stages
        acc_per_thread = bm * bn // (32 * cfg.num_warps)
        if has_partial and acc_per_thread > _MAX_ACC_PER_THREAD_WITH_PARTIAL:
            continue
        if bm <= max_m and bn <= max_n and smem <= _SHARED_MEMORY_BUDGET:
            kept.append(cfg)
    return kept or candidates[-1:]


def _autotune_bench(kernel_call, quantiles):
    """Time one candidate tile: a short warm-up and repetition keep tuning a new shape ~1 s."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# Re-tuned per (M, N, K) (and operand dtypes, which Triton adds to the key). restore_value: the
# candidate runs would otherwise accumulate into an ``out`` that is also ``partial``.
_matmul_fwd_kernel_autotuned = triton.autotune(
    configs=_CUDA_CONFIGS,
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["out_ptr"],
    do_bench=_autotune_bench,
)(_matmul_fwd_kernel)

# The interpreter runs one program at a time with numpy: its cost grows with the number of
# programs and loop steps, not with the tile size; autotuning it would only cost time.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _input_precision(dtype: torch.dtype) -> str | None:
    """fp32 products as PyTorch's own matmuls do them: TF32 when cuBLAS may use it."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _matmul_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the kernel: ``out (M, N) = x (M, K) @ w (N, K).T (+ bias (N,)) (+ partial (M, N))``.

    All four matrices are 2-D with any strides; arguments are assumed validated.
    """
    if x.dtype not in _TRITON_DTYPES or w.dtype != x.dtype:
        raise TypeError(
            f"x.dtype={x.dtype}, weight.dtype={w.dtype}: the Triton matmul needs both the same, "
            f"one of {list(_TRITON_DTYPES)}"
        )
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or n == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()
    args = (
        x,
        w,
        out,
        bias if bias is not None else out,  # never read without HAS_BIAS
        partial if partial is not None else out,  # never read without HAS_PARTIAL
        m,
        n,
        k,
        *x.stride(),
        *w.stride(),
        *out.stride(),
        *(partial.stride() if partial is not None else out.stride()),
    )
    consts = {
        "HAS_BIAS": bias is not None,
        "HAS_PARTIAL": partial is not None,
        "INPUT_PRECISION": _input_precision(x.dtype),
    }
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        # EVEN_K depends on the tile: a heuristic over the tuned BLOCK_K would re-key the
        # autotuner; a masked reduction for all is cheap next to a per-tile decision.
        even_k = all(k % cfg.kwargs["BLOCK_K"] == 0 for cfg in _CUDA_CONFIGS)
        with torch.cuda.device(x.device):
            launch(_matmul_fwd_kernel_autotuned)[grid](*args, **consts, EVEN_K=even_k)
    else:  # CPU tensors: only reached under TRITON_INTERPRET=1 (triton_parallel_layers.kernels._dispatch)
        meta = _INTERPRETER_META
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        launch(_matmul_fwd_kernel)[grid](*args, **consts, EVEN_K=k % meta["BLOCK_K"] == 0, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# Reference, checks, autograd Function, functional API
# ----------------------------------------------------------------------------------------------


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (in-place accumulation)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def matmul_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    partial: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch ``x @ weight.T (+ bias) (+ partial)``; the same contract as :func:`matmul`.

    Computed in ``out``'s dtype when ``out`` is given (operands cast to it), else in ``x``'s.
    """
    n, k = weight.shape
    x2 = x.reshape(-1, k)  # (M, K)
    dtype = out.dtype if out is not None else x.dtype
    a, b = x2.to(dtype), weight.to(dtype)  # no-ops unless out is wider than x
    addend = None if partial is None else partial.reshape(-1, n)  # (M, N)
    if bias is not None:
        addend = bias.to(dtype) if addend is None else addend + bias  # (N,) or (M, N)
    if out is None:
        res = torch.mm(a, b.t()) if addend is None else torch.addmm(addend.to(dtype), a, b.t())
        return res.view(*x.shape[:-1], n)  # (*, N)
    out2 = _out_2d(out, n)
    if addend is None:
        torch.mm(a, b.t(), out=out2)  # (M, K) @ (K, N)
    elif _same_view(addend, out2):
        out2.addmm_(a, b.t())  # out += (M, K) @ (K, N)
    else:
        torch.addmm(addend.to(dtype), a, b.t(), out=out2)
    return out


def _out_2d(out: torch.Tensor, n: int) -> torch.Tensor:
    """``out`` as an ``(M, N)`` view (it must be one: results are written through it)."""
    if out.dim() == 2:
        return out
    try:
        return out.view(-1, n)
    except RuntimeError as err:
        raise ValueError(
            f"out of shape {tuple(out.shape)} and strides {out.stride()} cannot be viewed as a "
            f"2-D (rows, {n}) matrix; pass a 2-D view of the rows to write"
        ) from err


def _check_matmul_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x of shape {tuple(x.shape)} does not match weight of shape {tuple(weight.shape)}: "
            f"expected x's last dim to be K={k}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x.dtype={x.dtype} and weight.dtype={weight.dtype} must match")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} and dtype {bias.dtype}: expected ({n},) {x.dtype}"
        )
    expected = (*x.shape[:-1], n)
    if partial is not None and tuple(partial.shape) != expected:
        raise ValueError(f"partial of shape {tuple(partial.shape)}: expected {expected}")
    if out is not None and tuple(out.shape) != expected:
        raise ValueError(f"out of shape {tuple(out.shape)}: expected {expected}")
    devices = {t.device for t in (x, weight, bias, partial, out) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _matmul_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    out: torch.Tensor | None,
    triton_path: bool | None = None,
) -> torch.Tensor:
    """One (non-autograd) product on the Triton kernel (``triton_path``) or the reference;
    ``None``: as :func:`~triton_parallel_layers.kernels._dispatch.use_triton` says now."""
    if triton_path is None:
        triton_path = use_triton(x, weight, bias, partial, out)
    if not triton_path:
        return matmul_ref(x, weight, bias, partial=partial, out=out)
    n, k = weight.shape
    x2 = x.reshape(-1, k)  # (M, K): a view unless x's leading dims are not mergeable
    p2 = None if partial is None else partial.reshape(-1, n)  # (M, N)
    if out is None:
        res = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
        return _matmul_fwd(x2, weight, res, bias, p2).view(*x.shape[:-1], n)
    _matmul_fwd(x2, weight, _out_2d(out, n), bias, p2)
    return out


def _matmul_into(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_matmul_impl` (into ``out`` when given), called outside the op
    (``matmul(..., out=...)``, the collective matmuls): eagerly, the kernel is launched directly
    (see :func:`~triton_parallel_layers.kernels._library.eager_launches`)."""
    if torch.compiler.is_compiling():
        return _matmul_impl(x, weight, bias, partial, out)
    with eager_launches():
        return _matmul_impl(x, weight, bias, partial, out)


def _fake_matmul(x, weight, bias, partial, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@kernel_op("matmul", fake=_fake_matmul)
def _matmul_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    partial: torch.Tensor | None,
    use_triton: bool,
) -> torch.Tensor:
    """``x (*, K) @ weight (N, K).T + bias (N,) + partial (*, N)`` -> a new ``(*, N)`` tensor."""
    # Contiguous, as the fake promises (the reference's addmm may choose other strides).
    return _matmul_impl(x, weight, bias, partial, None, use_triton).contiguous()


def _matmul_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, partial, use_triton = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.has_partial, ctx.use_triton = (
        bias is not None,
        partial is not None,
        use_triton,
    )


def _matmul_backward(ctx, grad_out: torch.Tensor):
    """``g`` = grad of the output ``(M, N)``: ``grad_x = g @ weight`` ``(M, K)``,
    ``grad_weight = g.T @ x`` ``(N, K)``, ``grad_bias = g.sum(0)``, ``grad_partial = g``; both
    products on the same op (kernel or reference), through transposed views (no copies)."""
    x, weight = ctx.saved_tensors
    n, k = weight.shape
    g = grad_out.reshape(-1, n)  # (M, N)
    grad_x = grad_w = grad_b = grad_p = None
    if ctx.needs_input_grad[0]:
        # (M, N) @ (N, K): "w" is weight.T, a (K, N) view
        grad_x = _matmul_op(g, weight.t(), None, None, ctx.use_triton).view(x.shape)
    if ctx.needs_input_grad[1]:
        # (N, M) @ (M, K): "x" is g.T, "w" is x.T (K, M); both views
        grad_w = _matmul_op(g.t(), x.reshape(-1, k).t(), None, None, ctx.use_triton)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g.sum(0, dtype=torch.float32).to(grad_out.dtype)  # fp32 sum, one rounding
    if ctx.has_partial and ctx.needs_input_grad[3]:
        grad_p = grad_out
    return grad_x, grad_w, grad_b, grad_p, None


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    partial: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = x @ weight.T (+ bias) (+ partial)``: ``F.linear`` with a fused partial-sum epilogue.

    Args:
        x: ``(*, K)``, any strides.
        weight: ``(N, K)``, any strides (``w.t()`` of a ``(K, N)`` matrix is free).
        bias: ``(N,)``, x's dtype.
        partial: ``(*, N)``, any float dtype, added in fp32; may be ``out`` itself (in-place
            ``out += x @ weight.T``).
        out: ``(*, N)`` preallocated output of any float dtype, written in place and returned;
            typically a slice (rows or columns) of a larger tensor. It must be viewable as
            ``(M, N)``. Like torch's ``out=`` ops, this form does not support autograd.

    Returns:
        ``(*, N)``: ``out`` when given, else a new tensor of x's dtype.

    Runs the Triton kernel or :func:`matmul_ref` as :func:`triton_parallel_layers.kernels._dispatch.use_triton` says.
    """
    _check_matmul_args(x, weight, bias, partial, out)
    if out is not None:
        grads = any(t is not None and t.requires_grad for t in (x, weight, bias, partial))
        if grads and torch.is_grad_enabled():
            raise RuntimeError(
                "matmul(..., out=...) does not support autograd: call it under torch.no_grad() "
                "or without out="
            )
        return _matmul_into(x, weight, bias, partial, out)
    # The path is chosen here, at call time, and passed into the op (kernels/_library.py).
    return _matmul_op(x, weight, bias, partial, use_triton(x, weight, bias, partial))
