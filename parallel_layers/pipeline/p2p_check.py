"""Test tool: record every rank's point-to-point operations on gloo, replay them under NCCL's rule.

Gloo buffers sends and matches messages by (peer, tag), so a posting order that works on gloo can
hang on NCCL, where a send or receive of a large message (beyond NCCL's internal buffers, a few
MB) completes only when the peer's matching operation is in the peer's *current* group of
point-to-point operations. This module catches such orders on a CPU:

1. :func:`record_p2p` wraps ``torch.distributed.batch_isend_irecv``, ``send``, ``recv``,
   ``isend`` and ``irecv`` while a real (gloo) run goes on, and logs, per rank, the *groups* it
   posts: each ``batch_isend_irecv`` call is one group, each lone ``send``/``recv``/``isend``/
   ``irecv`` a group of one. Each operation is a :class:`P2POpRecord` (kind, peer global rank,
   bytes, shape, dtype, tag, group index in posting order, device). The wrappers call the real functions,
   so the run is unchanged.
2. :func:`replay_nccl` replays the ranks' logs under NCCL's rule and returns a
   :class:`Replay`: it ``completes``, or names each rank's first stuck group and what every
   operation in it waits for.

The rule (the strictest NCCL behaviour, that of messages too large to be buffered):

* each rank runs its groups one after another, in posting order (one stream per rank);
* the ``k``-th send from ``a`` to ``b`` matches the ``k``-th receive on ``b`` from ``a`` (FIFO per
  (sender, receiver) pair; NCCL ignores tags). It completes only when both operations are in their
  ranks' current groups at the same time;
* a group ends when all its operations have completed; then the rank's next group starts.

Besides deadlocks, the replay reports FIFO-matched pairs that disagree in bytes, dtype or tag: on
NCCL such a pair fails or, with equal sizes, silently delivers the wrong tensor (gloo, matching by
tag, hides both).

What the model leaves out, on purpose: collectives (the schedules in this package reach their
broadcasts and all-reduces only after their point-to-point traffic has completed), and NCCL's
buffering of small messages and its separate communicators for lone operations (both only let
more orders complete, so an order that completes here completes on NCCL).

Typical use in a multi-process test (every rank returns its log, the test replays them all)::

    def body():                                   # runs on every rank
        with record_p2p() as log:
            schedule.step(x, y)
        return log.groups

    groups_by_rank = dist_run(4, body)
    replay = replay_nccl(groups_by_rank)
    assert replay.completes, replay.report()

:func:`replay_nccl` is pure Python: it also takes hand-written or computed logs
(:func:`op`, the tests' known-bad orders, and :func:`planned_groups`: what the pipeline executor
posts for given action lists, computed without running it, so that every ``(pp, m, v)`` can be
checked in milliseconds; the tests check it against recorded runs).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = [
    "P2PLog",
    "P2POpRecord",
    "Replay",
    "StuckGroup",
    "op",
    "planned_groups",
    "record_p2p",
    "replay_nccl",
]


@dataclass(frozen=True)
class P2POpRecord:
    """One point-to-point operation as a rank posted it.

    ``kind`` is ``"send"`` or ``"recv"``; ``peer`` the other side's global rank (``-1``: a receive
    from any source); ``group`` the index, in this rank's posting order, of the group it belongs
    to; ``api`` the function that posted it; ``device`` the tensor's.
    """

    kind: str
    peer: int
    nbytes: int
    shape: tuple[int, ...] = ()
    dtype: str = ""
    tag: int = 0
    group: int = 0
    api: str = ""
    device: str = ""

    def __str__(self) -> str:
        arrow = "->" if self.kind == "send" else "<-"
        return f"{self.kind} {arrow} {self.peer} ({self.nbytes} B, tag {self.tag})"


def op(kind: str, peer: int, nbytes: int = 1, tag: int = 0) -> P2POpRecord:
    """A hand-made operation for :func:`replay_nccl` (its group index is its place in the log)."""
    if kind not in ("send", "recv"):
        raise ValueError(f"kind={kind!r}: expected 'send' or 'recv'")
    return P2POpRecord(kind, peer, nbytes, tag=tag)


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------
class P2PLog:
    """The groups one rank posted while :func:`record_p2p` was active: ``groups[g]`` is the list
    of :class:`P2POpRecord` s of its ``g``-th group."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.groups: list[list[P2POpRecord]] = []

    def _add(self, ops: list[tuple[str, int, torch.Tensor, int]], api: str) -> None:
        g = len(self.groups)
        self.groups.append(
            [
                P2POpRecord(
                    kind,
                    peer,
                    t.numel() * t.element_size(),
                    tuple(t.shape),
                    str(t.dtype).removeprefix("torch."),
                    tag,
                    g,
                    api,
                    str(t.device),
                )
                for kind, peer, t, tag in ops
            ]
        )

    @property
    def num_ops(self) -> int:
        return sum(len(g) for g in self.groups)

    def __repr__(self) -> str:
        return f"P2PLog(rank {self.rank}: {len(self.groups)} groups, {self.num_ops} ops)"


_PATCHED = ("batch_isend_irecv", "isend", "irecv", "send", "recv")
_state = threading.local()
_patch_lock = threading.Lock()


def _global_peer(group, peer, group_peer) -> int:
    if group_peer is None:
        return -1 if peer is None else int(peer)
    group = group if group is not None else dist.group.WORLD
    return dist.get_global_rank(group, group_peer)


@contextlib.contextmanager
def record_p2p() -> Iterator[P2PLog]:
    """Log this rank's point-to-point groups while the block runs (see the module docstring).

    Patches the five functions in ``torch.distributed`` and in ``torch.distributed.distributed_c10d``
    (where ``batch_isend_irecv``, ``send`` and ``P2POp`` look them up); calls made from inside a
    recorded call (``send`` runs ``isend``; ``batch_isend_irecv`` runs each op) are not logged
    again. Not reentrant: one recorder at a time per process.
    """
    if not dist.is_initialized():
        raise RuntimeError("record_p2p needs an initialized process group")
    log = P2PLog(dist.get_rank())
    originals = {name: getattr(c10d, name) for name in _PATCHED}

    def recording(name, kind):
        real = originals[name]
        signature = inspect.signature(real)
        peer_arg, group_peer_arg = ("dst", "group_dst") if kind == "send" else ("src", "group_src")

        def wrapper(*args, **kwargs):
            if getattr(_state, "depth", 0) == 0:
                bound = signature.bind(*args, **kwargs).arguments
                peer = _global_peer(
                    bound.get("group"), bound.get(peer_arg), bound.get(group_peer_arg)
                )
                log._add([(kind, peer, bound["tensor"], bound.get("tag", 0))], name)
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                return real(*args, **kwargs)
            finally:
                _state.depth -= 1

        wrapper.__name__ = real.__name__
        wrapper.__qualname__ = real.__qualname__
        wrapper.__doc__ = real.__doc__
        return wrapper

    wrappers = {
        "isend": recording("isend", "send"),
        "irecv": recording("irecv", "recv"),
        "send": recording("send", "send"),
        "recv": recording("recv", "recv"),
    }

    def batch_isend_irecv(p2p_op_list):
        for p in p2p_op_list:  # ops built before recording began: the wrapped functions
            if p.op is originals["isend"]:
                p.op = wrappers["isend"]
            elif p.op is originals["irecv"]:
                p.op = wrappers["irecv"]
        if getattr(_state, "depth", 0) == 0:
            ops = []
            for p in p2p_op_list:
                kind = "send" if p.op is wrappers["isend"] else "recv"
                ops.append((kind, int(p.peer), p.tensor, p.tag))
            log._add(ops, "batch_isend_irecv")
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return originals["batch_isend_irecv"](p2p_op_list)
        finally:
            _state.depth -= 1

    wrappers["batch_isend_irecv"] = batch_isend_irecv
    if not _patch_lock.acquire(blocking=False):
        raise RuntimeError("record_p2p is already active in this process")
    try:
        for name, fn in wrappers.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
        yield log
    finally:
        for name, fn in originals.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
        _patch_lock.release()


# ---------------------------------------------------------------------------------------------
# Replay under NCCL's rule
# ---------------------------------------------------------------------------------------------
@dataclass
class StuckGroup:
    """A rank's first group that never ends: ``waiting`` describes each operation not completed
    (what it waits for)."""

    rank: int
    group: int
    num_groups: int
    ops: list[P2POpRecord]
    waiting: list[str]

    def __str__(self) -> str:
        lines = [f"rank {self.rank}: stuck in group {self.group} of {self.num_groups}"]
        lines += [f"    {w}" for w in self.waiting]
        return "\n".join(lines)


@dataclass
class Replay:
    """What :func:`replay_nccl` found."""

    num_ranks: int
    completes: bool
    groups_run: list[int]
    """Per rank, how many of its groups ended."""
    num_groups: list[int]
    stuck: dict[int, StuckGroup] = field(default_factory=dict)
    """Rank -> its first group that never ends (empty when the replay completes)."""
    mismatches: list[str] = field(default_factory=list)
    """FIFO-matched send/receive pairs that disagree in bytes, dtype or tag."""

    @property
    def ok(self) -> bool:
        """Completes and every matched pair agrees."""
        return self.completes and not self.mismatches

    def report(self) -> str:
        if self.ok:
            total = sum(self.num_groups)
            return f"completes: {self.num_ranks} ranks, {total} groups"
        lines = []
        if not self.completes:
            lines.append(
                "deadlock under NCCL's rule (groups run per rank: "
                f"{self.groups_run} of {self.num_groups})"
            )
            lines += [str(s) for _, s in sorted(self.stuck.items())]
        lines += [f"mismatch: {m}" for m in self.mismatches]
        return "\n".join(lines)


def replay_nccl(groups_by_rank: Sequence[Sequence[Sequence[P2POpRecord]]]) -> Replay:
    """Replay every rank's groups under NCCL's rule (module docstring).

    Args:
        groups_by_rank: ``groups_by_rank[r][g]`` is the list of operations of rank ``r``'s
            ``g``-th group (index ``r`` is the global rank; :attr:`P2PLog.groups` of each rank,
            or hand-made :func:`op` lists). Empty groups are skipped.

    Returns:
        A :class:`Replay`: whether every rank runs all its groups, else each rank's first stuck
        group; and any FIFO-matched pair that disagrees in bytes, dtype or tag.
    """
    n = len(groups_by_rank)
    groups = [[list(g) for g in rank_groups if len(g)] for rank_groups in groups_by_rank]
    # FIFO matching per (sender, receiver): position of each op in its pair's stream
    # op id: (rank, group, index in group)
    sends: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    recvs: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    bad_peer: list[str] = []
    for r, rank_groups in enumerate(groups):
        for g, grp in enumerate(rank_groups):
            for j, o in enumerate(grp):
                if not 0 <= o.peer < n or o.peer == r:
                    bad_peer.append(f"rank {r} group {g}: {o} has no valid peer (world {n})")
                    continue
                key = (r, o.peer) if o.kind == "send" else (o.peer, r)
                (sends if o.kind == "send" else recvs).setdefault(key, []).append((r, g, j))
    partner: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    mismatches: list[str] = list(bad_peer)
    for key in set(sends) | set(recvs):
        for k, (s_id, r_id) in enumerate(zip(sends.get(key, []), recvs.get(key, []))):
            partner[s_id], partner[r_id] = r_id, s_id
            so = groups[s_id[0]][s_id[1]][s_id[2]]
            ro = groups[r_id[0]][r_id[1]][r_id[2]]
            if (so.nbytes, so.dtype, so.tag) != (ro.nbytes, ro.dtype, ro.tag):
                mismatches.append(
                    f"message {k} from rank {key[0]} to rank {key[1]}: sent {so.nbytes} B "
                    f"{so.dtype} {list(so.shape)} tag {so.tag} (group {s_id[1]}) but received "
                    f"into {ro.nbytes} B {ro.dtype} {list(ro.shape)} tag {ro.tag} "
                    f"(group {r_id[1]})"
                )

    cur = [0] * n
    done: set[tuple[int, int, int]] = set()
    progress = True
    while progress:
        progress = False
        for r in range(n):
            while cur[r] < len(groups[r]):
                g = cur[r]
                for j in range(len(groups[r][g])):
                    me = (r, g, j)
                    if me in done:
                        continue
                    other = partner.get(me)
                    if other is not None and cur[other[0]] == other[1]:
                        done.add(me)
                        done.add(other)
                if all((r, g, j) in done for j in range(len(groups[r][g]))):
                    cur[r] += 1
                    progress = True
                else:
                    break

    stuck: dict[int, StuckGroup] = {}
    for r in range(n):
        if cur[r] >= len(groups[r]):
            continue
        g = cur[r]
        waiting = []
        for j, o in enumerate(groups[r][g]):
            if (r, g, j) in done:
                continue
            other = partner.get((r, g, j))
            if other is None:
                waiting.append(f"{o}: the peer never posts the matching {_opposite(o.kind)}")
            else:
                q, qg, _ = other
                where = "finished" if cur[q] >= len(groups[q]) else f"in group {cur[q]}"
                waiting.append(f"{o}: matched by rank {q}'s group {qg}, but rank {q} is {where}")
        stuck[r] = StuckGroup(r, g, len(groups[r]), groups[r][g], waiting)
    return Replay(
        num_ranks=n,
        completes=not stuck,
        groups_run=cur,
        num_groups=[len(g) for g in groups],
        stuck=stuck,
        mismatches=mismatches,
    )


def _opposite(kind: str) -> str:
    return "recv" if kind == "send" else "send"


# ---------------------------------------------------------------------------------------------
# What the pipeline executor posts, without running it
# ---------------------------------------------------------------------------------------------
def planned_groups(
    actions, v: int = 1, *, first_step: bool = True
) -> list[list[list[P2POpRecord]]]:
    """The groups :class:`~.schedules.PipelineSchedule` posts in one step, per pipeline rank, for
    the action lists ``actions`` (every activation needing a gradient), as
    :func:`replay_nccl` takes them: peers are pipeline ranks, tags the transport's, each message
    1 byte and each metadata header 88 (``(3 + MAX_DIMS,)`` int64).

    ``first_step``: the shapes are not known yet, so the first activation of each stream is
    preceded by its metadata, and the receiver splits the group there
    (:meth:`~.p2p.StageTransport.post`).
    """
    from triton_parallel_layers.parallel_layers.pipeline.actions import p2p_plan
    from triton_parallel_layers.parallel_layers.pipeline.p2p import MAX_DIMS, message_tag

    pp = len(actions)
    num_stages = pp * v
    meta_bytes = (3 + MAX_DIMS) * 8
    out: list[list[list[P2POpRecord]]] = []
    for plan in p2p_plan(actions, v):
        groups: list[list[P2POpRecord]] = []
        sent, known = set(), set()
        for slot in plan:
            group: list[P2POpRecord] = []
            for kind, msg in slot:
                tag = message_tag(msg.stream, msg.stage, num_stages)
                meta_tag = message_tag("meta", msg.stage, num_stages)
                if kind == "send":
                    peer = msg.dst(pp)
                    if msg.stream == "act" and first_step and msg.stage not in sent:
                        sent.add(msg.stage)
                        group.append(P2POpRecord("send", peer, meta_bytes, tag=meta_tag))
                    group.append(P2POpRecord("send", peer, 1, tag=tag))
                    continue
                peer = msg.src(pp)
                if msg.stream == "act" and first_step and msg.stage not in known:
                    known.add(msg.stage)
                    group.append(P2POpRecord("recv", peer, meta_bytes, tag=meta_tag))
                    groups.append(group)
                    group = []
                group.append(P2POpRecord("recv", peer, 1, tag=tag))
            groups.append(group)
        out.append([g for g in groups if g])
    return out
