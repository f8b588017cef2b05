"""Pipeline schedules as explicit per-rank action lists, and a simulator that checks and times them.

A schedule here is data: for each pipeline rank, the ordered list of :class:`Action` s it runs in
one training step. One executor (:mod:`triton_parallel_layers.parallel_layers.pipeline.schedules`) runs any such list, and
the same lists feed the renderer and the ideal bubble fraction, so what is drawn in the docs is
what runs.

Vocabulary, with ``p`` pipeline ranks, ``v`` model chunks per rank and ``m`` microbatches:

* virtual stage ``s = chunk * p + rank``, ``0 <= s < S = p * v``: chunk ``c`` of rank ``r`` holds
  the ``(c * p + r)``-th slice of the layer sequence (Megatron's interleaving), so activations go
  ``rank 0 -> 1 -> .. -> p-1 -> rank 0 (next chunk) -> ..``;
* ``F(i, c)``: forward of microbatch ``i`` through chunk ``c``;
* ``B(i, c)``: its backward. In schedules with ``split_backward`` it computes only the gradient
  with respect to the stage input (what the previous stage waits for) and queues the weight
  gradients, which ``W(i, c)`` computes later (zero-bubble scheduling). Otherwise ``B`` is the
  whole backward.

Dependencies (the simulator and the tests check every list against them):
``F(i, s)`` after ``F(i, s-1)``; ``B(i, s)`` after ``F(i, s)`` and ``B(i, s+1)``; ``W(i, s)``
after ``B(i, s)``.

The generators, each ``(pp, m[, v]) -> list[list[Action]]`` (one list per rank):

=============================  ==============================================================
:func:`gpipe_actions`          all ``m`` forwards, then all ``m`` backwards (peak memory ~ m)
:func:`one_f_one_b_actions`    ``p - r - 1`` warm-up forwards, then one forward / one backward,
                               then the cool-down backwards (peak memory ~ p - r microbatches)
:func:`interleaved_actions`    1F1B over ``v`` chunks per rank (Megatron's order); the bubble
                               shrinks ``v``-fold; needs ``m % p == 0``
:func:`zb_h1_actions`          ZB-H1: 1F1B with the backward split into ``B`` and ``W``; the
                               ``W`` passes fill the cool-down bubble; peak memory as 1F1B
:func:`forward_actions`        forward only (evaluation, sampling): ``F`` of every microbatch
                               through chunk 0, then chunk 1, ..
=============================  ==============================================================

With equal stages and unit costs the bubble fraction (idle share of ``p x`` makespan) is
``(p - 1) / (m + p - 1)`` for GPipe and 1F1B, about ``1/v`` of it for the interleaved schedule,
and ``(p - 1)(F + B - W) / (m(F + B + W) + (p - 1)(F + B - W))`` for ZB-H1 (a third of 1F1B's when
``F = B = W``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from triton_parallel_layers.parallel_layers.utils import check_positive_int

__all__ = [
    "Action",
    "Message",
    "ScheduledAction",
    "action_messages",
    "forward_actions",
    "gpipe_actions",
    "ideal_bubble_fraction",
    "interleaved_actions",
    "one_f_one_b_actions",
    "p2p_plan",
    "simulate",
    "validate_actions",
    "zb_h1_actions",
]

KINDS = ("F", "B", "W")


@dataclass(frozen=True)
class Action:
    """One compute step of a rank: ``kind`` in ``"F"``, ``"B"``, ``"W"`` of ``microbatch`` on
    local model ``chunk`` (virtual stage ``chunk * pp + rank``)."""

    kind: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class ScheduledAction:
    """An action placed in time (simulated or measured): ``[start, end)`` on ``rank``."""

    rank: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_positive_int(name, value)


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------
def gpipe_actions(pp: int, m: int) -> list[list[Action]]:
    """GPipe: every rank runs ``F0 .. F(m-1)`` then ``B0 .. B(m-1)``."""
    _check_positive(pp=pp, n_microbatches=m)
    return [
        [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(pp)
    ]


def one_f_one_b_actions(pp: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): rank ``r`` runs ``w = min(p - r - 1, m)`` warm-up forwards, then
    ``m - w`` pairs ``F(w + k), B(k)``, then the ``w`` cool-down backwards. At most ``w + 1``
    microbatches are in flight on rank ``r``."""
    _check_positive(pp=pp, n_microbatches=m)
    out = []
    for r in range(pp):
        w = min(pp - r - 1, m)
        acts = [Action("F", i) for i in range(w)]
        for k in range(m - w):
            acts += [Action("F", w + k), Action("B", k)]
        acts += [Action("B", i) for i in range(m - w, m)]
        out.append(acts)
    return out


def check_interleaved(pp: int, m: int, v: int) -> None:
    """The interleaved schedule's constraints, as a ``ValueError`` naming the values."""
    _check_positive(pp=pp, n_microbatches=m, num_chunks=v)
    if m < pp:
        raise ValueError(
            f"n_microbatches={m} is too small for the interleaved 1F1B schedule with pp={pp}: "
            f"it needs at least pp={pp} microbatches (a multiple of pp)"
        )
    if m % pp:
        raise ValueError(
            f"n_microbatches={m} is not a multiple of pp={pp}: the interleaved 1F1B schedule runs "
            f"microbatches in groups of pp; use {m - m % pp} or {m - m % pp + pp}"
        )


def interleaved_actions(pp: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron's virtual pipeline) with ``v`` chunks per rank.

    Each rank walks a sequence of ``m * v`` forward "virtual microbatches": groups of ``p``
    microbatches go through chunk 0, then the same group through chunk 1, .., then the next group.
    The backward sequence visits the chunks in reverse. Rank ``r`` runs
    ``(p - r - 1) * 2 + (v - 1) * p`` warm-up forwards (all of them when ``m == p``), then one
    forward / one backward, then the cool-down backwards. Needs ``m % p == 0``.
    """
    check_interleaved(pp, m, v)
    total = m * v

    def fwd(k: int) -> tuple[int, int]:  # (microbatch, chunk) of the k-th forward
        group, within = divmod(k, pp * v)
        return group * pp + within % pp, within // pp

    def bwd(k: int) -> tuple[int, int]:
        mb, chunk = fwd(k)
        return mb, v - 1 - chunk

    out = []
    for r in range(pp):
        w = total if m == pp else min((pp - r - 1) * 2 + (v - 1) * pp, total)
        acts = [Action("F", *fwd(k)) for k in range(w)]
        for k in range(total - w):
            acts += [Action("F", *fwd(w + k)), Action("B", *bwd(k))]
        acts += [Action("B", *bwd(k)) for k in range(total - w, total)]
        out.append(acts)
    return out


def forward_actions(pp: int, m: int, v: int = 1) -> list[list[Action]]:
    """Forward only (evaluation, sampling): every rank runs ``F(i, c)`` for each chunk ``c`` in
    turn and each microbatch ``i`` (all microbatches through chunk 0, then chunk 1, ..). No
    backward, so nothing is held between actions but the last stage's outputs."""
    _check_positive(pp=pp, n_microbatches=m, num_chunks=v)
    return [[Action("F", i, c) for c in range(v) for i in range(m)] for _ in range(pp)]


def zb_h1_actions(pp: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2024), one chunk per rank.

    1F1B's order of forwards and backwards, with each backward split into ``B`` (input gradient,
    on the critical path) and ``W`` (weight gradient, free to move). Rank ``r`` runs
    ``w = min(p - r - 1, m)`` warm-up forwards, then ``F, B`` pairs as 1F1B, with each ``W``
    held back until ``r`` later ``B`` s have run; in the cool-down one ``W`` follows each ``B``
    and the held-back rest closes the step. Holding back more ``W`` s further down the pipeline
    lets the last microbatches' ``B`` s travel back to rank 0 without waiting, and the ``W`` s
    fill the gaps 1F1B leaves idle.

    Memory: forwards in flight until their ``B`` are 1F1B's ``p - r``; at most ``r + 1`` ``W`` s
    are pending on rank ``r`` (each holding its layers' inputs and output gradients), so no
    rank holds more than ``p`` microbatches' activations, 1F1B's peak (rank 0's).

    With ``F = B = W`` and ``m >= p`` the idle time is ``p - 1`` units per rank, a third of
    1F1B's ``3(p - 1)``; with ``m < p`` it lies between the two.
    """
    _check_positive(pp=pp, n_microbatches=m)
    out = []
    for r in range(pp):
        w = min(pp - r - 1, m)
        acts = [Action("F", i) for i in range(w)]
        n_w = 0  # weight-gradient passes issued so far
        for k in range(m - w):
            acts += [Action("F", w + k), Action("B", k)]
            if k + 1 - n_w > r:  # more than r W's pending: run the oldest
                acts.append(Action("W", n_w))
                n_w += 1
        for i in range(m - w, m):
            acts.append(Action("B", i))
            acts.append(Action("W", n_w))
            n_w += 1
        acts += [Action("W", i) for i in range(n_w, m)]
        out.append(acts)
    return out


# ---------------------------------------------------------------------------------------------
# Checking and simulating
# ---------------------------------------------------------------------------------------------
def validate_actions(
    actions: Sequence[Sequence[Action]], m: int, v: int = 1, *, split_backward: bool = False
) -> None:
    """Raise ``ValueError`` unless each rank runs each needed action exactly once, and the lists
    run to completion (no deadlock) under the dependencies above."""
    kinds = ("F", "B", "W") if split_backward else ("F", "B")
    want = sorted((k, i, c) for k in kinds for i in range(m) for c in range(v))
    for r, acts in enumerate(actions):
        got = sorted((a.kind, a.microbatch, a.chunk) for a in acts)
        if got != want:
            raise ValueError(f"rank {r}: the actions are not each of {kinds} x {m} x {v} once")
    simulate(actions, v=v)


def _deps(a: Action, rank: int, pp: int, num_stages: int) -> list[tuple[str, int, int]]:
    """The (kind, microbatch, virtual stage) an action waits for, other than on its own rank."""
    s = a.chunk * pp + rank
    if a.kind == "F":
        return [("F", a.microbatch, s - 1)] if s > 0 else []
    if a.kind == "B":
        deps = [("F", a.microbatch, s)]
        if s < num_stages - 1:
            deps.append(("B", a.microbatch, s + 1))
        return deps
    return [("B", a.microbatch, s)]


def simulate(
    actions: Sequence[Sequence[Action]],
    *,
    v: int = 1,
    costs: Mapping[str, float] | None = None,
    comm: float = 0.0,
) -> list[list[ScheduledAction]]:
    """Run the per-rank lists as soon as their dependencies allow; return each rank's timeline.

    Args:
        actions: ``actions[r]`` is rank ``r``'s ordered list.
        v: model chunks per rank.
        costs: time of each kind; default ``F = 1, B = 2, W = 0`` (a whole backward costs two
            forwards) for non-split lists, and ``F = B = W = 1`` when any ``W`` is present.
        comm: latency added to every dependency that crosses ranks.

    Raises:
        ValueError: the lists deadlock (some rank waits on an action that can never run).
    """
    pp = len(actions)
    num_stages = pp * v
    split = any(a.kind == "W" for acts in actions for a in acts)
    if costs is None:
        costs = {"F": 1.0, "B": 1.0, "W": 1.0} if split else {"F": 1.0, "B": 2.0, "W": 0.0}
    done: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> end time
    free = [0.0] * pp
    pos = [0] * pp
    timeline: list[list[ScheduledAction]] = [[] for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(actions[r]):
                a = actions[r][pos[r]]
                s = a.chunk * pp + r
                deps = _deps(a, r, pp, num_stages)
                if not all(d in done for d in deps):
                    break
                ready = max(
                    [free[r]]
                    + [done[d] + (comm if d[2] % pp != r else 0.0) for d in deps if d[0] != a.kind]
                    + [done[d] + comm for d in deps if d[0] == a.kind]
                )
                end = ready + costs[a.kind]
                done[(a.kind, a.microbatch, s)] = end
                free[r] = end
                timeline[r].append(ScheduledAction(r, a.kind, a.microbatch, a.chunk, ready, end))
                pos[r] += 1
                progress = True
    stuck = {r: str(actions[r][pos[r]]) for r in range(pp) if pos[r] < len(actions[r])}
    if stuck:
        raise ValueError(f"the action lists deadlock: rank -> blocked action {stuck}")
    return timeline


def ideal_bubble_fraction(timeline: Sequence[Sequence[ScheduledAction]]) -> float:
    """Idle share of ``p x makespan`` in a (simulated or measured) timeline."""
    span = max((e.end for row in timeline for e in row), default=0.0)
    start = min((e.start for row in timeline for e in row), default=0.0)
    busy = sum(e.end - e.start for row in timeline for e in row)
    total = len(timeline) * (span - start)
    return 0.0 if total <= 0 else 1.0 - busy / total


# ---------------------------------------------------------------------------------------------
# Point-to-point plan: what each rank posts, in an order NCCL cannot deadlock on
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Message:
    """One tensor between neighbouring virtual stages: ``stream`` ``"act"`` is the input of
    virtual stage ``stage`` (sent by ``stage - 1``), ``"grad"`` the gradient of ``stage``'s
    output (sent by ``stage + 1``); for ``microbatch``."""

    stream: str
    stage: int
    microbatch: int

    def src(self, pp: int) -> int:
        """The pipeline rank that sends it."""
        return (self.stage - 1 if self.stream == "act" else self.stage + 1) % pp

    def dst(self, pp: int) -> int:
        """The pipeline rank that receives it."""
        return self.stage % pp

    def __str__(self) -> str:
        return f"{self.stream}{self.microbatch}->s{self.stage}"


def action_messages(
    a: Action, rank: int, pp: int, num_stages: int
) -> tuple[Message | None, Message | None]:
    """``(received, sent)``: the message action ``a`` of ``rank`` needs before it runs and the one
    it produces (``None`` where there is none: first/last stage, ``W``)."""
    s = a.chunk * pp + rank
    if a.kind == "F":
        recv = Message("act", s, a.microbatch) if s > 0 else None
        send = Message("act", s + 1, a.microbatch) if s < num_stages - 1 else None
        return recv, send
    if a.kind == "B":
        recv = Message("grad", s, a.microbatch) if s < num_stages - 1 else None
        send = Message("grad", s - 1, a.microbatch) if s > 0 else None
        return recv, send
    return None, None


RECV_LOOKAHEAD = 1
"""How many actions ahead of the action needing it a receive is posted (:func:`p2p_plan`)."""


def p2p_plan(
    actions: Sequence[Sequence[Action]], v: int = 1
) -> list[list[list[tuple[str, Message]]]]:
    """When each rank posts each send and receive: ``plan[r][k]`` is the list of
    ``("send" | "recv", Message)`` that rank ``r`` posts as one ``batch_isend_irecv`` group right
    before its action ``k`` (``k = len(actions[r])``: after its last action).

    The order is deadlock-free under NCCL's rule (each rank runs its groups one after another; a
    large message moves only while both sides' groups holding it are current) for any action
    lists that :func:`simulate` runs to completion:

    * every message gets one global key: the simulated end time of the action that produces it
      (unit costs as in :func:`simulate`), then ``(stream, stage, microbatch)``; every rank
      posts its sends and receives in increasing key order. Then the pending message of least
      key is at the head of both its ranks' queues, so it can always move, and by induction all
      do. (Merging consecutive operations into one group only lets more of them move at once.)
    * a send goes into the group right after the action that produced it (its key is that
      action's end, at most the next action's start). A receive goes one action ahead of the
      action that needs it, or as soon after that as the order allows, but no later than the
      first group whose action starts at or after its key (its producer ends no later than the
      consumer starts): the message can then move while the action before its consumer
      computes (Megatron-LM's ``overlap_p2p_comm``), instead of after it, at the cost of one
      receive buffer posted one action early.

    In 1F1B's steady state a stage's forward output goes out with the receive of the gradient its
    next backward needs (Megatron-LM's ``send_forward_recv_backward``), and the next forward's
    input is received while the backward before it runs.
    """
    pp = len(actions)
    num_stages = pp * v
    timeline = simulate(actions, v=v)
    end: dict[tuple[str, int, int], float] = {}  # (kind, microbatch, virtual stage) -> end
    for r, row in enumerate(timeline):
        for e in row:
            end[(e.kind, e.microbatch, e.chunk * pp + r)] = e.end

    def key(msg: Message) -> tuple:
        producer = ("F", msg.microbatch, msg.stage - 1) if msg.stream == "act" else (
            "B", msg.microbatch, msg.stage + 1)  # fmt: skip
        return (end[producer], msg.stream, msg.stage, msg.microbatch)

    plan: list[list[list[tuple[str, Message]]]] = []
    for r, acts in enumerate(actions):
        starts = [e.start for e in timeline[r]]
        ops: list[tuple[tuple, int, str, Message]] = []  # (key, latest slot, kind, message)
        for k, a in enumerate(acts):
            recv, send = action_messages(a, r, pp, num_stages)
            if recv is not None:
                ops.append((key(recv), k, "recv", recv))
            if send is not None:
                ops.append((key(send), k + 1, "send", send))
        ops.sort(key=lambda o: o[0])
        groups: list[list[tuple[str, Message]]] = [[] for _ in range(len(acts) + 1)]
        slot = 0  # the group of the operation before in key order: none may go earlier
        reached = 0  # the first group whose action starts at or after the key (keys ascend)
        for k_, latest, kind, msg in ops:
            while reached < len(acts) and starts[reached] < k_[0]:
                reached += 1
            if kind == "send":  # right after the action producing it
                slot = max(slot, latest)
            else:  # one action ahead of its consumer, or the first group its key has reached
                slot = max(slot, min(reached, latest - RECV_LOOKAHEAD))
                if slot > latest:
                    raise AssertionError(f"rank {r}: {msg} keyed after the action that needs it")
            groups[slot].append((kind, msg))
        plan.append(groups)
    return plan
