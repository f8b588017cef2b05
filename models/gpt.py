"""A decoder-only Transformer (GPT) written for one device, and its tensor-parallel plan.

The model is plain ``nn`` modules: pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``,
rotary position embeddings, causal grouped-query self-attention through
:func:`triton_parallel_layers.kernels.flash_attention`, a GELU MLP, a final norm and a linear head (tied to the token
embedding by default). Its attention module is :class:`triton_parallel_layers.parallel_layers.ParallelSelfAttention`
built with ``tp_group=None``, which *is* the single-device attention (fused grouped QKV, RoPE,
GQA), so the package has one attention implementation.

Tensor parallelism is applied afterwards by :data:`GPT_TP_PLAN` through
:func:`triton_parallel_layers.parallel_layers.parallelize`::

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_layers=12, n_heads=12, embed_dim=768))
    model = parallelize(model, GPT_TP_PLAN, dims, sequence_parallel=True)
    logits = model(ids)                              # (B, S, V_padded / tp): vocabulary shard
    loss = model.loss(logits, target)                # vocab-parallel CE, logits never gathered

Shapes with ``p = tp``: ids ``(B, S)`` (replicated over the TP group); the residual stream
``(B, S, E)``, or ``(B, S/p, E)`` with sequence parallelism; logits ``(B, S, V_padded/p)``.

**Vocabulary padding.** The embedding and head have ``padded_vocab_size`` rows: ``vocab_size``
rounded up to a multiple of ``vocab_pad_multiple`` (GPT-2's 50257 -> 50304 with 128), fixed by the
config, not by ``tp``, so the parameters (and their initialization) are the same at every TP size.
Pick a multiple that ``tp`` divides. The head writes ``-inf`` into the padded logits (on whichever
rank holds them), so they get probability 0: they never reach the loss (nor its gradient) nor a
softmax or argmax over the logits. The padded rows of the embedding are never looked up.

**Tied embeddings.** ``head.proj.weight`` *is* ``embed.tok.weight`` (``(V_padded, E)``). Under TP the
plan makes the embedding vocab-parallel and the head column-parallel; both hold rows
``chunk(V_padded, p)[rank]``, ``(V_padded/p, E)``, so :func:`parallelize` ties the two shards again.

**Sequence parallelism.** Under ``parallelize(..., sequence_parallel=True)`` the embedding
reduce-scatters to ``(B, S/p, E)``, every block keeps that layout (its first linear gathers the
sequence, its last reduce-scatters it), and the head's column-parallel projection gathers it back
before the vocabulary matmul. The norms and dropouts in between see only this rank's tokens: the
plan's ``"sequence_parallel"`` entries swap them for versions whose parameter gradients are summed
over the TP group (and whose dropout masks are the single-device ones), so nothing is left to the
user.

**Dropout** (``config.dropout``) is applied to the embedding output and to each residual branch
(not to attention probabilities: :func:`triton_parallel_layers.kernels.flash_attention` has no dropout). Under TP it
stays equal to one device provided every rank of the TP group holds the same RNG state (seed the
ranks alike): without sequence parallelism the activations are replicated and every rank draws
the single-device mask; with it, :class:`~triton_parallel_layers.parallel_layers.sequence_parallel.SequenceParallelDropout`
draws the whole sequence's mask and keeps its chunk (a transient full-size mask per call). With
per-rank seeds, replicated activations would diverge across ranks: do not do that.

**Initialization** depends only on ``(seed, parameter name)`` (see :meth:`GPT.init_weights`), so a
model built at any TP size, or on ``meta`` and materialized shard by shard, holds exactly the
shards of the single-device model with the same seed::

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)                          # no memory; draws model.seed as usual
    model = parallelize(model, GPT_TP_PLAN, dims)
    model.to_empty(device="cuda")                    # only the local shards
    model.init_weights()                             # the values of the full build's shards

**For pipeline parallelism**: :meth:`GPT.pipeline_layers` lists ``[embed, block_0, ...,
block_{L-1}, head]``, whose sequential composition on ``ids`` is ``model(ids)`` (on the
parallelized model too), and :meth:`GPT.loss` is the loss on the last stage's output. With tied
embeddings the first and last stages share ``embed.tok.weight``: a pipeline that puts them on
different ranks must keep two copies and sum their gradients (as Megatron-LM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from triton_parallel_layers.kernels._dispatch import autocast_inputs
from triton_parallel_layers.kernels.attention import SUPPORTED_HEAD_DIMS
from triton_parallel_layers.models.lm import LanguageModel, LMHead
from triton_parallel_layers.parallel_layers import ParallelSelfAttention
from triton_parallel_layers.parallel_layers.embedding import check_token_ids
from triton_parallel_layers.parallel_layers.init import draw_seed, init_by_name_

__all__ = ["GPT", "GPTBlock", "GPTConfig", "GPTEmbedding", "GPTHead", "GPT_TP_PLAN", "MLP"]

NORMS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    """Shape and options of a :class:`GPT`; checked in ``__post_init__``."""

    vocab_size: int = 50257
    """Tokens in the vocabulary, ``V`` (targets and ids must be below it)."""
    n_layers: int = 12
    """Transformer blocks, ``L``."""
    n_heads: int = 12
    """Query heads ``Hq``; ``embed_dim`` must divide by it (head dim ``D = E / Hq``, even for RoPE)."""
    n_kv_heads: int | None = None
    """Key/value heads ``Hkv`` (grouped-query attention; divides ``n_heads``); None: ``n_heads``."""
    embed_dim: int = 768
    """Width of the residual stream, ``E``."""
    mlp_ratio: float = 4.0
    """MLP hidden width over ``E``; ``mlp_ratio * E`` must be a whole number."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (RoPE itself has no limit)."""
    dropout: float = 0.0
    """Dropout on the embedding output and on each residual branch, in ``[0, 1)``."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head's weight."""
    norm: str = "layernorm"
    """``"layernorm"`` or ``"rmsnorm"``."""
    bias: bool = False
    """Biases in the linear layers (not the head) and the LayerNorms."""
    vocab_pad_multiple: int = 128
    """Pad the vocabulary to a multiple of this (choose a multiple of every ``tp`` you will use)."""
    rope_base: float = 10000.0
    """RoPE's frequency base."""
    norm_eps: float = 1e-5
    """The norms' epsilon."""
    init_std: float = 0.02
    """Standard deviation of the weight initialization (GPT-2's 0.02)."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_layers", "n_heads", "embed_dim", "max_seq_len",
                    "vocab_pad_multiple")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r}: expected a positive int")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"GPTConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if (
            self.embed_dim % self.n_heads
            or self.embed_dim // self.n_heads not in SUPPORTED_HEAD_DIMS
        ):
            raise ValueError(
                f"GPTConfig: embed_dim={self.embed_dim} must divide by n_heads={self.n_heads} into "
                f"a head dim the attention kernel supports, one of {SUPPORTED_HEAD_DIMS}"
            )
        hidden = self.mlp_ratio * self.embed_dim
        if self.mlp_ratio <= 0 or hidden != int(hidden):
            raise ValueError(
                f"GPTConfig: mlp_ratio={self.mlp_ratio} * embed_dim={self.embed_dim} = {hidden} "
                "must be a positive whole number"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout}: expected a value in [0, 1)")
        if self.norm not in NORMS:
            raise ValueError(f"GPTConfig.norm={self.norm!r}: expected one of {NORMS}")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_base <= 0:
            raise ValueError("GPTConfig: init_std, norm_eps and rope_base must be positive")

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of ``vocab_pad_multiple``."""
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_heads


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.embed_dim, eps=config.norm_eps)
    return nn.LayerNorm(config.embed_dim, eps=config.norm_eps, bias=config.bias)


class GPTEmbedding(nn.Module):
    """Token embedding + dropout: ids ``(B, S)`` -> ``(B, S, E)`` (``(B, S/p, E)`` under SP).

    Under ``torch.autocast`` the output is in the autocast dtype (the embedding lookup itself is
    not an autocast op): the residual stream is then bf16 at every TP size, as it is downstream of
    the first collective with TP (whose communication casts, see
    :mod:`~triton_parallel_layers.parallel_layers.comm`) and in Megatron-LM's bf16 training.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.tok = nn.Embedding(config.padded_vocab_size, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.vocab_size, "GPT")  # padded rows are never looked up
        return self.drop(autocast_inputs(self.tok(ids))[0])  # the compute dtype under autocast


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``(*, E) -> (*, H) -> (*, E)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(config.mlp_hidden, config.embed_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GPTBlock(nn.Module):
    """Pre-norm block: ``x + drop(attn(norm1(x)))``, then ``x + drop(mlp(norm2(x)))``.

    ``(B, S, E) -> (B, S, E)``; ``(B, S/p, E)`` in and out under sequence parallelism.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = ParallelSelfAttention(
            config.embed_dim, config.n_heads, config.n_kv_heads, causal=True, bias=config.bias,
            rope=True, rope_base=config.rope_base,
        )  # fmt: skip
        self.norm2 = _norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPTHead(LMHead):
    """Final norm + output projection: ``(B, S, E)`` (or ``(B, S/p, E)``) -> logits
    ``(B, S, V_padded)`` or this rank's vocabulary shard (see :class:`~.lm.LMHead`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(
            _norm(config), config.embed_dim, config.vocab_size, config.padded_vocab_size
        )


class GPT(LanguageModel):
    """Decoder-only Transformer: ids ``(B, S)`` -> logits ``(B, S, V_padded)``.

    Args:
        config: the model's shape.
        seed: the initialization seed (see :meth:`init_weights`); ``None`` draws one from the
            default CPU generator, so ``torch.manual_seed(s)`` before the build fixes it.

    Attributes: ``embed`` (:class:`GPTEmbedding`), ``blocks`` (``L`` x :class:`GPTBlock`),
    ``head`` (:class:`GPTHead`), ``seed``.
    """

    def __init__(self, config: GPTConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.seed = draw_seed(seed)
        self.embed = GPTEmbedding(config)
        self.blocks = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layers))
        self.head = GPTHead(config)
        self.tie_weights()
        if not self.embed.tok.weight.is_meta:
            self.init_weights()

    # -- initialization --------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Make ``head.proj.weight`` the embedding's weight (with ``tie_embeddings``).

        Needed again after ``to_empty``, which gives each module its own new tensor and so unties
        shared parameters; :meth:`init_weights` calls it. On a parallelized model the two are the
        same ``(V_padded/p, E)`` shard.
        """
        if self.config.tie_embeddings:
            self.head.proj.weight = self.embed.tok.weight

    def init_weights(self, seed: int | None = None, *, skip_meta: bool = False) -> None:
        """(Re)initialize every parameter from ``(seed, its name)`` alone, keeping local shards.

        Weights ``N(0, init_std)``; the residual branches' output projections (``attn.proj``,
        ``mlp.fc2``) ``N(0, init_std / sqrt(2 L))`` (GPT-2); biases 0; norm weights 1; padded
        vocabulary rows 0. Works on the single-device model, the parallelized one and one
        materialized from ``meta`` with ``to_empty``, with the same values (shards) in all three:
        see :func:`triton_parallel_layers.parallel_layers.init.init_by_name_`. ``seed`` defaults to ``self.seed``.
        Re-ties the embeddings first (:meth:`tie_weights`). ``skip_meta``: leave parameters still
        on ``meta`` alone (a pipeline rank's model, materialized only in its own stages).
        """
        self.tie_weights()
        init_by_name_(
            self, self.seed if seed is None else seed, self._init_param, skip_meta=skip_meta
        )

    def _init_param(
        self, name: str, module: nn.Module, shape: torch.Size, gen: torch.Generator
    ) -> torch.Tensor:
        c = self.config
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        std = c.init_std
        if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            std /= math.sqrt(2 * c.n_layers)
        w = torch.empty(shape).normal_(0.0, std, generator=gen)
        if name in ("embed.tok.weight", "head.proj.weight"):
            w[c.vocab_size :] = 0.0  # padded vocabulary rows
        return w


# The tensor-parallel plan (see triton_parallel_layers.parallel_layers.parallelize): Megatron-style, one all-reduce (or
# reduce-scatter + all-gather under SP) per attention and per MLP, forward and backward.
GPT_TP_PLAN: dict[str, str] = {
    "embed.tok": "vocab",  # (V/p, E) rows by vocabulary range
    "embed.drop": "sequence_parallel",
    "blocks.*.norm1": "sequence_parallel",
    "blocks.*.attn": "attention",  # heads sharded: qkv column-, proj row-parallel
    "blocks.*.norm2": "sequence_parallel",
    "blocks.*.mlp.fc1": "colwise",  # (H/p, E)
    "blocks.*.mlp.fc2": "rowwise",  # (E, H/p)
    "blocks.*.drop": "sequence_parallel",
    "head.norm": "sequence_parallel",
    "head.proj": "colwise",  # (V/p, E): logits stay vocabulary-sharded for the loss
}
