"""Triton kernels, each with a pure-torch reference ``<op>_ref`` beside it.

Every function accepts CPU or CUDA tensors; :mod:`triton_parallel_layers.kernels._dispatch` says which path runs.
"""

from triton_parallel_layers.kernels._dispatch import (
    force_backend,
    interpreter_enabled,
    kernel_backend,
    use_triton,
)
from triton_parallel_layers.kernels.attention import (
    attention_ref,
    attention_ref_with_lse,
    flash_attention,
    flash_attention_with_lse,
)
from triton_parallel_layers.kernels.collective_matmul import (
    all_gather_matmul,
    all_gather_matmul_ref,
    matmul_reduce_scatter,
    matmul_reduce_scatter_ref,
)
from triton_parallel_layers.kernels.conv import (
    conv2d_bias_act,
    conv2d_bias_relu,
    conv2d_bias_relu_ref,
)
from triton_parallel_layers.kernels.lstm import lstm, lstm_cell, lstm_ref

__all__ = [
    "all_gather_matmul",
    "all_gather_matmul_ref",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_ref",
    "attention_ref",
    "attention_ref_with_lse",
    "flash_attention",
    "flash_attention_with_lse",
    "conv2d_bias_act",
    "conv2d_bias_relu",
    "conv2d_bias_relu_ref",
    "force_backend",
    "interpreter_enabled",
    "kernel_backend",
    "lstm",
    "lstm_cell",
    "lstm_ref",
    "use_triton",
]
