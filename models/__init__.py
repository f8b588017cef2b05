"""Models written for one device, each with its tensor-parallel plan.

=========  ==================================================================================
module     holds
=========  ==================================================================================
``gpt``    :class:`~.gpt.GPT` (decoder-only Transformer), ``GPTConfig``, ``GPT_TP_PLAN``
``lstm``   :class:`~.lstm.LSTMLM` (stacked-LSTM language model), ``LSTMConfig``,
           ``LSTM_TP_PLAN``
``lm``     :class:`~.lm.LanguageModel`: what the two language models share (forward, the
           vocabulary-parallel loss, the pipeline split)
``cnn``    :class:`~.cnn.SimpleCNN` (the seed example), :class:`~.cnn.ResNetCNN`, ``CNNConfig``,
           ``CNN_TP_PLAN``
``data``   small bundled data sets (``load_digits_28``)
=========  ==================================================================================

Each model exposes ``pipeline_layers()`` (the ordered modules whose composition is the forward
pass) and ``loss(logits, target, tp_group=None)`` for the pipeline schedules.

The names are imported lazily, so ``python -m triton_parallel_layers.models.cnn`` runs the module
once, cleanly.
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
    "LSTMLM": "triton_parallel_layers.models.lstm",
    "LSTMConfig": "triton_parallel_layers.models.lstm",
    "LSTM_TP_PLAN": "triton_parallel_layers.models.lstm",
    "LanguageModel": "triton_parallel_layers.models.lm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
