"""Head-sharded self-attention: fused QKV column-parallel, output projection row-parallel.

Over a TP group of ``p`` ranks each rank owns ``Hq/p`` query heads and the ``Hkv/p`` key/value
heads they read, so attention itself needs no communication::

    x (B, S, E) --qkv: ColumnParallelLinear--> (B, S, (Hq + 2 Hkv) D / p) --RoPE, flash_attention-->
      (B, Hq/p, S, D) --proj: RowParallelLinear--> (B, S, E)  (all-reduce, or reduce-scatter with SP)

**The fused QKV layout.** The rows of the fused ``qkv`` weight ``((Hq + 2 Hkv) D, E)`` are ordered
by key/value group: for each kv head ``g`` (``r = Hq / Hkv`` query heads share it), the ``r``
query heads of the group, then key head ``g``, then value head ``g``::

    [ q_{g=0,0} .. q_{0,r-1} k_0 v_0 | q_{1,0} .. q_{1,r-1} k_1 v_1 | ... ]     (each D rows)

so the contiguous chunk ``torch.chunk(w, p, 0)[rank]`` (the package's sharding rule) is exactly
the whole groups ``rank`` owns, and query head ``h = g r + j`` reads kv head ``h // r`` as in
``F.scaled_dot_product_attention(..., enable_gqa=True)``. Megatron-LM orders its fused QKV the
same way. :meth:`ParallelSelfAttention.from_mha` permutes ``nn.MultiheadAttention``'s
``[Wq; Wk; Wv]`` into it.

**Rotary embeddings** (RoPE, the rotate-half form of GPT-NeoX and LLaMA) rotate q and k by
position; under sequence parallelism the QKV projection has already gathered the whole sequence,
so positions are ``0..S-1`` on every rank. The rotation saves nothing for its backward: its
``cos``/``sin`` tables ``(S, D)`` are recomputed there (``S * D / 2`` angles, negligible next to
the attention), rather than kept per layer and per microbatch in flight.

**Saved activations.** What the module keeps for its backward is the QKV projection's input (its
sequence shard under sequence parallelism), q and k after RoPE, v, and the attention's output
and log-sum-exp; the output projection's input is the attention's output itself, viewed as
``(B, S, Hq D / p)`` (:func:`~triton_parallel_layers.kernels.flash_attention` stores its output
sequence-major for that), not a rearranged copy.

With ``tp_group=None`` this is an ordinary single-device attention module; a model written for one
device uses it as is, and :meth:`ParallelSelfAttention.from_attention` shards it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from triton_parallel_layers.kernels import flash_attention
from triton_parallel_layers.kernels.attention import SUPPORTED_HEAD_DIMS
from triton_parallel_layers.kernels.collectives import group_size
from triton_parallel_layers.parallel_layers.linear import ColumnParallelLinear, RowParallelLinear
from triton_parallel_layers.parallel_layers.utils import check_width, copy_shard_, divide

__all__ = ["ParallelSelfAttention", "apply_rotary", "apply_rotary_qk", "rotary_cos_sin"]


def rotary_cos_sin(
    seq_len: int, head_dim: int, base: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of shape ``(S, D)``: angle ``pos * base^(-2i/D)`` for pair ``i``, repeated
    over the two halves of the head dim. Computed in fp32, returned in ``dtype``."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: ``x (B, H, S, D)`` with ``cos``/``sin`` ``(S, D)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _RotaryQK(torch.autograd.Function):
    """RoPE on q and k at positions ``0..S-1`` that saves no tensor for its backward.

    The rotation by angle ``a`` is orthogonal, so its backward is the rotation by ``-a``:
    ``apply_rotary(dy, cos, -sin)``, with the tables recomputed in ``dy``'s dtype exactly as the
    forward computed them in ``x``'s (the same values autograd would have saved, and the same
    gradient bit for bit: ``(-dy2) * (-sin) == dy2 * sin``).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, base: float):
        ctx.base = base
        cos, sin = rotary_cos_sin(q.shape[-2], q.shape[-1], base, q.device, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = rotary_cos_sin(dq.shape[-2], dq.shape[-1], ctx.base, dq.device, dq.dtype)
        return apply_rotary(dq, cos, -sin), apply_rotary(dk, cos, -sin), None


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of ``q (B, Hq, S, D)`` and ``k (B, Hkv, S, D)`` at positions ``0..S-1``
    (one dtype): ``apply_rotary`` with ``rotary_cos_sin(S, D, base)`` tables in their dtype,
    which are recomputed in the backward instead of saved (see the module docstring)."""
    return _RotaryQK.apply(q, k, base)


class ParallelSelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with heads sharded over the TP group.

    Args:
        embed_dim: ``E``.
        num_heads: query heads ``Hq`` (divisible by ``tp``); head dim ``D = E / Hq``.
        num_kv_heads: key/value heads ``Hkv`` (divides ``Hq``, divisible by ``tp``); default ``Hq``.
        tp_group: the tensor-parallel group; ``None`` or one rank: a single-device module.
        causal: mask future keys (decoder self-attention).
        bias: biases on the QKV and output projections.
        sequence_parallel: input and output are sharded along the sequence, ``(B, S/p, E)``.
        overlap_comm: with ``sequence_parallel``, overlap its gather/reduce-scatter with the matmuls.
        rope: apply rotary position embeddings to q and k.
        rope_base: RoPE's frequency base.

    Shapes, with ``p = tp``: qkv weight ``((Hq + 2 Hkv) D / p, E)``, proj weight ``(E, Hq D / p)``;
    input and output ``(B, S, E)``, or ``(B, S/p, E)`` with ``sequence_parallel``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        tp_group: dist.ProcessGroup | None = None,
        causal: bool = True,
        bias: bool = False,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
        rope: bool = True,
        rope_base: float = 10000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        tp = group_size(tp_group)
        self.num_heads_per_partition = divide(num_heads, tp, "num_heads")
        self.num_kv_heads_per_partition = divide(num_kv_heads, tp, "num_kv_heads")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head dim embed_dim / num_heads = {embed_dim} / {num_heads} = {self.head_dim} is "
                f"not supported by the attention kernel: expected one of {SUPPORTED_HEAD_DIMS}"
            )
        if rope and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}")
        self.tp_group, self.tp_size = tp_group, tp
        self.causal, self.rope, self.rope_base = causal, rope, rope_base
        self.sequence_parallel = sequence_parallel and tp > 1
        kw = {"tp_group": tp_group, "sequence_parallel": sequence_parallel,
              "overlap_comm": overlap_comm, "device": device, "dtype": dtype}  # fmt: skip
        qkv_out = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv = ColumnParallelLinear(embed_dim, qkv_out, bias, **kw)
        self.proj = RowParallelLinear(num_heads * self.head_dim, embed_dim, bias, **kw)

    def _config(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "causal": self.causal,
            "bias": self.qkv.bias is not None,
            "rope": self.rope,
            "rope_base": self.rope_base,
        }

    @classmethod
    def from_attention(
        cls,
        attn: ParallelSelfAttention,
        tp_group: dist.ProcessGroup | None,
        *,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
    ) -> ParallelSelfAttention:
        """Shard a single-device ``ParallelSelfAttention`` (built with ``tp_group=None``)."""
        if not isinstance(attn, ParallelSelfAttention):
            raise TypeError(
                f"from_attention expects a ParallelSelfAttention, got {type(attn).__name__}"
            )
        if attn.tp_size != 1:
            raise ValueError(
                f"from_attention expects a single-device module, got one with tp={attn.tp_size}"
            )
        w = attn.qkv.weight
        layer = cls(**attn._config(), tp_group=tp_group, sequence_parallel=sequence_parallel,
                    overlap_comm=overlap_comm, device="meta", dtype=w.dtype)  # fmt: skip
        layer = layer.to_empty(device=w.device)
        qkv_b = attn.qkv.bias
        layer._load_full(w, qkv_b, attn.proj.weight, attn.proj.bias)
        return layer

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        tp_group: dist.ProcessGroup | None,
        *,
        causal: bool = True,
        sequence_parallel: bool = False,
        overlap_comm: bool = False,
    ) -> ParallelSelfAttention:
        """Shard a batch-first ``nn.MultiheadAttention`` used as self-attention.

        ``mha(x, x, x, attn_mask=<causal mask if causal>, need_weights=False)[0]`` equals the
        result's ``forward(x)``. No rotary embeddings (MHA has none). Unsupported MHA options
        (``batch_first=False``, separate ``kdim``/``vdim``, ``add_bias_kv``, ``add_zero_attn``,
        dropout) raise a ``ValueError``.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha expects an nn.MultiheadAttention, got {type(mha).__name__}")
        unsupported = {
            "batch_first=False": not mha.batch_first,
            "kdim/vdim != embed_dim": not mha._qkv_same_embed_dim,
            "add_bias_kv": mha.bias_k is not None,
            "add_zero_attn": mha.add_zero_attn,
            f"dropout={mha.dropout}": mha.dropout > 0,
        }
        if any(unsupported.values()):
            names = [k for k, v in unsupported.items() if v]
            raise ValueError(f"ParallelSelfAttention.from_mha does not support {names}")
        e, h = mha.embed_dim, mha.num_heads
        d = e // h
        w = mha.in_proj_weight
        layer = cls(e, h, h, tp_group=tp_group, causal=causal, bias=mha.in_proj_bias is not None,
                    sequence_parallel=sequence_parallel, overlap_comm=overlap_comm, rope=False,
                    device="meta", dtype=w.dtype)  # fmt: skip
        layer = layer.to_empty(device=w.device)

        def grouped(t: torch.Tensor) -> torch.Tensor:
            # [Wq; Wk; Wv] (3 h d, ...) -> per head [q_h; k_h; v_h] (h 3 d, ...)
            return rearrange(t, "(s h d) ... -> (h s d) ...", s=3, h=h, d=d)

        in_b = mha.in_proj_bias
        layer._load_full(
            grouped(w),
            None if in_b is None else grouped(in_b),
            mha.out_proj.weight,
            mha.out_proj.bias,
        )
        return layer

    @torch.no_grad()
    def _load_full(self, qkv_w, qkv_b, proj_w, proj_b) -> None:
        """Copy this rank's shards of full single-device weights (fused QKV in grouped layout)."""
        tp, rank = self.qkv.tp_size, self.qkv.tp_rank
        copy_shard_(self.qkv.weight, qkv_w, tp, rank, dim=0)
        copy_shard_(self.proj.weight, proj_w, tp, rank, dim=1)
        if qkv_b is not None:
            copy_shard_(self.qkv.bias, qkv_b, tp, rank, dim=0)
            copy_shard_(self.proj.bias, proj_b, 1, 0, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, E) -> (B, S, E)``; ``(B, S/p, E) -> (B, S/p, E)`` with sequence parallelism."""
        check_width(x, self.embed_dim, type(self).__name__)
        if x.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: expected input (B, S, E), got shape {tuple(x.shape)}"
            )
        r = self.num_heads // self.num_kv_heads  # query heads per kv head
        qkv = self.qkv(x)  # (B, S, G (r + 2) D), G = Hkv / p groups on this rank
        qkv = rearrange(qkv, "b s (g m d) -> b g m s d", m=r + 2, d=self.head_dim)
        q = rearrange(qkv[:, :, :r], "b g r s d -> b (g r) s d")  # (B, Hq/p, S, D)
        # (B, Hkv/p, S, D); v copied out of qkv (q and k are new tensors after RoPE), so the
        # attention saves v alone, not a view keeping the whole fused (B, S, 3E/p) output alive
        k, v = qkv[:, :, r], qkv[:, :, r + 1].contiguous()
        if self.rope:
            q, k = apply_rotary_qk(q, k, self.rope_base)
        # (B, Hq/p, S, D), stored as (B, S, Hq/p, D): merging the heads is a view, nothing is
        # copied (nor saved twice for the backward)
        out = flash_attention(q, k, v, causal=self.causal)
        out = rearrange(out, "b h s d -> b s (h d)")
        return self.proj(out)  # (B, S, E), or (B, S/p, E) with sequence parallelism

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads} "
            f"({self.num_heads_per_partition} per rank), num_kv_heads={self.num_kv_heads} "
            f"({self.num_kv_heads_per_partition} per rank), head_dim={self.head_dim}, "
            f"causal={self.causal}, rope={self.rope}"
        )
