"""``triton`` and ``triton.language``, or stand-ins where Triton is not installed.

Triton has wheels for Linux only. On macOS and Windows the package still imports and every kernel
takes its pure-torch reference path (:func:`~triton_parallel_layers.kernels._dispatch.use_triton`
says so, and forcing the Triton backend there raises an error that says how to get Triton). The
kernel files are written against the real API; without Triton these stand-ins let their
module-level decorators, ``triton.Config`` lists and ``tl.constexpr`` annotations evaluate, and
any attempt to launch a kernel raises.

    from triton_parallel_layers.kernels._triton import HAS_TRITON, tl, triton
"""

from __future__ import annotations

from typing import Any

__all__ = ["HAS_TRITON", "TRITON_MISSING", "tl", "triton"]

TRITON_MISSING = (
    "Triton is not installed, so the Triton kernels cannot run: install it with "
    "`pip install triton` (Linux with an NVIDIA GPU; there are no wheels for macOS or Windows), "
    "or use the torch reference path (TPL_KERNEL_BACKEND=ref or auto)"
)

try:
    import triton
    import triton.language as tl
    import triton.testing  # noqa: F401  (the autotuners' do_bench)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _Kernel:
        """What ``@triton.jit`` / ``@triton.autotune`` give without Triton: a kernel that refuses
        to launch."""

        def __init__(self, fn: Any) -> None:
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(TRITON_MISSING)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(TRITON_MISSING)

    def _decorator(fn: Any = None, **_: Any) -> Any:
        """``@decorator`` and ``@decorator(**options)`` alike."""
        return _Kernel(fn) if fn is not None else _Kernel

    class _Config:
        def __init__(self, kwargs: dict, num_warps: int = 4, num_stages: int = 3, **extra: Any):
            self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages

    class _Namespace:
        def __init__(self, **attrs: Any) -> None:
            self.__dict__.update(attrs)

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    def _missing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(TRITON_MISSING)

    triton = _Namespace(  # type: ignore[assignment]
        jit=_decorator,
        autotune=lambda *a, **k: _decorator,
        heuristics=lambda *a, **k: _decorator,
        Config=_Config,
        cdiv=_cdiv,
        next_power_of_2=_next_power_of_2,
        testing=_Namespace(do_bench=_missing),
        __version__=None,
    )
    tl = _Namespace(constexpr=Any, dtype=Any)  # type: ignore[assignment]
