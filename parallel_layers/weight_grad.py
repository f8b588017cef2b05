"""Deferred weight gradients: the backward split zero-bubble schedules need.

A linear layer's backward is two matmuls that need different things::

    dX = dY W          (*, out) @ (out, in) -> (*, in)   the previous stage waits for this
    dW = dY^T X        (out, *) @ (*, in)   -> (out, in) nobody waits for this until the optimizer

Zero-bubble schedules (ZB-H1) run the first at ``B`` time and the second later, at ``W`` time,
in what would otherwise be pipeline bubble. Autograd computes both in one node, so the layers
opt in through :func:`deferrable_linear`, which is ``F.linear`` except under
:func:`split_weight_grad` (active during the forward), where the matmul runs through an autograd
Function whose backward computes ``dX`` and, if a :class:`WeightGradStore` is capturing (during the
backward), hands ``dW``/``db`` to the store instead of computing them. ``store.flush()`` (the
``W`` pass) then computes them and adds them to ``weight.grad``/``bias.grad``. With no store
capturing, the Function computes everything at once, so a model run under ``split_weight_grad``
outside a pipeline still trains correctly.

The layers that communicate (the column-parallel linear's gathers and input-gradient all-reduce)
go through the same Function with their :class:`~triton_parallel_layers.kernels.collective_matmul.
LinearComm` ops: ``B`` computes (and communicates) the input gradient; the deferred ``W`` work
computes the weight gradient, and for a sequence-parallel gather it all-gathers the saved input
shard again there. Holding the shard rather than gathering at ``B`` time keeps the store's
memory at ``1/tp`` of the input between ``B`` and ``W``; the gather costs the same bytes either
way, and every rank of the TP group runs its ``W`` passes at the same point of the same schedule.

Other parameters (norms, embeddings, convolutions) keep their gradients in the ``B`` pass: correct,
just not deferred. :func:`defer_weight_grad` lets any custom Function join in the same way.

The state is two module-level stacks (like :func:`triton_parallel_layers.kernels.collectives.record_comm`'s ledgers, and
unlike a thread-local, visible to autograd's device threads); no process group is kept here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from triton_parallel_layers.kernels._dispatch import autocast_inputs, autocast_off
from triton_parallel_layers.kernels.collective_matmul import LinearComm

__all__ = [
    "WeightGradStore",
    "defer_weight_grad",
    "deferrable_linear",
    "split_weight_grad",
    "splitting",
]

_split_depth = 0  # > 0: deferrable layers record their matmul for a split backward
_stores: list[WeightGradStore] = []  # the innermost capturing store gets deferred work


@contextlib.contextmanager
def split_weight_grad() -> Iterator[None]:
    """Forward-time switch: inside, :func:`deferrable_linear` records its matmul so that its
    backward can leave the weight gradient to a :class:`WeightGradStore`."""
    global _split_depth
    _split_depth += 1
    try:
        yield
    finally:
        _split_depth -= 1


def splitting() -> bool:
    """Whether a :func:`split_weight_grad` block is active (layers decide at forward time)."""
    return _split_depth > 0


class WeightGradStore:
    """A queue of deferred weight-gradient computations (one per microbatch and chunk).

    Example::

        store = WeightGradStore()
        with split_weight_grad():
            y = layer(x)                    # layer uses deferrable_linear
        with store.capture():
            y.backward(dy)                  # x.grad now; layer.weight.grad still untouched
        store.flush()                       # layer.weight.grad += dY^T X
    """

    def __init__(self) -> None:
        self._work: list[Callable[[], None]] = []
        self.held_bytes = 0
        """Bytes of the tensors the queued computations keep alive (for memory accounting)."""

    @contextlib.contextmanager
    def capture(self) -> Iterator[WeightGradStore]:
        """Backward-time: deferred work inside the ``with`` block goes to this store."""
        _stores.append(self)
        try:
            yield self
        finally:
            _stores.remove(self)

    def put(self, fn: Callable[[], None], *held: torch.Tensor) -> None:
        """Queue ``fn``; ``held`` are the tensors it keeps alive until it runs."""
        self._work.append(fn)
        self.held_bytes += sum(t.numel() * t.element_size() for t in held)

    def flush(self) -> int:
        """Run the queued computations in order (the ``W`` pass); return how many ran."""
        work, self._work = self._work, []
        self.held_bytes = 0
        with torch.no_grad():
            for fn in work:
                fn()
        return len(work)

    def __len__(self) -> int:
        return len(self._work)


def defer_weight_grad(fn: Callable[[], None], *held: torch.Tensor) -> bool:
    """Queue ``fn`` (which keeps the tensors ``held`` alive) in the capturing store and return
    ``True``; with none capturing, return ``False`` (the caller computes its weight gradient
    now)."""
    if not _stores:
        return False
    _stores[-1].put(fn, *held)
    return True


@torch.no_grad()
def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` as autograd's AccumulateGrad would (creating it if absent)."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def _local_linear_bwd(grad_out, x, weight, needs):
    """The backward of ``F.linear`` by pieces (the :class:`LinearComm` signature, no group)."""
    need_x, need_w, need_b = needs
    dx = grad_out.matmul(weight) if need_x else None  # (*, out) @ (out, in) -> (*, in)
    g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    dw = g.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None  # (out, in)
    db = g.sum(0) if need_b else None  # (out,); fp32 accumulation as autograd's
    return dx, dw, db


LOCAL = LinearComm(F.linear, _local_linear_bwd)
"""A linear layer without communication, as a :class:`LinearComm`."""


class _DeferrableLinear(torch.autograd.Function):
    """``Y = X W^T + b`` (with ``comm``'s communication) whose backward can leave ``dW``, ``db``
    to a :class:`WeightGradStore`.

    Shapes: x ``(*, in)`` (a sequence shard for the gathers), weight ``(out, in)``, bias
    ``(out,)``, y ``(*, out)`` (the gathered sequence for the gathers).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, comm: LinearComm, args: tuple):
        ctx.params, ctx.comm, ctx.args = (weight, bias), comm, args  # .grad goes to the leaves
        # Cast as F.linear does under autocast and save the cast tensors, so the backward
        # computes in those dtypes whether or not it runs under autocast.
        x, weight, bias = autocast_inputs(x, weight, bias)
        ctx.save_for_backward(x, weight)  # x: the input shard for the gathers
        with autocast_off(x):
            return comm.forward(x, weight, bias, *args)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        weight_param, bias_param = ctx.params
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        def grads(*needs: bool) -> tuple:
            out = ctx.comm.backward(dy, x, weight, *ctx.args, list(needs))
            return tuple(g if need else None for g, need in zip(out, needs))

        def deferred() -> None:
            # a gather's weight gradient gathers the saved shard again here, at W time: the
            # store holds the shard (1/p of the input) between B and W, not the whole input
            _, dw, db = grads(False, need_w, need_b)
            if dw is not None:
                _accumulate(weight_param, dw)
            if db is not None:
                _accumulate(bias_param, db)

        if (need_w or need_b) and defer_weight_grad(deferred, x, dy):
            return grads(need_x, False, False)[0], None, None, None, None
        return *grads(need_x, need_w, need_b), None, None


def deferrable_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    comm: LinearComm | None = None,
    *args,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, or ``comm.forward(x, weight, bias, *args)`` (a linear with
    communication, see :class:`~triton_parallel_layers.kernels.collective_matmul.LinearComm`);
    under :func:`split_weight_grad` its weight gradient can be deferred to a
    :class:`WeightGradStore` (see the module docstring).

    Shapes: x ``(*, in)``, weight ``(out, in)``, bias ``(out,)`` -> ``(*, out)`` (the gathers:
    x a sequence shard, the output the whole sequence).
    """
    needs_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    if _split_depth and needs_grad and torch.is_grad_enabled():
        return _DeferrableLinear.apply(x, weight, bias, comm or LOCAL, args)
    if comm is None:
        return F.linear(x, weight, bias)
    return comm.forward(*autocast_inputs(x, weight, bias), *args)
