"""How each parameter of a parallel module is held: which tensor dim is sharded over its TP group.

One table for everything that reads or writes shards by name: initialization by name
(:mod:`~triton_parallel_layers.parallel_layers.init`) and the resharding checkpoints
(:mod:`~triton_parallel_layers.parallel_layers.checkpoint`).
"""

from __future__ import annotations

import torch
from torch import nn

from triton_parallel_layers.parallel_layers.conv import ColumnParallelConv2d, RowParallelConv2d
from triton_parallel_layers.parallel_layers.embedding import VocabParallelEmbedding
from triton_parallel_layers.parallel_layers.linear import ColumnParallelLinear, RowParallelLinear
from triton_parallel_layers.parallel_layers.lstm import GATES, ParallelLSTM

__all__ = ["local_shard", "param_blocks", "param_sharding"]

# Which dim of each parameter of a parallel module is sharded over its TP group (None: whole).
_SHARD_DIMS: dict[type, dict[str, int | None]] = {
    ColumnParallelLinear: {"weight": 0, "bias": 0},
    RowParallelLinear: {"weight": 1, "bias": None},
    VocabParallelEmbedding: {"weight": 0},
    ColumnParallelConv2d: {"weight": 0, "bias": 0},
    RowParallelConv2d: {"weight": 1, "bias": None},
}

# Modules whose parameters are made of equal blocks along dim 0, each block sharded alike: an
# LSTM's four gates (a rank holds its hidden units' rows of every gate, so its gate math is local).
# nn.LSTM is listed too, so a checkpoint holds the same blocked shapes at every TP size.
_BLOCKS: dict[type, int] = {ParallelLSTM: GATES, nn.LSTM: GATES}


def param_sharding(module: nn.Module, param_name: str) -> tuple[int | None, int, int]:
    """``(dim, tp_size, tp_rank)``: how ``module``'s own parameter ``param_name`` is held.

    ``dim`` is the tensor dim sharded over the module's TP group (this rank holds
    ``torch.chunk(full, tp_size, dim)[tp_rank]``), or ``None`` for a parameter held whole (every
    parameter of a non-parallel module, the row-parallel biases, the norms).
    """
    if isinstance(module, ParallelLSTM):
        return (0, module.tp_size, module.tp_rank) if module.tp_size > 1 else (None, 1, 0)
    for cls, dims in _SHARD_DIMS.items():
        if isinstance(module, cls):
            tp = module.tp_size
            dim = dims.get(param_name)
            if dim is None or tp == 1:
                return None, 1, 0
            return dim, tp, module.tp_rank
    return None, 1, 0


def param_blocks(module: nn.Module) -> int:
    """How many equal blocks ``module``'s parameters are made of along dim 0, each sharded alike
    (4 for the LSTMs' gates; 1 for everything else). A parameter with ``blocks > 1`` and shard dim
    0 holds :func:`local_shard` of the full tensor, not its plain chunk."""
    return next((b for cls, b in _BLOCKS.items() if isinstance(module, cls)), 1)


def local_shard(
    full: torch.Tensor, dim: int | None, parts: int, rank: int, blocks: int = 1
) -> torch.Tensor:
    """This rank's shard of ``full`` as :func:`param_sharding` and :func:`param_blocks` describe
    it: ``full.chunk(parts, dim)[rank]``, or with ``blocks > 1`` (dim 0) the concatenation of its
    chunk of each block."""
    if dim is None or parts == 1:
        return full
    if blocks == 1:
        return full.chunk(parts, dim)[rank]
    return full.unflatten(0, (blocks, -1)).chunk(parts, 1)[rank].flatten(0, 1)
