"""Triton kernels, each with a pure-torch reference ``<op>_ref`` beside it.

Every function accepts CPU or CUDA tensors; :mod:`kernels._dispatch` says which path runs.
"""

from kernels._dispatch import force_backend, interpreter_enabled, kernel_backend, use_triton

__all__ = [
    "force_backend",
    "interpreter_enabled",
    "kernel_backend",
    "use_triton",
]
