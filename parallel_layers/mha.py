"""``nn.MultiheadAttention`` behind the head-sharded :class:`ParallelSelfAttention`.

The plan style ``attention`` turns an ``nn.MultiheadAttention`` (batch-first self-attention) into
:class:`MHASelfAttention`, so a user's model that calls ``attn(x, x, x, need_weights=False)[0]``
keeps working under tensor parallelism.
"""

from __future__ import annotations

import torch

from triton_parallel_layers.parallel_layers.attention import ParallelSelfAttention

__all__ = ["MHASelfAttention"]


class MHASelfAttention(ParallelSelfAttention):
    """What ``nn.MultiheadAttention`` becomes under the ``attention`` style: the head-sharded
    :class:`ParallelSelfAttention` (built by ``from_mha``) behind MHA's call signature, so the
    model's ``attn(x, x, x, need_weights=False)[0]`` keeps working.

    Self-attention only (``key`` and ``value`` are ``query`` or ``None``); masking is the
    ``causal`` fixed at conversion (``attn_mask``/``key_padding_mask`` raise, ``is_causal`` must
    agree). Returns ``(output, None)``: attention weights are never materialized.
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        name = type(self).__name__
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError(f"{name}: self-attention only (key and value must be the query)")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError(
                f"{name}: masks are not supported; causal={self.causal} was fixed by the plan's "
                "'causal' option"
            )
        if is_causal and not self.causal:
            raise ValueError(f"{name}: is_causal=True, but the plan converted it with causal=False")
        return super().forward(query), None
