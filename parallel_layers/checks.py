"""Checks on tensor *values* (token ids, targets) without a host-device sync.

A check on a shape, size or dtype costs nothing: the host knows them. A check on the values of a
tensor does not: reading ``int(ids.max())`` on a GPU waits for every kernel queued before it, on
every microbatch, which stalls the launch queue, forbids CUDA graphs and breaks a
``torch.compile`` graph in two. So value checks here come in two modes:

* **Default: a device-side assert** (``torch._assert_async``). Nothing waits; a bad value stops
  the program where the device runs the check: on CUDA a device-side assert (reported at the
  next synchronizing call, and fatal to the CUDA context, as any out-of-range index is), on CPU a
  ``RuntimeError`` carrying the check's message. Under ``torch.compile`` it is one graph node.
* **Opt-in: an eager ``ValueError``** naming the offending value, read back to the host. Switch it
  on for a whole run with the environment variable ``TPL_DEBUG_CHECKS=1`` (read at every check) or
  for a block with :func:`debug_checks`, which takes precedence::

      with debug_checks():
          model(ids)          # ValueError: GPT: token id 97 is outside the vocabulary [0, 97) ...

  Every rank of a TP group holds the same ids and targets (they are replicated), so every rank
  reaches the same verdict before any collective, as the shape checks do. Inside a function being
  compiled the device-side assert is used whatever the switch says (the eager check would need
  the very sync and graph break it exists to avoid).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["DEBUG_CHECKS_ENV", "check_values", "debug_checks", "debug_checks_enabled"]

DEBUG_CHECKS_ENV = "TPL_DEBUG_CHECKS"
_ON = ("1", "true", "yes", "on")
_forced: list[bool] = []  # stack of debug_checks() overrides, innermost last


def debug_checks_enabled() -> bool:
    """Whether value checks raise an eager ``ValueError``: the innermost :func:`debug_checks`,
    else ``$TPL_DEBUG_CHECKS`` (``1``/``true``/``yes``/``on``); off by default."""
    if _forced:
        return _forced[-1]
    return os.environ.get(DEBUG_CHECKS_ENV, "0").strip().lower() in _ON


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Inside the ``with`` block, value checks raise an eager ``ValueError`` (``enabled=True``,
    one host-device sync per check) or are device-side asserts (``enabled=False``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"debug_checks(enabled={enabled!r}): expected a bool")
    _forced.append(enabled)
    try:
        yield
    finally:
        _forced.pop()


def check_values(ok: torch.Tensor, message: str, explain: Callable[[], str] | None = None) -> None:
    """Check that the 0-dim bool tensor ``ok`` is true, without a sync unless debugging.

    Args:
        ok: ``()`` bool, computed on the device from the values checked (``(x < n).all()``).
        message: what is wrong, without values (a device-side assert carries a fixed string).
        explain: builds the eager ``ValueError``'s message naming the offending values; called
            only once the eager check has found ``ok`` false (it may read tensors back: the sync
            has happened anyway). Default: ``message``.

    Raises:
        ValueError: when debug checks are on and ``ok`` is false.
        RuntimeError: on CPU, from the device-side assert, when ``ok`` is false (on CUDA the
            assert fires on the device, asynchronously).
    """
    if not torch.compiler.is_compiling() and debug_checks_enabled():
        if not bool(ok):
            raise ValueError(explain() if explain is not None else message)
        return
    torch._assert_async(ok, message)
