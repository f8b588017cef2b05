"""No host-device sync in a forward or backward of the models and layers (DESIGN.md).

A sync is any read of a tensor's value back to Python: ``.item()``, ``bool(t)`` (an ``if`` on a
tensor), ``int(t)``, ``float(t)``, ``t.tolist()``, or an op whose output shape depends on the
values (``nonzero``, boolean-mask indexing). :func:`forbid_host_sync` makes every one of them raise
while a step runs, so a value check that reads back (the token-id and target range checks used to)
fails these tests. The range checks themselves still work: a device-side assert by default, an
eager ``ValueError`` under ``debug_checks`` (tests/test_embedding.py, test_gpt.py,
test_cross_entropy.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from triton_parallel_layers.models.cnn import CNNConfig, ResNetCNN
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig
from triton_parallel_layers.parallel_layers import ParallelDims, parallelize
from triton_parallel_layers.parallel_layers.checks import DEBUG_CHECKS_ENV, debug_checks
from triton_parallel_layers.parallel_layers.embedding import check_token_ids

GPT_CONFIG = dict(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, embed_dim=64, max_seq_len=16,
                  vocab_pad_multiple=8)  # fmt: skip


class HostSyncError(AssertionError):
    """A tensor's value was read back to the host inside :func:`forbid_host_sync`."""


# Tensor methods that hand a value to Python (or whose output shape depends on the values).
_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make every tensor-to-Python conversion (and ``nonzero``) raise :class:`HostSyncError`."""
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING}

    def forbidden(name: str):
        def raise_(*args, **kwargs):
            raise HostSyncError(f"host-device sync: Tensor.{name} called in a forward/backward")

        return raise_

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _gpt_step(model: GPT, ids: torch.Tensor, target: torch.Tensor) -> None:
    with forbid_host_sync():
        loss = model.loss(model(ids), target)
        loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
    )


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=gen)
    target = torch.randint(0, vocab, (2, 16), generator=gen)
    target[0, :3] = -100  # ignored targets take the same sync-free path
    return ids, target


def test_the_guard_catches_every_kind_of_sync():
    """The guard itself: each conversion raises inside it and works again after it."""
    t = torch.tensor([1.0, 0.0])
    reads = {
        "item": lambda: t[0].item(),
        "bool": lambda: bool(t[0]),
        "if": lambda: 1 if t[0] else 0,
        "int": lambda: int(t[0]),
        "float": lambda: float(t[0]),
        "index": lambda: [0, 1][t.long()[0]],
        "tolist": lambda: t.tolist(),
        "nonzero": lambda: t.nonzero(),
    }
    method = {"bool": "__bool__", "if": "__bool__", "int": "__int__", "float": "__float__",
               "index": "__index__"}  # fmt: skip
    for name, read in reads.items():
        with forbid_host_sync(), pytest.raises(HostSyncError, match=method.get(name, name)):
            read()
        read()  # restored
    model = GPT(GPTConfig(**GPT_CONFIG))
    ids, _ = _batch(97)
    with forbid_host_sync(), debug_checks(), pytest.raises(HostSyncError):
        model(ids)  # the opt-in eager range check reads the ids back: the guard sees it


def test_gpt_step_has_no_host_sync():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CONFIG))
    _gpt_step(model, *_batch(97))


def test_resnet_step_has_no_host_sync():
    torch.manual_seed(0)
    model = ResNetCNN(CNNConfig(width=4, num_stages=2, blocks_per_stage=1))
    x = torch.randn(3, 1, 8, 8)
    y = torch.tensor([1, 7, 3])
    with forbid_host_sync():
        loss = model.loss(model(x), y)
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _tp_sp_case() -> None:
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    model = parallelize(GPT(GPTConfig(**GPT_CONFIG)), GPT_TP_PLAN, dims, sequence_parallel=True)
    _gpt_step(model, *_batch(97))


def test_tp_sequence_parallel_gpt_step_has_no_host_sync(dist_run):
    dist_run(2, _tp_sp_case)


def test_value_check_modes(monkeypatch):
    """Device-side assert by default; an eager ValueError under TPL_DEBUG_CHECKS=1 or
    debug_checks(), the context manager taking precedence over the environment."""
    ids = torch.tensor([[3, 12]])
    monkeypatch.delenv(DEBUG_CHECKS_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"T: a token id is outside the vocabulary \[0, 12\)"):
        check_token_ids(ids, 12, "T")
    monkeypatch.setenv(DEBUG_CHECKS_ENV, "1")
    with pytest.raises(
        ValueError, match=r"T: token id 12 is outside .* \(ids range over \[3, 12\]\)"
    ):
        check_token_ids(ids, 12, "T")
    with debug_checks(False), pytest.raises(RuntimeError):
        check_token_ids(ids, 12, "T")
    check_token_ids(torch.tensor([[0, 11]]), 12, "T")  # in range: no error in either mode
    with pytest.raises(TypeError, match="expected a bool"), debug_checks("yes"):
        pass
