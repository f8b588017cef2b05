"""Triton helpers shared by the GEMM-shaped kernels (the matmul and the implicit-GEMM conv)."""

from triton_parallel_layers.kernels._triton import tl, triton


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a flat program id to its ``(pid_m, pid_n)`` output tile, ``GROUP_M`` row-tiles at a
    time: the programs in flight together sweep all column tiles of a few row tiles, so they
    reuse the same columns of the right operand (and rows of the left one) from L2."""
    pids_per_group = GROUP_M * num_pid_n
    group = pid // pids_per_group
    first_pid_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n
