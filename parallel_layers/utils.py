"""Small helpers shared by the parallel layers: size checks and shard copies."""

from __future__ import annotations

import torch


def check_positive_int(name: str, value: object) -> None:
    """A ``TypeError`` unless ``value`` is an int (not a bool), a ``ValueError`` unless it is >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected a positive int")
    if value < 1:
        raise ValueError(f"{name}={value}: expected a positive int")


def divide(size: int, parts: int, what: str) -> int:
    """``size // parts``, or a ``ValueError`` naming ``what`` when ``parts`` does not divide it."""
    if size % parts:
        raise ValueError(
            f"{what}={size} is not divisible by the tensor-parallel size {parts}: choose a "
            f"multiple of {parts} (or another tp)"
        )
    return size // parts


def shard(full: torch.Tensor, parts: int, rank: int, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of ``full`` along ``dim`` (the Megatron/DTensor convention)."""
    return full.chunk(parts, dim)[rank]


def check_width(x: torch.Tensor, expected: int, what: str) -> None:
    """Raise a ``ValueError`` when the last dim of ``x`` is not ``expected``."""
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(
            f"{what}: input of shape {tuple(x.shape)} has last dim "
            f"{x.shape[-1] if x.dim() else None}, expected {expected}"
        )


def check_sequence_divisible(x: torch.Tensor, parts: int, what: str) -> None:
    """Sequence parallelism shards dim -2; raise a ``ValueError`` when ``parts`` does not divide it."""
    if x.dim() < 2:
        raise ValueError(
            f"{what}: sequence parallelism needs an input of at least 2 dims (..., S, E), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-2] % parts:
        raise ValueError(
            f"{what}: sequence length {x.shape[-2]} (dim -2 of shape {tuple(x.shape)}) is not "
            f"divisible by the tensor-parallel size {parts}"
        )


@torch.no_grad()
def copy_shard_(dst: torch.Tensor, full: torch.Tensor, parts: int, rank: int, dim: int) -> None:
    """Copy this rank's chunk of ``full`` into ``dst`` (skipped for ``meta`` tensors)."""
    if dst.is_meta:
        return
    dst.copy_(shard(full, parts, rank, dim))
