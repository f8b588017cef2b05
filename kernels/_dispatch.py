"""Which path a kernel call takes: the Triton kernel or the pure-torch reference.

The rule (DESIGN.md, "Kernel dispatch"):

* CUDA tensors run the Triton kernel.
* CPU tensors run the Triton kernel under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
  (how the tests check the kernels without a GPU); otherwise they run the ``<op>_ref`` torch path,
  so CPU training stays fast.
* One override forces either path, for A/B benchmarks and debugging: the environment variable
  ``TPL_KERNEL_BACKEND`` (``auto`` | ``triton`` | ``ref``, read at every call) or, taking
  precedence over it, the context manager :func:`force_backend`.

Forcing ``triton`` on CPU tensors without the interpreter is an error, not a silent fallback:
Triton cannot launch a compiled kernel on CPU memory. So is running the interpreter where it is
known not to work: Triton 3.6's with NumPy 2.4 or newer (see :func:`interpreter_problem_for`).
Without Triton installed (macOS, Windows) every call takes the reference path, and forcing
``triton`` is an error that says how to get it.

Note that Triton reads ``TRITON_INTERPRET`` once, when ``triton`` is first imported; set it before
importing this package.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import torch

from triton_parallel_layers.kernels._triton import HAS_TRITON, TRITON_MISSING, triton

BACKENDS = ("auto", "triton", "ref")
_ENV_VAR = "TPL_KERNEL_BACKEND"
_forced: list[str] = []  # stack of force_backend() overrides, innermost last


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    """``(3, 6)`` for ``"3.6.0"``, ``"3.6.0+git1234"`` or ``"3.6"``."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def interpreter_problem_for(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter of ``triton_version`` cannot run the kernels beside NumPy of
    ``numpy_version``, or ``None``.

    Triton 3.6's interpreter turns a loop bound into a Python int with ``int()`` of a one-element
    array, which NumPy 2.4 made an error (Triton 3.7 squeezes it first): every kernel with a
    ``range`` over a runtime bound fails with "only 0-dimensional arrays can be converted to
    Python scalars". torch 2.11 pins Triton 3.6, so that pairing is a likely install.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run the kernels "
            f"with NumPy {numpy_version}: it converts one-element arrays to Python ints, which "
            "NumPy 2.4 made an error (fixed in Triton 3.7). Install 'numpy<2.4' or Triton >= 3.7, "
            "or unset TRITON_INTERPRET to run the kernels' torch reference path on the CPU"
        )
    return None


def _installed_interpreter_problem() -> str | None:
    if not HAS_TRITON:
        return None
    import numpy

    return interpreter_problem_for(triton.__version__, numpy.__version__)


# Read once, at import (a module constant, which torch.compile reads without tracing a call).
_INTERPRETER_PROBLEM = _installed_interpreter_problem()


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed Triton and NumPy (see
    :func:`interpreter_problem_for`), or ``None``."""
    return _INTERPRETER_PROBLEM


def kernel_backend() -> str:
    """The backend in force: the innermost :func:`force_backend`, else ``$TPL_KERNEL_BACKEND``."""
    backend = _forced[-1] if _forced else os.environ.get(_ENV_VAR, "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"{_ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    return backend


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Run the kernels inside the ``with`` block on ``backend`` (``auto``, ``triton`` or ``ref``).

    >>> with force_backend("ref"):
    ...     out = flash_attention(q, k, v)   # the torch reference, even on CUDA
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel called on ``tensors`` (``None`` entries ignored) takes the Triton path.

    Tensors on any other device (``meta``, for shape inference) take the reference path.
    """
    backend = kernel_backend()
    if backend == "ref":
        return False
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError(TRITON_MISSING)
        return False
    devices = {t.device.type for t in tensors if t is not None}
    if devices - {"cuda", "cpu"}:
        return False
    interpreted = devices == {"cpu"} and interpreter_enabled()
    if interpreted and _INTERPRETER_PROBLEM is not None:
        raise RuntimeError(_INTERPRETER_PROBLEM)
    runnable = devices == {"cuda"} or interpreted
    if backend == "triton" and not runnable:
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"the Triton backend is forced but the tensors are on {devices}: Triton needs CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported to run on the CPU"
        )
    return runnable


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple:
    """Cast floating-point ``tensors`` to the autocast dtype when ``torch.autocast`` is active on
    their device, as ``F.linear``, ``F.conv2d`` and SDPA do, so a kernel computes in the dtype the
    op it replaces would (fp64 and ``None`` entries are left alone). Unchanged outside autocast."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or first.device.type not in ("cuda", "cpu"):
        return tensors
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in castable else t for t in tensors
    )


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on ``t``'s device (after :func:`autocast_inputs` has cast
    the inputs), so a reference path computes in the dtypes it chooses (fp32 accumulation)."""
    if t.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()
