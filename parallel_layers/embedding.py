"""Vocabulary-parallel embedding: the table's rows split by vocabulary range over the TP group.

Rank ``r`` of ``p`` holds the rows ``[r*V/p, (r+1)*V/p)``. Every rank looks up the ids that fall in
its range, writes zeros for the others, and the partial embeddings are summed over the group (an
all-reduce, or a reduce-scatter along the sequence with ``sequence_parallel``): exactly one rank
contributes each token's row, so the sum is exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from triton_parallel_layers.kernels.collectives import group_rank, group_size
from triton_parallel_layers.parallel_layers.checks import check_values
from triton_parallel_layers.parallel_layers.comm import (
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
)
from triton_parallel_layers.parallel_layers.utils import (
    check_sequence_divisible,
    copy_shard_,
    divide,
)

__all__ = ["VocabParallelEmbedding", "check_token_ids"]


def check_token_ids(ids: torch.Tensor, num_embeddings: int, what: str) -> None:
    """Check that ``ids`` is an integer tensor with every value in ``[0, num_embeddings)``.

    The dtype is checked eagerly (``TypeError``); the values without a host-device sync, by a
    device-side assert, or by an eager ``ValueError`` naming the bad id under
    :func:`~triton_parallel_layers.parallel_layers.checks.debug_checks` (see that module). The ids
    are replicated over the TP group, so every rank reaches the same verdict before any collective.
    """
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what}: token ids must be an integer tensor, got dtype {ids.dtype}")

    def explain() -> str:
        lo, hi = int(ids.min()), int(ids.max())
        return (
            f"{what}: token id {lo if lo < 0 else hi} is outside the vocabulary "
            f"[0, {num_embeddings}) (ids range over [{lo}, {hi}])"
        )

    ok = ((ids >= 0) & (ids < num_embeddings)).all()  # () bool; True when ids is empty
    check_values(ok, f"{what}: a token id is outside the vocabulary [0, {num_embeddings})", explain)


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with its rows split by vocabulary range over the TP group.

    Args:
        num_embeddings: total vocabulary size ``V`` (divisible by ``tp``; a model whose vocabulary
            is not, such as GPT-2's 50257, pads it first).
        embedding_dim: ``E``.
        tp_group: the tensor-parallel group; ``None`` or one rank means no communication.
        padding_idx: as in ``nn.Embedding``: that row starts at zero and gets no gradient.
        sequence_parallel: reduce-scatter the output along the sequence instead of all-reducing.

    Shapes, with ``p = tp``:
        weight ``(V/p, E)``; input ids ``(*, S)`` (replicated over the group);
        output ``(*, S, E)``, or ``(*, S/p, E)`` with ``sequence_parallel``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: dist.ProcessGroup | None = None,
        padding_idx: int | None = None,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = group_size(tp_group), group_rank(tp_group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(num_embeddings, self.tp_size, "num_embeddings")
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"padding_idx={padding_idx} must be within [-{num_embeddings}, {num_embeddings})"
                )
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        # The padding row, in local coordinates, on the one rank that holds it.
        in_range = padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end
        self.local_padding_idx = padding_idx - self.vocab_start if in_range else None
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition, embedding_dim, device=device, dtype=dtype
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the full ``nn.Embedding`` initialization (N(0, 1), padding row zero) on the CPU."""
        if self.weight.is_meta:
            return
        full = torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.weight.dtype)
        nn.init.normal_(full)
        if self.padding_idx is not None:
            full[self.padding_idx].zero_()
        copy_shard_(self.weight, full, self.tp_size, self.tp_rank, dim=0)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        tp_group: dist.ProcessGroup | None,
        *,
        sequence_parallel: bool = False,
    ) -> VocabParallelEmbedding:
        """The vocabulary shard of ``embedding`` (its rows ``chunk(tp, 0)[tp_rank]``)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}"
            )
        unsupported = {
            "max_norm": embedding.max_norm is not None,
            "scale_grad_by_freq": embedding.scale_grad_by_freq,
            "sparse": embedding.sparse,
        }
        if any(unsupported.values()):
            names = [k for k, v in unsupported.items() if v]
            raise ValueError(
                f"VocabParallelEmbedding does not support nn.Embedding options {names}"
            )
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            tp_group=tp_group,
            padding_idx=embedding.padding_idx,
            sequence_parallel=sequence_parallel,
            device="meta",
            dtype=embedding.weight.dtype,
        ).to_empty(device=embedding.weight.device)
        copy_shard_(layer.weight, embedding.weight, layer.tp_size, layer.tp_rank, dim=0)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_token_ids(ids, self.num_embeddings, name)
        if self.sequence_parallel:
            check_sequence_divisible(ids.unsqueeze(-1), self.tp_size, name)
        if self.tp_size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight, self.local_padding_idx)  # (*, S, E)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # rows other ranks own
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(out, self.tp_group, dim=-2)  # (*, S/p, E)
        return reduce_from_tp(out, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim} ({self.num_embeddings_per_partition} "
            f"rows per rank, tp={self.tp_size}), padding_idx={self.padding_idx}, "
            f"sequence_parallel={self.sequence_parallel}"
        )
