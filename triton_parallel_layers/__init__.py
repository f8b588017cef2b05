"""triton-parallel-layers: Triton kernels under drop-in tensor-, sequence-, pipeline- and
data-parallel PyTorch layers.

One import root; its subpackages are the repository's top-level folders::

    triton_parallel_layers.kernels          Triton kernels, each with its torch reference
    triton_parallel_layers.parallel_layers  ParallelDims, parallel layers, plans, pipeline, checkpoints
    triton_parallel_layers.models           GPT, CNNs and their tensor-parallel plans
    triton_parallel_layers.training         the trainer behind scripts/

The public names of the design contract are re-exported here::

    import triton_parallel_layers as tpl
    dims = tpl.ParallelDims(dp=1, pp=1, tp=2)
    up = tpl.ColumnParallelLinear.from_linear(fc1, dims.tp_group)

``python -m triton_parallel_layers.info`` prints the versions, devices and kernel backends (for a
bug report).
"""

from __future__ import annotations

import os as _os

__version__ = "0.2.0"


def _source_checkout_path() -> str | None:
    """The repository root when this is the source checkout run without an install
    (``PYTHONPATH=<checkout>``), else ``None``.

    In the checkout the subpackages are the folders beside this one (``kernels/``, ``models/``,
    ...). An install (wheel, or editable through setuptools' package-dir mapping) puts or maps them
    under this package, and then this returns ``None``.
    """
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    marker = _os.path.join(root, "kernels", "_dispatch.py")
    pyproject = _os.path.join(root, "pyproject.toml")
    if not (_os.path.isfile(marker) and _os.path.isfile(pyproject)):
        return None
    with open(pyproject, encoding="utf-8") as f:
        return root if 'name = "triton-parallel-layers"' in f.read() else None


_checkout = _source_checkout_path()
if _checkout is not None and _checkout not in __path__:
    __path__.append(_checkout)  # noqa: F821 (the package's own search path)

from triton_parallel_layers.kernels import (  # noqa: E402
    all_gather_matmul,
    conv2d_bias_relu,
    flash_attention,
    force_backend,
    matmul_reduce_scatter,
)
from triton_parallel_layers.parallel_layers import (  # noqa: E402
    ColumnParallelConv2d,
    ColumnParallelLinear,
    ParallelDims,
    ParallelLSTM,
    ParallelSelfAttention,
    RowParallelConv2d,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallelize,
    vocab_parallel_cross_entropy,
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
    "__version__",
    "all_gather_matmul",
    "conv2d_bias_relu",
    "flash_attention",
    "force_backend",
    "matmul_reduce_scatter",
    "parallelize",
    "vocab_parallel_cross_entropy",
]
