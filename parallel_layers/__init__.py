"""Tensor-, sequence-, pipeline- and data-parallel building blocks as plain PyTorch modules.

Groups and meshes are always passed in (``tp_group=...``, ``ParallelDims``); nothing here keeps
process-group state at module level.
"""

from triton_parallel_layers.parallel_layers.attention import ParallelSelfAttention
from triton_parallel_layers.parallel_layers.conv import ColumnParallelConv2d, RowParallelConv2d
from triton_parallel_layers.parallel_layers.cross_entropy import vocab_parallel_cross_entropy
from triton_parallel_layers.parallel_layers.dims import ParallelDims
from triton_parallel_layers.parallel_layers.embedding import VocabParallelEmbedding
from triton_parallel_layers.parallel_layers.linear import ColumnParallelLinear, RowParallelLinear
from triton_parallel_layers.parallel_layers.lstm import ParallelLSTM
from triton_parallel_layers.parallel_layers.parallelize import parallelize
from triton_parallel_layers.parallel_layers.pipeline import (  # noqa: F401
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBH1,
    build_stages,
    partition_layers,
    pipeline_parameters,
)
from triton_parallel_layers.parallel_layers.sequence_parallel import (  # noqa: F401
    allreduce_sequence_parallel_grads,
)

__all__ = [
    "ColumnParallelConv2d",
    "ColumnParallelLinear",
    "ParallelDims",
    "ParallelLSTM",
    "ParallelSelfAttention",
    "RowParallelConv2d",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "parallelize",
    "vocab_parallel_cross_entropy",
]
