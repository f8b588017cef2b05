"""Layers of known cost, for measuring schedules rather than kernels.

:class:`TimedLayer` maps ``(*, E) -> (*, E)`` by an elementwise scale ``y = x * w`` and spends a
fixed wall time in each pass: ``forward_s`` in the forward, ``input_grad_s`` computing ``dX`` and
``weight_grad_s`` computing ``dW``. The waiting is a sleep, not arithmetic, so ``p`` such stages
in ``p`` processes take their nominal time even on a machine with fewer cores than processes: the
pipeline's idle time, not CPU contention, is what a measurement of these stages shows.
Under :func:`~.weight_grad.split_weight_grad` its ``dW`` part (sleep and all) is deferred like a
parallel linear layer's, so zero-bubble schedules move it into ``W``.

The numbers are real (gradients are exact), so a pipeline of these layers can also be checked
against one device. ``busy_s`` accumulates the time actually spent in the passes, so a bubble
fraction can be measured from outside any schedule (``1 - busy / (p * step time)``), for this
package's schedules and others' alike. (A schedule that splits the backward by calling autograd
twice, as ``torch.distributed.pipelining``'s zero-bubble ones do, runs this layer's whole backward
in both calls: compare those on real layers.)
"""

from __future__ import annotations

import time

import torch
from torch import nn

from triton_parallel_layers.parallel_layers.weight_grad import defer_weight_grad, splitting

__all__ = ["TimedLayer"]


def _sleep(layer: TimedLayer, seconds: float) -> None:
    if seconds > 0:
        start = time.perf_counter()
        time.sleep(seconds)
        layer.busy_s += time.perf_counter() - start


class _TimedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, layer: TimedLayer, split: bool):
        _sleep(layer, layer.forward_s)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.split = layer, split
        return x * weight  # (*, E) * (E,)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        _sleep(layer, layer.input_grad_s)
        dx = dy * weight

        def weight_grad() -> torch.Tensor:
            _sleep(layer, layer.weight_grad_s)
            return (dy * x).reshape(-1, x.shape[-1]).sum(0)  # (E,)

        def deferred() -> None:
            g = weight_grad()
            if layer.weight.grad is None:
                layer.weight.grad = g
            else:
                layer.weight.grad.add_(g)

        if ctx.split and defer_weight_grad(deferred, x, dy):
            return dx, None, None, None
        return dx, weight_grad(), None, None


class TimedLayer(nn.Module):
    """``y = x * w`` over the last dim ``E``, taking ``forward_s`` / ``input_grad_s`` /
    ``weight_grad_s`` seconds for its forward / ``dX`` / ``dW`` (see the module docstring)."""

    def __init__(
        self,
        width: int,
        forward_s: float = 0.01,
        input_grad_s: float = 0.01,
        weight_grad_s: float = 0.01,
    ) -> None:
        super().__init__()
        self.forward_s, self.input_grad_s, self.weight_grad_s = (
            forward_s,
            input_grad_s,
            weight_grad_s,
        )
        self.weight = nn.Parameter(1.0 + 0.01 * torch.randn(width))
        self.busy_s = 0.0
        """Wall time spent in the passes so far (what a bubble measurement counts as busy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TimedScale.apply(x, self.weight, self, splitting())

    def extra_repr(self) -> str:
        return (
            f"width={self.weight.numel()}, forward={self.forward_s * 1e3:g} ms, "
            f"dX={self.input_grad_s * 1e3:g} ms, dW={self.weight_grad_s * 1e3:g} ms"
        )
