"""Compile every Triton kernel of the package for NVIDIA GPUs ahead of time, on a CPU.

Triton's interpreter (how the CPU tests run the kernels) accepts programs that the GPU compiler
rejects or compiles badly: register spills, shared memory over the limit. Triton can compile for
an NVIDIA target without a GPU (``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline down to a cubin with the ``ptxas``
bundled in Triton's wheel), so this tool compiles, for ``sm_80`` (A100) and ``sm_90``
(H100/H200), every kernel of the package with every configuration its autotuner can pick
(after the kernel's own prune function, for the dtype) and every fixed tile used with autotuning
off, in each dtype the op supports on GPU, with the ``constexpr`` values the launchers pass.

For each (kernel, target, dtype and fp32 precision, launch case, configuration) it reports the
registers, the spilled bytes (``ptxas -v``: spill stores), the stack frame and the shared memory
(Triton's dynamic allocation plus the cubin's static shared memory, from the bundled ``cuobjdump
--dump-resource-usage``) against the target's per-block limit (sm_80: 163 KiB, sm_90: 227 KiB).
A combination fails the check when it does not compile, spills, or needs more shared memory than
the target has.

Launch cases. The runtime specializes a kernel on its arguments (a pointer or integer divisible
by 16 is marked so; an integer equal to 1 becomes a constant), so each kernel is compiled for
representative launches, specialized as the runtime would: contiguous attention tensors
``(2, 8, 2048, D)`` with 2 key/value heads (grouped-query attention), ResNet-style convolutions
(3x3 from 64 to 256 channels and the 7x7 RGB stem, in both memory formats; a 1-channel 3x3), and a
4096^3 GEMM in the forward layout (``x @ w.T``, with the bias or the overlapped matmuls'
partial-sum epilogue) and the weight gradient's (``g.T @ x``, both operands transposed).

fp32 precision. The launchers pick fp32 products as PyTorch does: TF32 for attention and the GEMM
when ``torch.backends.cuda.matmul.allow_tf32`` (off by default), for the convolution when
``torch.backends.cudnn.allow_tf32`` (on by default), exact IEEE products otherwise. Both are
compiled (``--precisions``), since a user's flags can select either for any kernel; fp16 and bf16
have one precision.

Usage (from the repository root; no GPU needed):

    python bench/aot_compile.py                          # everything, sm_80 and sm_90
    python bench/aot_compile.py --kernels attn_fwd,attn_dkdv --targets sm_90 --dtypes bf16
    python bench/aot_compile.py --dtypes fp32 --cases hd128,stem   # launch cases by name
    python bench/aot_compile.py --dtypes fp32 --precisions tf32    # fp32 with TF32 products only
    python bench/aot_compile.py --update --dtypes fp32   # re-compile these rows of the table
    python bench/aot_compile.py --small                  # the CI scope: a few configurations
    python bench/aot_compile.py --float-args fp64        # float arguments typed as Inductor does
    python bench/aot_compile.py --list                   # the combinations, without compiling

It writes ``<out>.json`` (every combination, the machine and versions) and ``<out>.md`` (the
table and the summary), ``--out`` defaulting to ``bench/results/aot_compile_triton<X.Y>``, and
exits with status 1 when any combination fails the check. Compiles run in a small process pool
(``--jobs``, 2 by default). Results are cached per compiled source, target and options under
``--cache-dir`` (a kernel edit changes its source and so recompiles; a configuration list edit
does not). Works with Triton 3.6 and newer; run with an older Triton on the path to check it:

    python -m pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python bench/aot_compile.py --out /tmp/aot_triton3.6
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import hashlib
import io
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The kernels must be compiled, not interpreted: Triton reads this when first imported, and the
# attention module picks its configuration lists at import.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns unless this is set; 1 is the default the runtime compiles with.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNELS = ("attn_fwd", "attn_preprocess", "attn_dkdv", "attn_dq", "conv_fwd", "matmul")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# fp32 products, the value of the kernels' INPUT_PRECISION / DOT_PRECISION for fp32 operands
PRECISIONS = ("ieee", "tf32")
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Target:
    """An NVIDIA GPU generation: its compute capability and the shared memory one block may use
    (``cudaDevAttrMaxSharedMemoryPerBlockOptin``, what Triton checks a kernel against at load)."""

    name: str
    capability: int
    shared_limit: int
    example: str


TARGETS = {
    "sm_80": Target("sm_80", 80, 163 * 1024, "A100"),
    "sm_90": Target("sm_90", 90, 227 * 1024, "H100/H200"),
}


@dataclass
class Combination:
    """One kernel compiled for one target, dtype, launch case and configuration."""

    kernel: str  # one of KERNELS
    target: str  # one of TARGETS
    dtype: str  # one of DTYPES
    precision: str | None  # fp32: its products, one of PRECISIONS; None for fp16 and bf16
    case: str  # the launch it stands for, e.g. "hd128 causal" or "3x3 C64 channels_last"
    config: str  # the tile, e.g. "BLOCK_M=128 BLOCK_N=64"
    num_warps: int
    num_stages: int
    fixed: bool  # the tile used with autotuning off (TPL_ATTENTION_AUTOTUNE=0, TPL_CONV_AUTOTUNE=0)
    module: str  # where the @triton.jit function lives: module and attribute name
    function: str
    # parameter name -> Triton type ("*bf16", "i32", "constexpr"), name -> value, and the
    # parameters specialized as divisible by 16
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    aligned: list = field(repr=False)

    @property
    def label(self) -> str:
        return label(asdict(self))


def label(row: dict) -> str:
    """One line naming a combination (a :class:`Combination` as a dict, or a result row), e.g.
    ``attn_dq sm_80 fp32/tf32 hd32 causal BLOCK_M=32 BLOCK_N=32 w8 s2``."""
    return (
        f"{row['kernel']} {row['target']} {dtype_text(row)} {row['case']} {row['config']} "
        f"w{row['num_warps']} s{row['num_stages']}"
    )


def dtype_text(row: dict) -> str:
    """The dtype and, for fp32, its products: ``bf16``, ``fp32/ieee``, ``fp32/tf32``."""
    return row["dtype"] + (f"/{row['precision']}" if row["precision"] else "")


@dataclass
class Result:
    """What compiling a :class:`Combination` gave. Sizes in bytes, per thread for the stack."""

    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None  # dynamic (Triton's allocation) + static shared memory per block
    fp64_ops: int | None = None  # fp64 arithmetic instructions in the PTX (conversions not counted)
    error: str | None = None
    seconds: float = 0.0
    cached: bool = False

    def status(self, target: Target) -> str:
        """``ok``, or what is wrong: ``compile error``, ``spills``, ``shared memory over limit``,
        ``fp64 arithmetic`` (no kernel computes in fp64; an fp64 float argument must be cast)."""
        if self.error is not None:
            return "compile error"
        problems = []
        if self.spill_stores or self.spill_loads:
            problems.append("spills")
        if self.shared is not None and self.shared > target.shared_limit:
            problems.append("shared memory over limit")
        if self.fp64_ops:
            problems.append("fp64 arithmetic")
        return ", ".join(problems) or "ok"


# ------------------------------------------------------------------------------------------------
# Specialization: the signature the runtime would build for a launch
# ------------------------------------------------------------------------------------------------


def specialize(fn, args: dict, constexprs: dict) -> tuple[dict, dict, list]:
    """``(signature, constexprs, aligned)`` for launching ``fn`` (a ``JITFunction``) with ``args``
    (every non-constexpr parameter by name) and ``constexprs``, as Triton's launcher specializes:

    * a tensor is a pointer to its dtype, assumed 16-byte aligned (torch allocations are);
    * an integer equal to 1 becomes the constant 1; one divisible by 16 is marked so; those that
      need it are i64. Parameters named in ``do_not_specialize`` keep just their type;
    * a float is fp32, a bool u1.
    """
    signature, consts, aligned = {}, dict(constexprs), []
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name not in consts:
                raise ValueError(f"{fn.__name__}: no value for constexpr parameter {name!r}")
            continue
        if name not in args:
            raise ValueError(f"{fn.__name__}: no value for parameter {name!r}")
        value = args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPE[value.dtype]
            aligned.append(name)
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if getattr(param, "do_not_specialize", False):
                continue
            if value == 1:
                signature[name] = "constexpr"
                consts[name] = 1
            elif value % 16 == 0 and not getattr(param, "do_not_specialize_on_alignment", False):
                aligned.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialize {name}={value!r}")
    return signature, consts, aligned


# ------------------------------------------------------------------------------------------------
# The combinations: every kernel, launch case and configuration its autotuner can pick
# ------------------------------------------------------------------------------------------------


def _empty(dtype: torch.dtype) -> torch.Tensor:
    """A tensor standing for a kernel's pointer argument (only its dtype matters)."""
    return torch.empty(0, dtype=dtype)


def _strides(shape: tuple[int, ...], order: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` whose dims are laid out in memory in ``order``
    (outermost first; default: the dims in order, i.e. contiguous)."""
    order = order if order is not None else tuple(range(len(shape)))
    strides, step = [0] * len(shape), 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)


def _autotuned(module, name: str):
    """The ``Autotuner`` ``module.name``: its configurations and prune function."""
    tuner = getattr(module, name, None)
    if tuner is None or not hasattr(tuner, "configs"):
        raise RuntimeError(f"{module.__name__}.{name} is not a triton.autotune'd kernel")
    return tuner


def _pick(tuner, args: dict, consts: dict) -> list:
    """The configurations ``tuner`` can pick for a launch: its own prune, called as the autotuner
    calls it (the positional arguments by name, the constexprs as keyword arguments)."""
    if tuner.early_config_prune is None:
        return list(tuner.configs)
    return list(tuner.early_config_prune(tuner.configs, args, **consts))


def _config_text(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.kwargs.items() if k != "GROUP_M")


def _precisions(dtype: str, precisions: Iterable[str], launcher) -> list[tuple]:
    """``(precision, value)`` pairs to compile ``dtype`` with: for fp32 each of ``precisions``
    (the kernel's precision constexpr is the name), for fp16 and bf16 one, ``None`` and the value
    the launcher passes (``launcher(torch_dtype)``; a 16-bit dot ignores it)."""
    if dtype == "fp32":
        return [(p, p) for p in precisions]
    return [(None, launcher(DTYPES[dtype]))]


def _combinations_for(
    kernel: str,
    tuner,
    case: str,
    dtype: str,
    precision: str | None,
    args: dict,
    consts: dict,
    fixed_first: bool,
) -> Iterator[tuple]:
    """(kernel, dtype, precision, case, config, warps, stages, fixed, fn, signature, constexprs,
    aligned) for every configuration ``tuner`` can pick for this launch."""
    fn = tuner.fn
    for i, cfg in enumerate(_pick(tuner, args, consts)):
        signature, constexprs, aligned = specialize(fn, args, {**consts, **cfg.kwargs})
        yield (kernel, dtype, precision, case, _config_text(cfg), cfg.num_warps, cfg.num_stages,
               fixed_first and i == 0, fn, signature, constexprs, aligned)  # fmt: skip


def attention_combinations(
    kernels: Iterable[str], dtypes: Iterable[str], precisions: Iterable[str]
) -> Iterator[tuple]:
    """Attention forward, delta preprocessing, dK/dV and dQ: head dims 16-128, causal or not. The
    delta preprocessing has no products: fp32 once, without a precision."""
    from triton_parallel_layers.kernels import attention as attn

    batch, heads, kv_heads, seq = 2, 8, 2, 2048
    for dtype in dtypes:
        dt = DTYPES[dtype]
        for head_dim in attn.SUPPORTED_HEAD_DIMS:
            q_strides = _strides((batch, heads, seq, head_dim))
            kv_strides = _strides((batch, kv_heads, seq, head_dim))
            # the op stores its (B, H, S, D) output sequence-major, as a contiguous (B, S, H, D),
            # and the output's gradient comes back in that layout
            o_strides = _strides((batch, heads, seq, head_dim), (0, 2, 1, 3))
            sizes = {"num_q_heads": heads, "seq_q": seq, "seq_k": seq}
            buckets = {"seq_q_bucket": seq, "seq_k_bucket": seq}
            t, f32 = _empty(dt), _empty(torch.float32)
            if "attn_preprocess" in kernels:
                for has_dlse in (False, True):
                    args = {"Out": t, "DOut": t, "DLse": f32, "Delta": f32,
                            "num_q_heads": heads, "seq_q": seq}  # fmt: skip
                    args.update(zip(_names("stride_o", "bhmd"), o_strides))
                    args.update(zip(_names("stride_do", "bhmd"), o_strides))
                    consts = {"HAS_DLSE": has_dlse, "HEAD_DIM": head_dim,
                              "BLOCK_M": attn._PREPROCESS_BLOCK_M}  # fmt: skip
                    fn = attn._attn_bwd_preprocess_kernel
                    signature, constexprs, aligned = specialize(fn, args, consts)
                    case = f"hd{head_dim}" + (" dlse" if has_dlse else "")
                    config = f"BLOCK_M={attn._PREPROCESS_BLOCK_M}"
                    # a plain launch with the launcher's warps, Triton's default 3 stages
                    warps = attn._PREPROCESS_NUM_WARPS
                    yield ("attn_preprocess", dtype, None, case, config, warps, 3, True,
                           fn, signature, constexprs, aligned)  # fmt: skip
            variants = _precisions(dtype, precisions, attn._dot_precision)
            for causal, (precision, dot_precision) in itertools.product((False, True), variants):
                case = f"hd{head_dim}" + (" causal" if causal else "")
                consts = {"HEAD_DIM": head_dim, "CAUSAL": causal, "DOT_PRECISION": dot_precision}
                common = {"Q": t, "K": t, "V": t, "DOut": t, "Lse": f32, "Delta": f32,
                          "qk_scale": 0.125, "softmax_scale": 0.125, "num_kv_heads": kv_heads,
                          "group_size": heads // kv_heads, **sizes, **buckets}  # fmt: skip
                common.update(zip(_names("stride_q", "bhmd"), q_strides))
                common.update(zip(_names("stride_do", "bhmd"), o_strides))
                common.update(zip(_names("stride_k", "bhnd"), kv_strides))
                common.update(zip(_names("stride_v", "bhnd"), kv_strides))
                plans = {
                    "attn_fwd": (attn._attn_fwd_kernel, {"Out": t, "Lse": f32},
                                 _names("stride_o", "bhmd"), o_strides),
                    "attn_dkdv": (attn._attn_bwd_dkdv_kernel, {"DK": t, "DV": t},
                                  _names("stride_dk", "bhnd") + _names("stride_dv", "bhnd"),
                                  kv_strides * 2),
                    "attn_dq": (attn._attn_bwd_dq_kernel, {"DQ": t},
                                _names("stride_dq", "bhmd"), q_strides),
                }  # fmt: skip
                for kernel, (tuner, outputs, out_names, out_strides) in plans.items():
                    if kernel not in kernels:
                        continue
                    wanted = {p.name for p in tuner.fn.params if not p.is_constexpr}
                    args = {**common, **outputs, **dict(zip(out_names, out_strides))}
                    args = {k: v for k, v in args.items() if k in wanted}
                    yield from _combinations_for(
                        kernel, tuner, case, dtype, precision, args, consts, True
                    )


def _names(prefix: str, dims: str) -> list[str]:
    """``_names("stride_q", "bhmd")``: ``["stride_qb", "stride_qh", "stride_qm", "stride_qd"]``."""
    return [prefix + d for d in dims]


# ResNet-style convolutions: (name, N, C, H, W, K, KH, KW, pad, channels_last). 256 output
# channels where the layer allows, so that the prune (which drops tiles wider than K) keeps all.
CONV_CASES = [
    ("3x3 C64 channels_last", 32, 64, 56, 56, 256, 3, 3, 1, True),  # tap-major loop, fast path
    ("3x3 C64 NCHW", 32, 64, 56, 56, 256, 3, 3, 1, False),  # tap-major, strided channels
    ("7x7 C3 stem channels_last", 32, 3, 224, 224, 64, 7, 7, 3, True),  # flat loop
    ("7x7 C3 stem NCHW", 32, 3, 224, 224, 64, 7, 7, 3, False),  # flat, strided channels
    ("3x3 C1 NCHW", 32, 1, 28, 28, 32, 3, 3, 1, False),  # flat, reduction of 9: BLOCK_K=16 tiles
]


def conv_combinations(dtypes: Iterable[str], precisions: Iterable[str]) -> Iterator[tuple]:
    """The implicit-GEMM conv2d + bias + ReLU forward for :data:`CONV_CASES`."""
    from triton_parallel_layers.kernels import conv

    tuner = _autotuned(conv, "_conv2d_fwd_kernel_autotuned")
    for dtype in dtypes:
        dt = DTYPES[dtype]
        for case, n, c, h, w, k, kh, kw, pad, channels_last in CONV_CASES:
            oh, ow = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
            order = (0, 2, 3, 1) if channels_last else None
            x_strides = _strides((n, c, h, w), order)
            out_strides = _strides((n, k, oh, ow), order)
            w_strides = _strides((k, c, kh, kw), (2, 3, 1, 0))  # the launcher's (KH, KW, C, K) copy
            args = {"x_ptr": _empty(dt), "w_ptr": _empty(dt), "b_ptr": _empty(dt),
                    "out_ptr": _empty(dt), "C": c, "H": h, "W": w, "K_OUT": k, "OH": oh, "OW": ow,
                    "conv_stride_h": 1, "conv_stride_w": 1, "pad_h": pad, "pad_w": pad,
                    "dil_h": 1, "dil_w": 1, "GEMM_M": n * oh * ow,
                    "GEMM_K": c * kh * kw}  # fmt: skip
            args.update(zip(_names("stride_x", "nchw"), x_strides))
            args.update(zip(_names("stride_w", "kcrs"), w_strides))
            args.update(zip(_names("stride_o", "nkhw"), out_strides))
            consts = {"KH": kh, "KW": kw, "HAS_BIAS": True, "APPLY_RELU": True,
                      "FLAT_K": c < conv._FLAT_K_BELOW_CHANNELS}  # fmt: skip
            for precision, value in _precisions(dtype, precisions, conv._input_precision):
                consts["INPUT_PRECISION"] = value
                yield from _combinations_for(
                    "conv_fwd", tuner, case, dtype, precision, args, consts, True
                )


# The GEMM x (M, K) @ w (N, K).T as the layers launch it:
# (name, x layout, w layout, bias, partial). The partial sum is the overlapped matmuls' epilogue;
# grad_x = g @ weight ("w" is weight.t(), one operand transposed) sits between the forward and the
# weight gradient's layout (both transposed) and is left out to keep the full run short.
MATMUL_SIZE = 4096
MATMUL_CASES = [
    ("x @ w.T +bias", "row", "row", True, False),  # forward
    ("x @ w.T +partial", "row", "row", False, True),  # a chunk of the overlapped matmuls
    ("g.T @ x (wgrad)", "col", "col", False, False),  # grad_weight: "x" is g.t(), "w" is x.t()
]


def matmul_combinations(dtypes: Iterable[str], precisions: Iterable[str]) -> Iterator[tuple]:
    """The GEMM for :data:`MATMUL_CASES` at ``4096^3`` (every tile is a candidate there)."""
    from triton_parallel_layers.kernels import matmul

    tuner = _autotuned(matmul, "_matmul_fwd_kernel_autotuned")
    size = MATMUL_SIZE
    layout = {"row": (size, 1), "col": (1, size)}
    for dtype in dtypes:
        dt = DTYPES[dtype]
        for case, x_layout, w_layout, bias, partial in MATMUL_CASES:
            args = {"x_ptr": _empty(dt), "w_ptr": _empty(dt), "out_ptr": _empty(dt),
                    "bias_ptr": _empty(dt), "partial_ptr": _empty(dt), "M": size, "N": size,
                    "K": size}  # fmt: skip
            args.update(zip(("stride_xm", "stride_xk"), layout[x_layout]))
            args.update(zip(("stride_wn", "stride_wk"), layout[w_layout]))
            args.update(zip(("stride_om", "stride_on", "stride_pm", "stride_pn"), (size, 1) * 2))
            # EVEN_K False with the partial sum: the masked reduction, the variant with most code.
            consts = {"HAS_BIAS": bias, "HAS_PARTIAL": partial, "EVEN_K": not partial}
            for precision, value in _precisions(dtype, precisions, matmul._input_precision):
                consts["INPUT_PRECISION"] = value
                # No fixed-tile mode: the GEMM is always autotuned.
                yield from _combinations_for(
                    "matmul", tuner, case, dtype, precision, args, consts, False
                )


def combinations(
    kernels: Iterable[str],
    targets: Iterable[str],
    dtypes: Iterable[str],
    small: bool = False,
    cases: Iterable[str] | None = None,
    precisions: Iterable[str] = PRECISIONS,
) -> list[Combination]:
    """Every combination to compile, targets innermost (so a partial run covers both).

    ``small``: the CI scope, each selected kernel's fixed tile (or first candidate) for one
    launch case per dtype and precision, at head dim 64 for attention. ``cases``: only the launch
    cases whose name contains one of these strings. ``precisions``: fp32's products.
    """
    kernels, dtypes, precisions = list(kernels), list(dtypes), list(precisions)
    cases = list(cases) if cases is not None else None
    rows = []
    if any(k.startswith("attn_") for k in kernels):
        rows += attention_combinations(kernels, dtypes, precisions)
    if "conv_fwd" in kernels:
        rows += conv_combinations(dtypes, precisions)
    if "matmul" in kernels:
        rows += matmul_combinations(dtypes, precisions)
    if cases is not None:
        rows = [row for row in rows if any(part in row[3] for part in cases)]
    if small:
        seen, kept = set(), []
        for row in rows:
            kernel, dtype, precision, case = row[:4]
            if kernel.startswith("attn_") and not case.startswith("hd64"):
                continue
            if (kernel, dtype, precision) not in seen:
                seen.add((kernel, dtype, precision))
                kept.append(row)
        rows = kept
    out = []
    for kernel, dtype, precision, case, config, warps, stages, fixed, fn, *compiled in rows:
        for target in targets:
            module = fn.fn.__module__  # fn is a JITFunction, fn.fn the Python function
            out.append(Combination(kernel, target, dtype, precision, case, config, warps, stages,
                                   fixed, module, fn.__name__, *compiled))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------
# Compiling one combination and reading its resource usage
# ------------------------------------------------------------------------------------------------

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_PTXAS_FUNCTION = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")
# A PTX instruction on fp64 values other than a conversion, move, load or store (mul.f64, fma.rn.f64)
_PTX_FP64_OP = re.compile(r"^\s*(?!cvt|mov|ld\.|st\.)[a-z][\w.]*\.f64\b", re.MULTILINE)


def _jit_function(combo: Combination):
    """The ``JITFunction`` a combination compiles (unwrapping an autotuner)."""
    import importlib

    obj = getattr(importlib.import_module(combo.module), combo.function)
    while not isinstance(obj, triton.runtime.JITFunction):  # an Autotuner wraps the JITFunction
        obj = obj.fn
    return obj


def compile_combination(combo: Combination, fn=None, cache_dir: Path | None = None) -> Result:
    """Compile ``combo`` for its target and read registers, spills and shared memory.

    ``fn``: the ``JITFunction`` (default: looked up by the combination's module and name).
    ``cache_dir``: reuse and store results keyed by the compiled source, target and options.
    """
    fn = fn if fn is not None else _jit_function(combo)
    target = TARGETS[combo.target]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in combo.aligned}
    src = ASTSource(fn=fn, signature=combo.signature, constexprs=combo.constexprs, attrs=attrs)
    options = {"num_warps": combo.num_warps, "num_stages": combo.num_stages}
    key = hashlib.sha256(
        f"{triton.__version__}-{src.hash()}-{target}-{sorted(options.items())}".encode()
    ).hexdigest()
    cached = cache_dir / f"{key}.json" if cache_dir is not None else None
    if cached is not None and cached.exists():
        return Result(**{**json.loads(cached.read_text()), "cached": True})

    start = time.perf_counter()
    log = io.StringIO()
    try:
        # Triton prints the ptxas -v log (registers, spills) with TRITON_DUMP_PTXAS_LOG; it skips
        # ptxas on a hit in its own cache, hence TRITON_ALWAYS_COMPILE.
        env = _env(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
        with env, contextlib.redirect_stdout(log):
            gpu = GPUTarget("cuda", target.capability, 32)
            kernel = triton.compile(src, target=gpu, options=options)
    except Exception as err:  # a compile error is a result, reported with its first lines
        message = " ".join(str(err).split())[:400] or type(err).__name__
        return Result(error=f"{type(err).__name__}: {message}", seconds=time.perf_counter() - start)
    result = _resource_usage(kernel, log.getvalue())
    result.seconds = time.perf_counter() - start
    if cached is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in asdict(result).items() if k != "cached"}
        cached.write_text(json.dumps(record))
    return result


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _resource_usage(kernel, ptxas_log: str) -> Result:
    """Registers, stack and static shared memory from ``cuobjdump --dump-resource-usage`` of the
    cubin; spilled bytes from ptxas' ``-v`` log; Triton's dynamic shared memory from the
    kernel's metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = subprocess.run(
            [str(_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = _CUOBJDUMP.search(dump)
    spills = _PTXAS_FUNCTION.search(ptxas_log)
    if usage is None or spills is None:
        raise RuntimeError(
            "could not read the resource usage from cuobjdump's output and ptxas' log "
            f"(TRITON_DUMP_PTXAS_LOG):\n{dump}\n{ptxas_log}"
        )
    registers, stack, static_shared = (int(g) for g in usage.groups())
    return Result(
        registers=registers,
        spill_stores=int(spills.group(2)),
        spill_loads=int(spills.group(3)),
        stack=stack,
        shared=int(kernel.metadata.shared) + static_shared,
        fp64_ops=len(_PTX_FP64_OP.findall(kernel.asm["ptx"])),
    )


def _compile_in_worker(combo: Combination, cache_dir: str | None) -> Result:
    return compile_combination(combo, cache_dir=Path(cache_dir) if cache_dir else None)


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    """Counts over the result rows: combinations, failures, over the limit, spilling; the most
    shared memory a compiled one takes (bytes per block)."""
    return {
        "combinations": len(rows),
        "compile_errors": sum(r["status"] == "compile error" for r in rows),
        "shared_over_limit": sum("shared memory" in r["status"] for r in rows),
        "spilling": sum("spills" in r["status"] for r in rows),
        "fixed_tiles_failing": sum(r["fixed"] and r["status"] != "ok" for r in rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "max_shared": max((r["shared"] for r in rows if r["shared"] is not None), default=None),
    }


def summary_line(summary: dict) -> str:
    return (
        f"{summary['combinations']} combinations: {summary['compile_errors']} compile errors, "
        f"{summary['shared_over_limit']} over the shared memory limit, {summary['spilling']} "
        f"spilling ({summary['fixed_tiles_failing']} of them fixed tiles), {summary['ok']} ok; "
        f"at most {_kib(summary['max_shared'])} KiB shared memory"
    )


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows per target (``sm_80``, ...) and per dtype and precision (``fp32/tf32``, ...)."""
    groups: dict[str, list[dict]] = {name: [] for name in TARGETS}
    for r in rows:
        groups[r["target"]].append(r)
    dtype_order = list(DTYPES)
    for r in sorted(rows, key=lambda r: (dtype_order.index(r["dtype"]), r["precision"] or "")):
        groups.setdefault(dtype_text(r), []).append(r)
    return {name: sub for name, sub in groups.items() if sub}


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _cached_note(rows: list[dict]) -> str:
    """For the report's first lines: how many rows came from the result cache."""
    cached = sum(bool(r.get("cached")) for r in rows)
    if not cached:
        return ""
    return (
        f" ({cached} of the {len(rows)} rows read from `--cache-dir`: compiled before by this "
        "Triton from the same kernel source, constexprs, target and options)"
    )


def markdown(meta: dict, rows: list[dict]) -> str:
    """The report: the machine and versions, a summary per target and per dtype and precision,
    and one row per combination."""
    lines = [
        "# Ahead-of-time compile of the Triton kernels",
        "",
        f"{meta['date']}, Triton {meta['triton']} (ptxas from its wheel), torch {meta['torch']}, "
        f"Python {meta['python']}, on {meta['machine']} (no GPU needed). Command: "
        f"`{meta['command']}`" + _cached_note(rows),
        "",
    ]
    runs = meta.get("runs", [])
    if len(runs) > 1:  # an --update: say which rows each run compiled
        lines += [
            f"Compiled in {len(runs)} runs (`--update` re-compiles a selection and keeps the "
            "other rows): "
            + "; ".join(
                f"{run['date']}, `{run['command']}`: "
                f"{sum(r.get('date') == run['date'] for r in rows)} rows"
                for run in runs
            )
            + ".",
            "",
        ]
    lines += [
        f"**All targets: {summary_line(summarize(rows))}.**",
        "",
    ]
    for name, sub in _groups(rows).items():
        target = TARGETS.get(name)
        what = (
            f"{name} ({target.example}, {target.shared_limit // 1024} KiB shared memory per block)"
            if target
            else name
        )
        lines.append(f"- {what}: {summary_line(summarize(sub))}")
    lines += [
        "",
        "Registers per thread, spilled bytes per thread (ptxas spill stores), shared memory per "
        "block in KiB (limit in brackets). `fixed`: the tile used with autotuning off. "
        "`fp32/ieee`, `fp32/tf32`: fp32 with exact or TF32 products (PyTorch's default flags "
        "pick IEEE for attention and the GEMM, TF32 for the convolution; see `--precisions`); "
        "plain `fp32`: the delta preprocessing, which has no products.",
        "",
        "| kernel | target | dtype | case | config | warps | stages | fixed | registers | "
        "spill B | shared KiB | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        limit = TARGETS[r["target"]].shared_limit
        status = r["status"] if r["error"] is None else f"{r['status']}: {r['error'][:120]}"
        lines.append(
            f"| {r['kernel']} | {r['target']} | {dtype_text(r)} | {r['case']} | {r['config']} | "
            f"{r['num_warps']} | {r['num_stages']} | {'yes' if r['fixed'] else ''} | "
            f"{r['registers'] if r['registers'] is not None else '-'} | "
            f"{r['spill_stores'] if r['spill_stores'] is not None else '-'} | "
            f"{_kib(r['shared'])} ({limit // 1024}) | {status} |"
        )
    return "\n".join(lines) + "\n"


def _machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_name

    return cpu_name()


def _row(combo: Combination, result: Result) -> dict:
    row = {k: v for k, v in asdict(combo).items() if k not in ("signature", "aligned", "module")}
    row["constexprs"] = {k: v for k, v in combo.constexprs.items()}
    row.update({k: v for k, v in asdict(result).items()})
    row["shared_limit"] = TARGETS[combo.target].shared_limit
    row["status"] = result.status(TARGETS[combo.target])
    return row


_IDENTITY = ("kernel", "target", "dtype", "precision", "case", "config", "num_warps",
             "num_stages", "fixed")  # fmt: skip


def _identity(item: Combination | dict) -> tuple:
    """What names a combination, in a :class:`Combination` or a result row alike (a row of a
    table written before fp32 had two precisions: no precision)."""
    if isinstance(item, dict):
        return tuple(item.get(k) for k in _IDENTITY)
    return tuple(getattr(item, k) for k in _IDENTITY)


def _previous_results(out: Path, selected: list[Combination]) -> tuple[list[dict], list[dict]]:
    """For ``--update``: the rows of ``<out>.json`` to keep (those of combinations the full run
    still compiles that are not ``selected`` now, each with the date it was compiled) and the
    runs that made the file."""
    path = _with_suffix(out, ".json")
    if not path.exists():
        raise SystemExit(f"--update: {path} does not exist; run without --update first")
    data = json.loads(path.read_text())
    if data["triton"] != triton.__version__:
        raise SystemExit(
            f"--update: {path} holds results of Triton {data['triton']}, this is Triton "
            f"{triton.__version__}; give another --out or run without --update"
        )
    current = {_identity(c) for c in combinations(KERNELS, TARGETS, DTYPES)}
    chosen = {_identity(c) for c in selected}
    kept = []
    for row in data["results"]:
        if _identity(row) in current and _identity(row) not in chosen:
            kept.append({**row, "date": row.get("date", data["date"])})
    runs = data.get("runs") or [{"date": data["date"], "command": data["command"]}]
    return kept, runs


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    order = {name: i for i, name in enumerate(KERNELS)}
    rows = sorted(rows, key=lambda r: (order[r["kernel"]], dtype_text(r), r["case"], r["config"],
                                       r["num_warps"], r["num_stages"], r["target"]))  # fmt: skip
    summary = {"all": summarize(rows)}
    summary.update({name: summarize(sub) for name, sub in _groups(rows).items()})
    data = {**meta, "summary": summary, "results": rows}
    _with_suffix(out, ".json").write_text(json.dumps(data, indent=1) + "\n")
    _with_suffix(out, ".md").write_text(markdown(meta, rows))


def _with_suffix(out: Path, suffix: str) -> Path:
    """``out`` plus ``suffix`` (not ``Path.with_suffix``: "triton3.9" has a dot of its own)."""
    return out.with_name(out.name + suffix)


def _csv(text: str, allowed: Iterable[str], what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"{what} {unknown or text!r}: expected a comma-separated list of {', '.join(allowed)}"
        )
    return values


def _default_cache_dir() -> Path:
    """Next to Triton's own cache: ``~/.triton/tpl_aot_compile`` by default."""
    triton_cache = os.environ.get("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
    return Path(triton_cache).parent / "tpl_aot_compile"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    version = ".".join(triton.__version__.split(".")[:2])
    parser = argparse.ArgumentParser(
        description="Compile the package's Triton kernels for sm_80/sm_90 without a GPU and check "
        "every configuration for compile errors, register spills and shared memory over the limit.",
        epilog="Exit status 1 when any combination fails the check.",
    )
    for name, choices in (("kernels", KERNELS), ("targets", TARGETS), ("dtypes", DTYPES)):
        parser.add_argument(
            f"--{name}",
            type=lambda text, choices=choices, name=name: _csv(text, choices, name),
            default=list(choices),
            help=f"comma-separated, of {', '.join(choices)} (default: all)",
        )
    parser.add_argument(
        "--precisions",
        type=lambda text: _csv(text, PRECISIONS, "precisions"),
        default=list(PRECISIONS),
        help="fp32 products, comma-separated, of ieee, tf32 (default: both). The launchers pick "
        "TF32 for attention and the GEMM when torch.backends.cuda.matmul.allow_tf32 (off by "
        "default), for the conv when torch.backends.cudnn.allow_tf32 (on by default), IEEE "
        "otherwise. fp16 and bf16 are compiled either way",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="CI scope: one tile per kernel, dtype and precision (head dim 64)",
    )
    parser.add_argument(
        "--cases",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        help="comma-separated parts of launch-case names: only the cases whose name contains one "
        "(e.g. 'hd128,stem NCHW'; see --list)",
    )
    parser.add_argument(
        "--float-args",
        choices=("fp32", "fp64"),
        default="fp32",
        help="Triton type of the kernels' float arguments (the attention's softmax scales): fp32 "
        "as Triton's launcher types Python floats (default), or fp64 as Inductor does when "
        "torch.compile puts the kernel in its graph",
    )
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / f"aot_compile_triton{version}",
        help="output path without suffix: writes <out>.json and <out>.md "
        "(default: bench/results/aot_compile_triton<version>)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=_default_cache_dir(),
        help="where results are cached (default: next to Triton's cache)",
    )
    parser.add_argument("--no-cache", action="store_true", help="compile everything afresh")
    parser.add_argument(
        "--update",
        action="store_true",
        help="compile only the selected combinations and merge them into the results at --out "
        "(same Triton): its rows of the other combinations are kept, those of combinations no "
        "longer compiled are dropped. For a change to some kernels or tile lists only: the kept "
        "rows are taken to be current",
    )
    parser.add_argument("--list", action="store_true", help="list the combinations and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    combos = combinations(
        args.kernels, args.targets, args.dtypes, args.small, args.cases, args.precisions
    )
    if args.float_args == "fp64":  # scalar floats only: pointers read "*fp32"
        for combo in combos:
            combo.signature = {k: "fp64" if v == "fp32" else v for k, v in combo.signature.items()}
    if not combos:
        print("no combination matches these --kernels, --dtypes and --cases", file=sys.stderr)
        return 2
    if args.list:
        for combo in combos:
            print(combo.label + (" (fixed tile)" if combo.fixed else ""))
        print(f"{len(combos)} combinations")
        return 0
    command = ["python", "bench/aot_compile.py", *(sys.argv[1:] if argv is None else argv)]
    meta = {
        "tool": "bench/aot_compile.py",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(command),
        "machine": _machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "targets": {name: asdict(t) for name, t in TARGETS.items() if name in args.targets},
        "float_args": args.float_args,
    }  # fmt: skip
    cache_dir = None if args.no_cache else str(args.cache_dir)
    rows, runs = _previous_results(args.out, combos) if args.update else ([], [])
    meta["runs"] = [*runs, {"date": meta["date"], "command": meta["command"]}]
    print(f"compiling {len(combos)} combinations with {args.jobs} processes", file=sys.stderr)
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_compile_in_worker, c, cache_dir): c for c in combos}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            combo = futures[future]
            row = {**_row(combo, future.result()), "date": meta["date"]}
            rows.append(row)
            usage = (
                row["error"][:100]
                if row["error"]
                else f"{row['registers']} regs, {row['spill_stores']} B spilled, "
                f"{_kib(row['shared'])} KiB shared"
            )
            took = "cached" if row["cached"] else f"{row['seconds']:.1f} s"
            print(f"[{done}/{len(combos)}] {combo.label}: {row['status']} ({usage}; {took})",
                  file=sys.stderr, flush=True)  # fmt: skip
            if done % 25 == 0:  # an interrupted run keeps what it compiled
                _write(args.out, meta, rows)
    _write(args.out, meta, rows)
    summary = summarize(rows)
    for name in args.targets:
        print(f"{name}: {summary_line(summarize([r for r in rows if r['target'] == name]))}")
    print(f"all: {summary_line(summary)} ({time.perf_counter() - start:.0f} s)")
    print(f"wrote {_with_suffix(args.out, '.json')} and {_with_suffix(args.out, '.md')}")
    return 0 if summary["ok"] == summary["combinations"] else 1


if __name__ == "__main__":
    sys.exit(main())
