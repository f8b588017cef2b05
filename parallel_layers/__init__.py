"""Tensor-, sequence-, pipeline- and data-parallel building blocks as plain PyTorch modules.

Groups and meshes are always passed in (``tp_group=...``, ``ParallelDims``); nothing here keeps
process-group state at module level.
"""

from parallel_layers.attention import ParallelSelfAttention
from parallel_layers.conv import ColumnParallelConv2d, RowParallelConv2d
from parallel_layers.cross_entropy import vocab_parallel_cross_entropy
from parallel_layers.dims import ParallelDims
from parallel_layers.embedding import VocabParallelEmbedding
from parallel_layers.linear import ColumnParallelLinear, RowParallelLinear
from parallel_layers.parallelize import parallelize
from parallel_layers.pipeline import (  # noqa: F401
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBH1,
    build_stages,
    partition_layers,
    pipeline_parameters,
)

__all__ = [
    "ColumnParallelConv2d",
    "ColumnParallelLinear",
    "ParallelDims",
    "ParallelSelfAttention",
    "RowParallelConv2d",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "parallelize",
    "vocab_parallel_cross_entropy",
]
