"""Initialization by name: the same values at every TP size and pipeline split, meta builds
included.

A model's parameters are drawn from ``(seed, parameter name)`` alone (:func:`init_by_name_`), so a
model built on ``meta``, parallelized, split into stages and materialized with ``to_empty`` holds
exactly the shards of the single-device model initialized with the same seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from triton_parallel_layers.parallel_layers.sharding import (
    local_shard,
    param_blocks,
    param_sharding,
)

__all__ = ["InitFn", "draw_seed", "init_by_name_", "name_seed"]

InitFn = Callable[[str, nn.Module, torch.Size, torch.Generator], torch.Tensor]


def draw_seed(seed: int | None = None) -> int:
    """``seed``, or a fresh one drawn from the global CPU generator (so ``torch.manual_seed``
    fixes it, also inside ``with torch.device("meta")``): a model's init seed."""
    return int(torch.randint(0, 2**62, (), device="cpu")) if seed is None else seed


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, name)`` (SHA-256: stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_by_name_(model: nn.Module, seed: int, init_fn: InitFn, *, skip_meta: bool = False) -> None:
    """Initialize every parameter from ``(seed, its qualified name)`` alone, keeping local shards.

    For each parameter (a tied one once, under its first name) this draws the *full*,
    single-device tensor on the CPU with a generator seeded by ``name_seed(seed, name)``::

        full = init_fn(name, module, full_shape, generator)      # CPU, full_shape

    and copies this rank's shard of it (:func:`param_sharding`) into the parameter. The values
    therefore depend on neither the TP degree nor the construction order nor what was built
    before: a model parallelized on ``meta``, materialized with ``to_empty`` and initialized here
    holds exactly the shards of the single-device model initialized here with the same seed. Only
    one full tensor exists at a time, on the CPU.

    Args:
        model: the single-device or parallelized model (no ``meta`` parameters left).
        seed: the model's seed.
        init_fn: ``(name, module, full_shape, generator) -> tensor`` of ``full_shape``, drawn only
            from ``generator``; ``module`` is the (possibly parallel) module owning the parameter.
        skip_meta: leave parameters still on ``meta`` alone (a model materialized in part: a
            pipeline rank's stages); otherwise they raise ``ValueError``.
    """
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.is_meta and skip_meta:
                continue
            if param.is_meta:
                raise ValueError(
                    f"init_by_name_: {mname}.{pname} is still on the meta device; call "
                    "model.to_empty(device=...) first"
                )
            name = f"{mname}.{pname}" if mname else pname
            dim, parts, rank = param_sharding(module, pname)
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= parts
            gen = torch.Generator().manual_seed(name_seed(seed, name))
            full = init_fn(name, module, torch.Size(shape), gen)
            if tuple(full.shape) != tuple(shape):
                raise ValueError(
                    f"init_fn returned shape {tuple(full.shape)} for {name}, expected {tuple(shape)}"
                )
            local = local_shard(full, dim, parts, rank, param_blocks(module))
            param.copy_(local)
