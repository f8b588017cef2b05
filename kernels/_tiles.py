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


def tile_of(cfg) -> tuple:
    """What identifies a ``triton.Config`` as a tile: its meta-parameters, warps and stages."""
    return (*sorted(cfg.kwargs.items()), cfg.num_warps, cfg.num_stages)


class TilesByWidth:
    """Autotuning candidates per operand width: one list for 16-bit operands (fp16, bf16), one for
    fp32, which takes twice the bytes per operand in shared memory and registers (exact fp32
    products run on the CUDA cores from registers), so that the 16-bit tiles spill there.

    ``configs`` is what ``triton.autotune`` gets: both lists, each tile once. In a prune function
    :meth:`for_width` keeps the candidates for the operands' element size, in that list's order
    (the first is the fixed tile of a kernel that has one). ``bench/aot_compile.py`` compiles what
    the prune functions keep, so these lists are what it checks.
    """

    def __init__(self, half: list, fp32: list) -> None:
        self._order = {2: [tile_of(c) for c in half], 4: [tile_of(c) for c in fp32]}
        unique: dict[tuple, object] = {}
        for cfg in [*half, *fp32]:
            unique.setdefault(tile_of(cfg), cfg)
        self.configs = list(unique.values())

    def for_width(self, configs: list, element_size: int) -> list:
        """The members of ``configs`` (the autotuner's) that are candidates for operands of
        ``element_size`` bytes (2: fp16/bf16, 4: fp32)."""
        by_tile = {tile_of(c): c for c in configs}
        return [by_tile[t] for t in self._order[element_size] if t in by_tile]
