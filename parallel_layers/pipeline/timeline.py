"""Instrumentation of pipeline steps: per-rank timelines, the bubble fraction, renderings, and
activation memory.

A :class:`Timeline` is one rank's events in one step: compute (``F``, ``B``, ``W`` with microbatch
and chunk) and communication (``recv``: time blocked waiting for a message; ``send``: time spent
posting one). Times are seconds since the step began, which the executor marks right after a
barrier over the pipeline group, so the ranks' timelines share an origin without comparing clocks.

The measured bubble fraction of a step is the idle share of the pipeline's compute capacity::

    bubble = 1 - sum over ranks of compute time / (p * step time)

where the step time is the latest end of any rank's last event. For ``p`` equal stages it is
``(p - 1) / (m + p - 1)`` for GPipe and 1F1B (:mod:`.actions`), plus what communication adds.

:func:`render_ascii` draws timelines (measured, or simulated by :func:`.actions.simulate`) as text
for docs and logs, :func:`render_png` as a figure. :class:`ActivationMemoryTracker` measures the
bytes a rank holds for backward: the tensors autograd saves (each once, parameters excluded) plus what deferred weight-gradient passes keep.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from triton_parallel_layers.parallel_layers.data_parallel import local_tensor

__all__ = [
    "ActivationMemoryTracker",
    "Event",
    "Timeline",
    "bubble_fraction",
    "gather_timelines",
    "render_ascii",
    "render_png",
]

COMPUTE = ("F", "B", "W")


class _EventLike(Protocol):
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


@dataclass(frozen=True)
class Event:
    """One interval of one rank's step: ``kind`` in F/B/W/send/recv, seconds since step start."""

    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


@dataclass
class Timeline:
    """One rank's events in one step (see the module docstring)."""

    rank: int = 0
    events: list[Event] = field(default_factory=list)
    origin: float = field(default=0.0, repr=False)

    def begin(self) -> None:
        """Mark the step's start (the executor calls this right after a pipeline barrier)."""
        self.origin = time.perf_counter()
        self.events.clear()

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def add(self, kind: str, microbatch: int, chunk: int, start: float, end: float) -> None:
        self.events.append(Event(kind, microbatch, chunk, start, end))

    def compute(self) -> list[Event]:
        return [e for e in self.events if e.kind in COMPUTE]

    @property
    def busy(self) -> float:
        """Seconds spent in F/B/W."""
        return sum(e.end - e.start for e in self.compute())

    @property
    def comm_wait(self) -> float:
        """Seconds spent blocked in receives or posting sends."""
        return sum(e.end - e.start for e in self.events if e.kind not in COMPUTE)

    @property
    def end(self) -> float:
        return max((e.end for e in self.events), default=0.0)


def gather_timelines(timeline: Timeline, group: dist.ProcessGroup | None) -> list[Timeline]:
    """Every rank's timeline of the same step, in group rank order (a collective over ``group``)."""
    if group is None or dist.get_world_size(group) == 1:
        return [timeline]
    out: list[Timeline | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, timeline, group=group)
    return out  # type: ignore[return-value]


def bubble_fraction(timelines: Sequence[Timeline]) -> float:
    """Idle share of ``p x step time`` over the ranks' timelines of one step."""
    span = max(t.end for t in timelines)
    if span <= 0:
        return 0.0
    return 1.0 - sum(t.busy for t in timelines) / (len(timelines) * span)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _rows(timelines: Sequence) -> list[list[_EventLike]]:
    rows = []
    for t in timelines:
        events = t.compute() if isinstance(t, Timeline) else list(t)
        rows.append([e for e in events if e.kind in COMPUTE])
    return rows


def _label(e: _EventLike) -> str:
    return f"{e.kind}{e.microbatch}" + (f".{e.chunk}" if e.chunk else "")


def render_ascii(
    timelines: Sequence, *, unit: float | None = None, title: str = "", max_cells: int = 160
) -> str:
    """Draw per-rank compute events as text, one row per rank, one cell per ``unit`` of time.

    ``timelines``: :class:`Timeline` s, or per-rank lists of events with ``kind``, ``microbatch``,
    ``chunk``, ``start``, ``end`` (e.g. from :func:`.actions.simulate`). ``unit`` defaults to the
    shortest forward, made coarser if the row would exceed ``max_cells`` cells. A cell shows the action starting there (``F3``: forward of microbatch 3;
    ``B3.1``: backward of microbatch 3 on chunk 1); ``-`` continues it; ``.`` is idle.

    Example (1F1B, pp=2, m=4, simulated with ``B = 2F``)::

        rank 0 | F0 F1 .  .  B0 -  F2 B1 -  F3 B2 -  .  B3 -
        rank 1 | .  F0 B0 -  F1 B1 -  F2 B2 -  F3 B3 -  .  .
    """
    rows = _rows(timelines)
    events = [e for row in rows for e in row]
    if not events:
        return title
    origin = min(e.start for e in events)
    if unit is None:
        durations = sorted(e.end - e.start for e in events if e.kind == "F") or [1.0]
        unit = max(durations[0], 1e-9)
        span = max(e.end for e in events) - origin
        unit = max(unit, span / max_cells)
    width = max(len(_label(e)) for e in events) + 1
    ncells = max(round((e.end - origin) / unit) for e in events)
    lines = [title] if title else []
    for r, row in enumerate(rows):
        cells = ["."] * ncells
        for e in sorted(row, key=lambda e: e.start):
            a = round((e.start - origin) / unit)
            b = max(a + 1, round((e.end - origin) / unit))
            for c in range(a, min(b, ncells)):
                cells[c] = _label(e) if c == a else "-"
        lines.append(f"rank {r} | " + "".join(c.ljust(width) for c in cells).rstrip())
    return "\n".join(lines)


def render_png(timelines: Sequence, path: str, *, title: str = "") -> None:
    """Draw per-rank compute events as a Gantt chart (needs matplotlib): F blue, B orange,
    W green, darker for later chunks; labels are microbatch indices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(timelines)
    colors = {"F": (0.25, 0.5, 0.85), "B": (0.95, 0.55, 0.15), "W": (0.3, 0.7, 0.35)}
    origin = min((e.start for row in rows for e in row), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 0.5 + 0.55 * len(rows)))
    for r, row in enumerate(rows):
        for e in row:
            shade = 1.0 / (1.0 + 0.6 * e.chunk)
            color = tuple(c * shade for c in colors[e.kind])
            ax.broken_barh(
                [(e.start - origin, e.end - e.start)], (r - 0.4, 0.8), color=color, ec="white"
            )
            ax.text(
                (e.start + e.end) / 2 - origin, r, str(e.microbatch), ha="center", va="center",
                fontsize=7, color="white",
            )  # fmt: skip
    ax.set_yticks(range(len(rows)), [f"rank {r}" for r in range(len(rows))])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)" if isinstance(timelines[0], Timeline) else "time (units)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Activation memory
# ---------------------------------------------------------------------------------------------
class _Saved:
    """What the pack hook returns: an alias of the saved tensor (same storage, its own tensor
    object), and a finalizer that uncounts it when autograd frees the saved variable (after the
    backward that used it).

    An alias, not the tensor: the hook is handed a saved *output* as the output object itself, so
    keeping that object would let a later ``output.data = ..`` (the pipeline's freeing of a sent
    output) change what the backward reads; autograd without hooks keeps its own alias, whose
    storage stays alive, and so does this."""

    __slots__ = ("tensor", "tracker", "key")

    def __init__(self, tensor: torch.Tensor, tracker: ActivationMemoryTracker, key: tuple) -> None:
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self) -> None:
        self.tracker._release(self.key)


class ActivationMemoryTracker:
    """Bytes of activations a rank holds for backward, and their peak.

    Use :meth:`hooks` around forwards (the executor does): every tensor autograd saves is counted
    once (per set of elements: views of the same elements once) until the backward that needs it
    frees it. Parameters are excluded (pass the stages' parameters). ``extra`` bytes (tensors a
    deferred weight-gradient pass keeps) and tensors held outside autograd (the executor passes
    the stage outputs it keeps for their backward, the send buffers still in flight and the
    buffers of receives posted ahead) are added by the caller through :meth:`sample`. Under FSDP2
    a parameter is its local shard: the gathered copy a forward saves for its backward counts as
    held.
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        self._param_storages = {local_tensor(p).untyped_storage().data_ptr() for p in params}
        self._live: dict[tuple, list[int]] = {}  # (storage, offset, numel) -> [nbytes, refs]
        self.current = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() in self._param_storages or t.device.type == "meta":
            return t
        # a view counts its own elements (a microbatch is a slice of the batch); views of the
        # same elements (a transpose) count once
        key = (storage.data_ptr(), t.storage_offset(), t.numel())
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.numel() * t.element_size()
            self._live[key] = [nbytes, 1]
            self.current += nbytes
        else:
            entry[1] += 1
        return _Saved(t.detach(), self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: tuple) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context under which forwards are tracked."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def sample(self, extra: int = 0, tensors: Iterable[torch.Tensor] = ()) -> int:
        """Record ``current + extra`` plus the bytes of ``tensors`` (held outside autograd: stage
        outputs kept for the backward, send buffers in flight, receive buffers posted ahead; each
        set of elements once, and not again if autograd saved it) towards the peak; return it."""
        now = self.current + extra
        seen = set(self._live)
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen and t.untyped_storage().nbytes() > 0:
                seen.add(key)
                now += t.numel() * t.element_size()
        self.peak = max(self.peak, now)
        return now

    def reset(self) -> None:
        self.peak = self.current
