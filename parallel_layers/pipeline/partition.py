"""Split a model's layer sequence into pipeline stages.

A model exposes its layers as an ordered list whose sequential composition maps the model input to
the logits (``model.pipeline_layers()``: embedding first, output head last). A partition cuts that
list into ``S`` contiguous slices, one per (virtual) stage: so the embedding always lands on the
first stage and the head (where the loss is computed) on the last.

How the cut is chosen (``method``):

* ``"params"``: balance the parameter count of the slices (no input needed);
* ``"flops"``: balance forward FLOPs, counted by ``torch.utils.flop_counter`` on ``sample_input``
  (backward FLOPs are about twice the forward's, layer by layer, so the balance carries over);
* ``"time"``: balance measured forward+backward time on ``sample_input``; with ``group`` the
  times are averaged over its ranks first, so every rank picks the same cut;
* a list of ints: the number of layers of each stage, as given.

The balanced cut minimizes the largest slice cost (the pipeline's bottleneck), breaking ties by
the smallest sum of squared slice costs, by dynamic programming over the cut points (exact, and
cheap for the few hundred layers of a model). :meth:`Partition.report` prints the result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from triton_parallel_layers.parallel_layers.utils import check_positive_int

__all__ = ["Partition", "layer_costs", "partition_layers"]

METHODS = ("params", "flops", "time")


@dataclass(frozen=True)
class Partition:
    """A cut of ``num_layers`` layers into ``num_stages`` contiguous slices.

    ``bounds[s]`` is ``(start, stop)``: stage ``s`` holds layers ``start <= j < stop``.
    Virtual stage ``s`` runs on pipeline rank ``s % pp`` as its chunk ``s // pp``.
    """

    bounds: tuple[tuple[int, int], ...]
    costs: tuple[float, ...]
    """Each stage's cost under ``method`` (layer counts for an explicit list)."""
    method: str
    layer_names: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    @property
    def num_layers(self) -> int:
        return self.bounds[-1][1]

    def stage_of(self, layer: int) -> int:
        """The stage holding layer ``layer``."""
        for s, (a, b) in enumerate(self.bounds):
            if a <= layer < b:
                return s
        raise IndexError(f"layer {layer} is outside 0..{self.num_layers - 1}")

    @property
    def imbalance(self) -> float:
        """Largest stage cost over the mean stage cost (1.0 is perfect balance)."""
        mean = sum(self.costs) / len(self.costs)
        return max(self.costs) / mean if mean > 0 else 1.0

    def report(self, pp: int | None = None) -> str:
        """A table of the stages: rank/chunk (given ``pp``), layer range and names, cost."""
        total = sum(self.costs) or 1.0
        lines = [
            f"partition of {self.num_layers} layers into {self.num_stages} stages by "
            f"{self.method} (max/mean {self.imbalance:.3f})"
        ]
        for s, ((a, b), cost) in enumerate(zip(self.bounds, self.costs)):
            where = f"rank {s % pp} chunk {s // pp}  " if pp else ""
            names = ""
            if self.layer_names:
                shown = list(self.layer_names[a:b])
                names = ", ".join(shown if len(shown) <= 4 else [*shown[:2], "..", shown[-1]])
            lines.append(
                f"  stage {s:>2}  {where}layers [{a:>3}, {b:>3})  cost {cost:>12.4g} "
                f"({100 * cost / total:5.1f}%)  {names}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def _layer_params(layer: nn.Module) -> float:
    return float(sum(p.numel() for p in layer.parameters()))


def _detach_like(y):
    return y.detach() if isinstance(y, torch.Tensor) else y


def layer_costs(
    layers: Sequence[nn.Module],
    method: str = "params",
    *,
    sample_input: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    repeats: int = 3,
) -> list[float]:
    """Each layer's cost under ``method`` (``"params"``, ``"flops"`` or ``"time"``).

    ``"flops"`` and ``"time"`` run ``sample_input`` (a microbatch, shaped as the model input)
    through the layers in order. ``"time"`` is the median of ``repeats`` forward+backward runs per
    layer, averaged over ``group`` when given (a collective: every rank of ``group`` calls this);
    it leaves the layers' ``.grad`` cleared.
    """
    if method == "params":
        return [_layer_params(layer) for layer in layers]
    if sample_input is None:
        raise ValueError(f"method={method!r} needs a sample_input (a microbatch of model input)")
    costs: list[float] = []
    x = sample_input
    if method == "flops":
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad():
            for layer in layers:
                with FlopCounterMode(display=False) as counter:
                    x = layer(x)
                costs.append(float(counter.get_total_flops()))
        return costs
    if method != "time":
        raise ValueError(f"method={method!r}: expected one of {METHODS} or a list of layer counts")
    for layer in layers:
        samples = []
        for _ in range(max(1, repeats)):
            inp = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            y = layer(inp)
            if y.requires_grad:
                y.float().sum().backward()
            samples.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        costs.append(sorted(samples)[len(samples) // 2])
        x = _detach_like(y)
    if group is not None and dist.get_world_size(group) > 1:
        # On the group's own device: NCCL reduces CUDA tensors only.
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        t = torch.tensor(costs, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        costs = (t / dist.get_world_size(group)).tolist()
    return costs


def balanced_bounds(costs: Sequence[float], k: int) -> list[tuple[int, int]]:
    """Contiguous cut of ``costs`` into ``k`` non-empty slices minimizing (max, sum of squares)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))
    # best[j][i]: (max, sumsq) of the best cut of the first i layers into j slices
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0.0, 0.0)
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for h in range(j - 1, i):
                prev = best[j - 1][h]
                if prev == inf:
                    continue
                c = prefix[i] - prefix[h]
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[j][i]:
                    best[j][i], arg[j][i] = cand, h
    bounds, i = [], n
    for j in range(k, 0, -1):
        h = arg[j][i]
        bounds.append((h, i))
        i = h
    return bounds[::-1]


def partition_layers(
    layers: Sequence[nn.Module],
    num_stages: int,
    method: str | Sequence[int] = "params",
    *,
    sample_input: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Partition:
    """Cut ``layers`` into ``num_stages`` contiguous slices (see the module docstring).

    Args:
        layers: the model's layer sequence (``model.pipeline_layers()``).
        num_stages: ``pp``, or ``pp * v`` for ``v`` chunks per rank (interleaved schedules).
        method: ``"params"``, ``"flops"``, ``"time"``, or the layer count of each stage.
        sample_input: a microbatch of model input, for ``"flops"`` and ``"time"``.
        group: for ``"time"``, the ranks whose measurements are averaged (all must call).

    Raises:
        ValueError: fewer layers than stages, or an explicit list that does not fit; raised on
            every rank alike (these checks use only the arguments) before any measurement.
    """
    check_positive_int("num_stages", num_stages)
    layers = list(layers)
    n = len(layers)
    if n < num_stages:
        raise ValueError(
            f"{n} layers cannot fill {num_stages} pipeline stages: each stage needs at least "
            f"one layer; use at most {n} stages (pp * chunks) or a model with more layers"
        )
    names = tuple(type(layer).__name__ for layer in layers)
    if not isinstance(method, str):
        counts = list(method)
        if len(counts) != num_stages or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts
        ):
            raise ValueError(
                f"method={counts!r}: expected {num_stages} positive layer counts, one per stage"
            )
        if sum(counts) != n:
            raise ValueError(
                f"method={counts!r}: the layer counts sum to {sum(counts)}, expected {n} (the "
                "number of layers)"
            )
        bounds, start = [], 0
        for c in counts:
            bounds.append((start, start + c))
            start += c
        return Partition(tuple(bounds), tuple(float(c) for c in counts), "explicit", names)
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS} or a list of layer counts")
    costs = layer_costs(layers, method, sample_input=sample_input, group=group)
    bounds = balanced_bounds(costs, num_stages)
    stage_costs = tuple(float(sum(costs[a:b])) for a, b in bounds)
    return Partition(tuple(bounds), stage_costs, method, names)
