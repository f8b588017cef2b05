"""How each parameter of a parallel module is held: which tensor dim is sharded over its TP group.

One table for everything that reads or writes shards by name: initialization by name
(:mod:`~triton_parallel_layers.parallel_layers.init`) and the resharding checkpoints
(:mod:`~triton_parallel_layers.parallel_layers.checkpoint`).
"""

from __future__ import annotations

from torch import nn

from triton_parallel_layers.parallel_layers.conv import ColumnParallelConv2d, RowParallelConv2d
from triton_parallel_layers.parallel_layers.embedding import VocabParallelEmbedding
from triton_parallel_layers.parallel_layers.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["param_sharding"]

# Which dim of each parameter of a parallel module is sharded over its TP group (None: whole).
_SHARD_DIMS: dict[type, dict[str, int | None]] = {
    ColumnParallelLinear: {"weight": 0, "bias": 0},
    RowParallelLinear: {"weight": 1, "bias": None},
    VocabParallelEmbedding: {"weight": 0},
    ColumnParallelConv2d: {"weight": 0, "bias": 0},
    RowParallelConv2d: {"weight": 1, "bias": None},
}


def param_sharding(module: nn.Module, param_name: str) -> tuple[int | None, int, int]:
    """``(dim, tp_size, tp_rank)``: how ``module``'s own parameter ``param_name`` is held.

    ``dim`` is the tensor dim sharded over the module's TP group (this rank holds
    ``torch.chunk(full, tp_size, dim)[tp_rank]``), or ``None`` for a parameter held whole (every
    parameter of a non-parallel module, the row-parallel biases, the norms).
    """
    for cls, dims in _SHARD_DIMS.items():
        if isinstance(module, cls):
            tp = module.tp_size
            dim = dims.get(param_name)
            if dim is None or tp == 1:
                return None, 1, 0
            return dim, tp, module.tp_rank
    return None, 1, 0
