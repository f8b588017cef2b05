"""Helpers shared by the test files (importable from the worker processes too)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from triton_parallel_layers.kernels import interpreter_enabled

# For multi-process tests that run a Triton kernel on CPU tensors (the workers are CPU processes).
needs_interpreter = pytest.mark.skipif(
    not interpreter_enabled(),
    reason="runs a Triton kernel on CPU tensors: needs TRITON_INTERPRET=1 (set by conftest where "
    "there is no CUDA)",
)

# Tolerances for comparing a parallel layer against the single-device module, per dtype, where a
# reduction crosses ranks (partial sums added in another order). Where none does, tests use
# ``exact=True``.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, exact: bool = False, what: str = ""
):
    """Compare ``actual`` with ``expected``: bit for bit if ``exact``, else within ``TOLERANCES``."""
    if exact:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
        if not torch.equal(actual, expected):
            diff = (actual.float() - expected.float()).abs().max().item()
            raise AssertionError(f"{what}: not bit-exact, max abs diff {diff:g}")
        return
    torch.testing.assert_close(
        actual, expected, **TOLERANCES[expected.dtype], msg=lambda m: f"{what}: {m}"
    )


def assert_close_lowp(
    actual: torch.Tensor, expected: torch.Tensor, truth: torch.Tensor, *, what: str = ""
) -> None:
    """The low-precision rule (DESIGN.md, Numerics): against the fp32 (or fp64) ``truth`` computed
    from the same inputs, ``actual``'s error is at most twice the error of ``expected`` (the
    single-device module in the same dtype) plus a small ``atol``. In fp32 that needs an fp64
    ``truth``; against an fp32 one it falls back to :func:`assert_close`."""
    if expected.dtype == torch.float32 and truth.dtype != torch.float64:
        assert_close(actual, expected, what=what)
        return
    truth_dtype = "fp64" if truth.dtype == torch.float64 else "fp32"
    truth = truth.double()
    ours = (actual.double() - truth).abs().max().item()
    theirs = (expected.double() - truth).abs().max().item()
    atol = TOLERANCES[expected.dtype]["atol"] * max(1.0, truth.abs().max().item())
    assert ours <= 2 * theirs + atol, (
        f"{what}: max error {ours:.3g} against {truth_dtype} exceeds 2 x the single-device error "
        f"{theirs:.3g} + {atol:.3g}"
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error ``max|a - e| / max|e|`` (the plain difference when ``e`` is zero)."""
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff / scale if scale > 0 else diff


def seeded(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on the default device (the CPU on gloo; the rank's GPU
    under ``TPL_TEST_BACKEND=nccl``), for ``torch.randn(..., generator=seeded(s))``."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def device_type() -> str:
    """The default device's type (``"cpu"`` or ``"cuda"``), e.g. for ``torch.autocast``."""
    return torch.get_default_device().type


def chunk(t: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's contiguous chunk of ``t`` along ``dim`` in ``group`` (default: the world)."""
    p = dist.get_world_size(group)
    return t.chunk(p, dim)[dist.get_rank(group)].contiguous()


def expect_error(exc_type: type[BaseException], match: str, fn, *args, **kwargs) -> str:
    """Call ``fn`` and return the message of the ``exc_type`` it must raise, matching ``match``."""
    import re

    try:
        fn(*args, **kwargs)
    except exc_type as e:
        if not re.search(match, str(e)):
            raise AssertionError(
                f"{exc_type.__name__} raised, but {str(e)!r} lacks {match!r}"
            ) from e
        return str(e)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {exc_type.__name__}")


def checkpoint_tensors(ckpt, tmp) -> dict[str, torch.Tensor]:
    """The model and optimizer tensors of the DCP checkpoint folder ``ckpt`` (converted to one
    ``torch.save`` file in the folder ``tmp``), by their layout-free names."""
    from pathlib import Path

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt, tmp = Path(ckpt), Path(tmp)
    dcp_to_torch_save(ckpt, tmp / f"{ckpt.name}.pt")
    state = torch.load(tmp / f"{ckpt.name}.pt", weights_only=False)
    return {k: v for k, v in state.items() if k.startswith(("model/", "optim/"))}
