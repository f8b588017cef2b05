"""What the package's token language models (:class:`~.gpt.GPT`, :class:`~.lstm.LSTMLM`) share.

Both are ``embed -> blocks -> head`` over token ids ``(B, S)``, with a vocabulary padded to a
multiple of the tensor-parallel sizes, logits that stay vocabulary-sharded under TP, and the
pipeline split ``[embed, *blocks, head]``. :class:`LanguageModel` holds that once: the forward
with its input checks, the vocabulary-parallel loss (padding ids never reach it), the layers the
pipeline cuts, and the parameter count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from triton_parallel_layers.kernels.collectives import group_size
from triton_parallel_layers.parallel_layers import ColumnParallelLinear
from triton_parallel_layers.parallel_layers.checks import check_values
from triton_parallel_layers.parallel_layers.cross_entropy import vocab_parallel_cross_entropy

__all__ = ["LMHead", "LanguageModel"]


class LMHead(nn.Module):
    """Final norm + output projection: ``(B, S, width)`` -> logits ``(B, S, V_padded)``, or this
    rank's vocabulary shard ``(B, S, V_padded/p)`` once ``proj`` is column-parallel; the columns
    of padded vocabulary entries are ``-inf`` (probability 0, never sampled)."""

    def __init__(
        self, norm: nn.Module, width: int, vocab_size: int, padded_vocab_size: int
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.norm = norm
        self.proj = nn.Linear(width, padded_vocab_size, bias=False)

    def vocab_range(self) -> tuple[int, int]:
        """``[start, end)``: the global vocabulary ids of this rank's logit columns."""
        proj = self.proj
        if isinstance(proj, ColumnParallelLinear) and not proj.gather_output:
            start = proj.tp_rank * proj.out_features_per_partition
            return start, start + proj.out_features_per_partition
        return 0, proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(self.norm(x))  # (B, S, V_padded / p)
        start, end = self.vocab_range()
        if end > self.vocab_size:  # this rank holds padded columns: probability 0
            padded = torch.arange(start, end, device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        return logits


class LanguageModel(nn.Module):
    """Base of a token language model. Subclasses build ``config`` (with ``vocab_size``,
    ``padded_vocab_size`` and ``max_seq_len``), ``embed`` (ids ``(B, S)`` -> ``(B, S, E)``),
    ``blocks`` (an ``nn.ModuleList`` of ``(B, S, E)`` -> ``(B, S, E)``) and ``head`` (whose
    ``proj`` makes the logits)."""

    config: object
    embed: nn.Module
    blocks: nn.ModuleList
    head: nn.Module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``(B, S)`` -> logits ``(B, S, V_padded)``, or ``(B, S, V_padded/p)`` under TP."""
        name = type(self).__name__
        if ids.dim() != 2:
            raise ValueError(f"{name}: expected token ids (B, S), got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{name}: sequence length {ids.shape[1]} exceeds max_seq_len="
                f"{self.config.max_seq_len}"
            )
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def vocab_group(self) -> dist.ProcessGroup | None:
        """The TP group the logits are sharded over (``None`` when they are whole)."""
        proj = self.head.proj
        if isinstance(proj, ColumnParallelLinear) and not proj.gather_output:
            return proj.tp_group
        return None

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        tp_group: dist.ProcessGroup | None = None,
        *,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy from this model's (vocabulary-sharded) logits.

        Args:
            logits: ``(B, S, V_padded/p)``, as returned by ``forward`` (padded columns ``-inf``).
            target: ``(B, S)`` ids in ``[0, vocab_size)`` or ``ignore_index``, replicated. A
                padding id is a device-side assert (an eager ``ValueError`` under
                ``TPL_DEBUG_CHECKS=1``; see :mod:`~triton_parallel_layers.parallel_layers.checks`).
            tp_group: the group the logits are sharded over; default: the one the head was
                parallelized over (``None`` on one device). The logits are never gathered.
        """
        name = f"{type(self).__name__}.loss"
        group = self.vocab_group() if tp_group is None else tp_group
        expected = self.config.padded_vocab_size
        if logits.shape[-1] * group_size(group) != expected:
            raise ValueError(
                f"{name}: logits of shape {tuple(logits.shape)} over {group_size(group)} rank(s) "
                f"do not make the padded vocabulary of {expected}"
            )
        vocab = self.config.vocab_size
        padding = (target != ignore_index) & (target >= vocab)  # (B, S) bool

        def explain() -> str:
            return f"{name}: target id {int(target[padding].max())} is a padding id (vocab_size={vocab})"

        check_values(~padding.any(), f"{name}: a target id is a padding id (>= {vocab})", explain)
        return vocab_parallel_cross_entropy(logits, target, group, ignore_index=ignore_index)

    def pipeline_layers(self) -> list[nn.Module]:
        """``[embed, block_0, ..., block_{L-1}, head]``: applied in order to ids ``(B, S)`` they
        give ``forward``'s logits. The modules themselves (not copies): on a parallelized model,
        the parallel ones."""
        return [self.embed, *self.blocks, self.head]

    def num_parameters(self) -> int:
        """Parameters held by this rank (tied ones once)."""
        return sum(p.numel() for p in self.parameters())
