"""The kernels as ``torch.library`` custom ops (namespace ``triton_parallel_layers``).

Every kernel op is registered by the helper here as ``torch.ops.triton_parallel_layers.<name>``
(the collective matmuls, which communicate, register plain custom ops themselves), with a fake
(meta) implementation and its autograd, so ``torch.compile`` puts it in the graph as one node
(no graph break) and ``torch.library.opcheck`` can test it:

* **Triton available, interpreter off** (CUDA machines; also CPU-only Linux installs): the op is a
  :func:`torch.library.triton_op`. Its body launches the kernels through
  :func:`torch.library.wrap_triton`, so when ``torch.compile`` traces the op, Inductor sees the
  Triton kernels themselves (and the reference path's torch ops, when that path was chosen) rather
  than an opaque call; the body, run on fake tensors, is also its fake implementation.
* **Triton's interpreter on, or no Triton**: a plain :func:`torch.library.custom_op` with an
  explicit fake implementation. The interpreter runs kernels in Python on real CPU memory, so it
  can neither be traced nor run on fake tensors; the op stays opaque and runs at call time.

**Which path runs** (the kernel or the ``<op>_ref`` torch reference) is decided *outside* the op,
by the public function (:func:`~triton_parallel_layers.kernels._dispatch.use_triton` at call time),
and passed into it as the argument ``use_triton: bool``. The op body never consults the backend
itself, so nothing is baked in by tracing: under ``torch.compile`` Dynamo traces the public
function, reads the backend there, and guards on what it read, so entering or leaving
:func:`~triton_parallel_layers.kernels._dispatch.force_backend` recompiles for the other path.
(``TPL_KERNEL_BACKEND`` is an environment variable, which Dynamo does not guard on: a compiled
function keeps the path in force when it was compiled. Set it before the process starts.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from triton_parallel_layers.kernels._dispatch import interpreter_enabled
from triton_parallel_layers.kernels._triton import HAS_TRITON

__all__ = ["NAMESPACE", "eager_launches", "kernel_op", "launch"]

NAMESPACE = "triton_parallel_layers"


def kernel_op(
    name: str, *, fake: Callable[..., Any], mutates_args: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], torch.library.CustomOpDef]:
    """Register the decorated function as the op ``triton_parallel_layers::<name>``.

    A ``triton_op`` where Triton compiles kernels (its body is its own fake implementation), else a
    ``custom_op`` with ``fake`` as the fake implementation (see the module docstring). The schema
    is inferred from the type hints.
    """
    qualname = f"{NAMESPACE}::{name}"

    def register(fn: Callable[..., Any]) -> torch.library.CustomOpDef:
        if HAS_TRITON and not interpreter_enabled():
            return torch.library.triton_op(qualname, fn, mutates_args=tuple(mutates_args))
        op = torch.library.custom_op(qualname, fn, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        return op

    return register


def launch(kernel: Any) -> Any:
    """``kernel`` ready for ``[grid](...)``: wrapped by :func:`torch.library.wrap_triton`, so a
    trace of a ``triton_op`` records the launch (and eager calls go straight to the kernel).
    Under the interpreter the op is an opaque ``custom_op`` that is never traced, so the kernel is
    launched as it is (torch 2.11's ``wrap_triton`` rejects the interpreter's kernel objects)."""
    if HAS_TRITON and not interpreter_enabled():
        return torch.library.wrap_triton(kernel)
    return kernel


def eager_launches() -> contextlib.AbstractContextManager:
    """A block in which the kernels given to :func:`launch` run straight on Triton: for launches on
    real tensors outside a ``triton_op`` (``matmul(..., out=...)``, the collective matmuls' plain
    custom ops).

    Outside a trace, ``wrap_triton`` otherwise dispatches each launch through its higher-order op,
    which for an autotuned kernel with a prune function builds a new ``Autotuner`` per call (seen
    with torch 2.11 on an H200): every call re-tuned (~1 s) and without the tuner's
    ``restore_value``, so the candidate runs accumulated into an ``out`` that is also ``partial``.
    A ``triton_op`` body is launched this way by torch itself. Not for use under ``torch.compile``
    (callers check :func:`torch.compiler.is_compiling`): there the wrapper must record the launch.
    """
    from torch._library.triton import set_wrap_triton_enabled  # what triton_op's eager path uses

    return set_wrap_triton_enabled(False)
