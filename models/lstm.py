"""A stacked-LSTM language model written for one device, and its tensor-parallel plan.

The model is plain ``nn`` modules: a token embedding, ``L`` blocks each holding one single-layer
``nn.LSTM`` (and dropout after it), and a head (LayerNorm + linear projection to the vocabulary)::

    ids (B, S) -> embed (B, S, E) -> block_0 (B, S, H) -> ... -> block_{L-1} (B, S, H) -> logits

One LSTM per block (rather than one ``nn.LSTM(num_layers=L)``) so that a pipeline can cut between
the layers, as GNMT-style systems split stacked LSTMs over devices layer by layer. Every sequence
starts from a zero state (truncated backpropagation through time over windows of ``S`` bytes).

Tensor parallelism is applied afterwards by :data:`LSTM_TP_PLAN` through
:func:`triton_parallel_layers.parallel_layers.parallelize`::

    model = parallelize(LSTMLM(config), LSTM_TP_PLAN, dims)
    logits = model(ids)                       # (B, S, V_padded / tp): vocabulary shard
    loss = model.loss(logits, target)         # vocab-parallel CE, logits never gathered

The plan makes the embedding vocabulary-parallel, every ``nn.LSTM`` a
:class:`~triton_parallel_layers.parallel_layers.ParallelLSTM` (hidden units sharded, one all-gather
of ``h_t`` per step, full-width output on every rank) and the head's projection column-parallel
(vocabulary-sharded logits). Sequence parallelism does not apply (the recurrence needs the whole
sequence on every rank).

**Vocabulary padding** as in :mod:`triton_parallel_layers.models.gpt`: the embedding and the head
have ``padded_vocab_size`` rows, the padded logits are ``-inf``.

**Initialization** depends only on ``(seed, parameter name)`` (:meth:`LSTMLM.init_weights`), so a
model built at any TP size or pipeline split, or on ``meta`` and materialized shard by shard, holds
exactly the shards of the single-device model with the same seed (the LSTM's gate-blocked shards
included: see :func:`~triton_parallel_layers.parallel_layers.sharding.param_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from triton_parallel_layers.models.lm import LanguageModel, LMHead
from triton_parallel_layers.parallel_layers.embedding import check_token_ids
from triton_parallel_layers.parallel_layers.init import draw_seed, init_by_name_

__all__ = ["LSTMBlock", "LSTMConfig", "LSTMHead", "LSTMLM", "LSTM_TP_PLAN"]


@dataclass
class LSTMConfig:
    """Shape and options of an :class:`LSTMLM`; checked in ``__post_init__``."""

    vocab_size: int = 256
    """Tokens in the vocabulary, ``V`` (256 for bytes)."""
    n_layers: int = 2
    """Stacked LSTM layers, ``L``."""
    embed_dim: int = 128
    """Width of the token embedding, ``E`` (the first LSTM's input)."""
    hidden_size: int = 224
    """Hidden units per LSTM layer, ``H`` (divisible by every ``tp`` you will use)."""
    max_seq_len: int = 128
    """Longest sequence the model accepts (the recurrence itself has no limit)."""
    dropout: float = 0.0
    """Dropout on the embedding output and after every LSTM layer, in ``[0, 1)``."""
    vocab_pad_multiple: int = 256
    """Pad the vocabulary to a multiple of this (choose a multiple of every ``tp``)."""
    forget_bias: float = 1.0
    """Initial bias of the forget gates (``b_ih``'s ``f`` rows): 1 keeps memory early on."""
    init_std: float = 0.02
    """Standard deviation of the head projection's initialization."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "embed_dim", "hidden_size", "max_seq_len",
                     "vocab_pad_multiple"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LSTMConfig.{name}={value!r}: expected a positive int")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LSTMConfig.dropout={self.dropout}: expected a value in [0, 1)")
        if self.init_std <= 0:
            raise ValueError(f"LSTMConfig.init_std={self.init_std}: expected a positive value")

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of ``vocab_pad_multiple``."""
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m


class LSTMEmbedding(nn.Module):
    """Token embedding + dropout: ids ``(B, S)`` -> ``(B, S, E)``."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.tok = nn.Embedding(config.padded_vocab_size, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.vocab_size, "LSTMLM")
        return self.drop(self.tok(ids))


class LSTMBlock(nn.Module):
    """One LSTM layer + dropout: ``(B, S, E_in) -> (B, S, H)``, from a zero state."""

    def __init__(self, config: LSTMConfig, input_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, config.hidden_size, batch_first=True)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.drop(out)


class LSTMHead(LMHead):
    """LayerNorm + output projection: ``(B, S, H)`` -> logits ``(B, S, V_padded)`` or this
    rank's vocabulary shard (see :class:`~.lm.LMHead`)."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(
            nn.LayerNorm(config.hidden_size),
            config.hidden_size,
            config.vocab_size,
            config.padded_vocab_size,
        )


class LSTMLM(LanguageModel):
    """Stacked-LSTM language model: ids ``(B, S)`` -> logits ``(B, S, V_padded)``.

    Args:
        config: the model's shape.
        seed: the initialization seed (see :meth:`init_weights`); ``None`` draws one from the
            default CPU generator, so ``torch.manual_seed(s)`` before the build fixes it.

    Attributes: ``embed``, ``blocks`` (``L`` x :class:`LSTMBlock`), ``head``, ``seed``.
    """

    def __init__(self, config: LSTMConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.seed = draw_seed(seed)
        self.embed = LSTMEmbedding(config)
        widths = [config.embed_dim] + [config.hidden_size] * (config.n_layers - 1)
        self.blocks = nn.ModuleList(LSTMBlock(config, w) for w in widths)
        self.head = LSTMHead(config)
        if not self.embed.tok.weight.is_meta:
            self.init_weights()

    # -- initialization --------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None, *, skip_meta: bool = False) -> None:
        """(Re)initialize every parameter from ``(seed, its name)`` alone, keeping local shards.

        LSTM weights and ``b_hh`` uniform ``+-1/sqrt(H)`` (``nn.LSTM``'s), ``b_ih`` zero but its
        forget-gate rows ``forget_bias``; embedding ``N(0, 1)`` (``nn.Embedding``'s); head
        projection ``N(0, init_std)``; LayerNorm weight 1, bias 0; padded vocabulary rows 0.
        The same values (shards) on one device, parallelized, and materialized from ``meta``:
        see :func:`triton_parallel_layers.parallel_layers.init.init_by_name_`. ``skip_meta``: leave
        parameters still on ``meta`` alone (a pipeline rank's model).
        """
        init_by_name_(
            self, self.seed if seed is None else seed, self._init_param, skip_meta=skip_meta
        )

    def _init_param(
        self, name: str, module: nn.Module, shape: torch.Size, gen: torch.Generator
    ) -> torch.Tensor:
        c = self.config
        if isinstance(module, nn.LayerNorm):
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        if ".lstm." in name:
            if ".lstm.bias_ih" in name:  # (4H,): gates i|f|g|o
                bias = torch.zeros(shape)
                bias[c.hidden_size : 2 * c.hidden_size] = c.forget_bias
                return bias
            bound = 1.0 / math.sqrt(c.hidden_size)
            return torch.empty(shape).uniform_(-bound, bound, generator=gen)
        std = 1.0 if name == "embed.tok.weight" else c.init_std
        w = torch.empty(shape).normal_(0.0, std, generator=gen)
        if name in ("embed.tok.weight", "head.proj.weight"):
            w[c.vocab_size :] = 0.0  # padded vocabulary rows
        return w


# The tensor-parallel plan (see triton_parallel_layers.parallel_layers.parallelize). Sequence
# parallelism is switched off entry by entry, so parallelize(..., sequence_parallel=True) cannot
# hand the recurrence a sequence shard.
LSTM_TP_PLAN: dict[str, str | dict] = {
    # (V/p, E) rows by vocabulary range
    "embed.tok": {"style": "vocab", "sequence_parallel": False},
    # ParallelLSTM: (4H/p, *) gate-blocked rows, h all-gathered once per step
    "blocks.*.lstm": "lstm",
    # (V/p, H): logits stay vocabulary-sharded for the loss
    "head.proj": {"style": "colwise", "sequence_parallel": False},
}
