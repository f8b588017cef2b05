"""Toy kernels that ``bench/aot_compile.py`` must flag: one that spills, one over the shared
memory limit, one that does not compile, and one that is fine.

Run as a script (``python tests/aot_toy_kernels.py <target>``), it compiles each through the
tool and prints ``{name: status}`` as JSON; ``tests/test_aot_compile.py`` runs it in a fresh
process because the test session has Triton's interpreter switched on, and the toys must be
compiled for real.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import aot_compile  # noqa: E402  (removes TRITON_INTERPRET before triton is imported)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _spilling_kernel(X, Out, n, BLOCK: tl.constexpr):
    # A [BLOCK, BLOCK] fp32 accumulator live across a loop: with BLOCK=128 on one warp that is
    # 512 values per thread, twice the 255 registers a thread can have.
    offs = tl.arange(0, BLOCK)
    ptrs = X + offs[:, None] * BLOCK + offs[None, :]
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for i in range(n):
        acc = acc * 0.5 + tl.load(ptrs + i * BLOCK * BLOCK)
    tl.store(Out + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _dot_kernel(A, B, Out, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # A pipelined [BLOCK, BLOCK_K] @ [BLOCK_K, BLOCK] loop: its shared memory grows with the tile
    # and the number of stages.
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs[:, None] * K + offs_k[None, :]
    b_ptrs = B + offs_k[:, None] * BLOCK + offs[None, :]
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * BLOCK
    tl.store(Out + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _broken_kernel(X, Out, BLOCK: tl.constexpr):
    # A dot of mismatched shapes: [BLOCK, BLOCK] @ [2 * BLOCK, BLOCK] does not compile.
    offs = tl.arange(0, BLOCK)
    a = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(X + tl.arange(0, 2 * BLOCK)[:, None] * BLOCK + offs[None, :])
    tl.store(Out + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


def _combination(target, fn, args, consts, warps, stages):
    signature, constexprs, aligned = aot_compile.specialize(fn, args, consts)
    return aot_compile.Combination(
        "toy", target, "fp16", None, fn.__name__, str(consts), warps, stages, False,
        fn.fn.__module__, fn.__name__, signature, constexprs, aligned,
    )  # fmt: skip


def toys(target: str) -> dict:
    """``{name: (combination, jit function)}`` of the toy kernels for ``target``."""
    f16, f32 = torch.empty(0, dtype=torch.float16), torch.empty(0, dtype=torch.float32)
    dot_args = {"A": f16, "B": f16, "Out": f32, "K": 4096}
    return {
        "spilling": (_combination(target, _spilling_kernel, {"X": f32, "Out": f32, "n": 8},
                                  {"BLOCK": 128}, 1, 1), _spilling_kernel),
        # 6 stages of 128 x 128 fp16 tiles of A and B: 6 * 64 KiB = 384 KiB, over both limits
        "over_shared_memory": (_combination(target, _dot_kernel, dot_args,
                                            {"BLOCK": 128, "BLOCK_K": 128}, 4, 6), _dot_kernel),
        "small_dot": (_combination(target, _dot_kernel, dot_args, {"BLOCK": 64, "BLOCK_K": 32},
                                   4, 2), _dot_kernel),
        "broken": (_combination(target, _broken_kernel, {"X": f16, "Out": f16}, {"BLOCK": 32},
                                4, 1), _broken_kernel),
    }  # fmt: skip


if __name__ == "__main__":
    target = sys.argv[1]
    statuses = {}
    for name, (combo, fn) in toys(target).items():
        result = aot_compile.compile_combination(combo, fn=fn)
        statuses[name] = {"status": result.status(aot_compile.TARGETS[target]), **vars(result)}
    print(json.dumps(statuses))
