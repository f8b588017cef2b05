"""Models written for one device, each with its tensor-parallel plan.

``triton_parallel_layers.models.gpt``: :class:`~triton_parallel_layers.models.gpt.GPT` (decoder-only Transformer), ``GPTConfig``, ``GPT_TP_PLAN``.
``triton_parallel_layers.models.cnn``: :class:`~triton_parallel_layers.models.cnn.SimpleCNN` (the seed example), :class:`~triton_parallel_layers.models.cnn.ResNetCNN`,
``CNNConfig``, ``CNN_TP_PLAN``. ``triton_parallel_layers.models.data``: small bundled data sets (``load_digits_28``).

Each model exposes ``pipeline_layers()`` (the ordered modules whose composition is the forward
pass) and ``loss(logits, target, tp_group=None)`` for the pipeline schedules.

The names are imported lazily, so ``python -m triton_parallel_layers.models.cnn`` runs the module once, cleanly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GPT": "triton_parallel_layers.models.gpt",
    "GPTConfig": "triton_parallel_layers.models.gpt",
    "GPT_TP_PLAN": "triton_parallel_layers.models.gpt",
    "CNNConfig": "triton_parallel_layers.models.cnn",
    "CNN_TP_PLAN": "triton_parallel_layers.models.cnn",
    "ResNetCNN": "triton_parallel_layers.models.cnn",
    "SIMPLE_CNN_TP_PLAN": "triton_parallel_layers.models.cnn",
    "SimpleCNN": "triton_parallel_layers.models.cnn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
