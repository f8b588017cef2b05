"""Failing cleanly: every rank of a failed run exits with status 1, and the job prints one line.

A rank that fails cannot simply exit. ``torchrun`` stops the other workers (SIGTERM, exit status
-15) the moment one exits non-zero, and a rank that leaves while a peer is still inside a gloo
collective or tearing down its process group can make that peer abort (SIGABRT). So a failing
rank *announces* its failure and the ranks leave together, through the c10d store (the TCP store
every rank of the default group already talks to; it does not depend on the state of gloo or
NCCL)::

    failing rank r                          every other rank (FaultMonitor's thread)
    ---------------                         ----------------------------------------
    error/<r> = its one-line message        polls  failed  every `interval` seconds
    failed += 1                             sees failed > 0 (the main thread may be stuck
    reporter := r if nobody claimed it        in a collective waiting for rank r)
    arrive                                  arrive
          \\_______ all ranks arrived, or `grace` seconds passed _______/
    the reporter prints `error: ...`, then sets `done`; the others wait for `done`
    every rank: os._exit(1)  (no process-group teardown, no interpreter shutdown)

The reporter is the first rank that failed. Its line names it (``error: rank 3: ...``) unless every
rank failed, which is a verdict they all reached alike (a corrupt checkpoint, a diverged loss),
printed as it is. Ranks that did not arrive within ``grace`` (killed, or stuck where even the
thread cannot run) are named at the end of the line.

A rank asked to stop by SIGTERM (``torchrun`` stopping the workers after one failed) exits with
status 1 at once (:func:`exit_on_sigterm`), so no rank of a failed job reports a signal.

Keys live under ``tpl/<attempt>/``, the restart count of ``torchrun --max-restarts``, so a restarted
job never reads the failure of the attempt before it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import record_comm

__all__ = ["INJECT_ENV", "KILL_POINTS", "FaultMonitor", "FaultPlan", "exit_on_sigterm"]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def exit_on_sigterm() -> None:
    """From now on SIGTERM ends this process with exit status 1 (flushing stdout and stderr).

    ``torchrun`` sends SIGTERM to every worker when one fails; their exit status is then 1 (failed
    with the job) rather than -15. The handler runs between Python bytecodes, so a rank blocked in
    a collective exits as soon as the collective returns or fails (its peer has gone).
    """

    def handler(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
        _flush()
        os._exit(1)

    signal.signal(signal.SIGTERM, handler)


class FaultMonitor:
    """Announces this rank's failure to the others, or notices theirs, and ends every rank alike.

    Start it once the default process group exists; set :attr:`phase` as the run goes; call
    :meth:`fail` on a failing rank, :meth:`stop` after a run that ended well. See the module
    docstring for the protocol.

    Args:
        interval: seconds between two looks at the store by the watching thread.
        grace: how long the ranks wait for each other before leaving anyway.
    """

    def __init__(self, *, interval: float = 0.5, grace: float = 30.0) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"tpl/{attempt}/"
        self.interval = interval
        self.grace = grace
        self.phase = "setting up"
        """Where this rank is (``"step 7: forward and backward"``), set by the trainer; the
        thread posts it with the time, and a failure report names where the other ranks were."""
        self._posted = ""
        self._waited = False
        self._stop = threading.Event()
        self._leaving = threading.Lock()  # held by the one thread that ends the process
        self._thread: threading.Thread | None = None

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _count(self, name: str) -> int:
        return int(self.store.add(self._key(name), 0))

    # -- the watching thread ----------------------------------------------------------------------
    def start(self) -> FaultMonitor:
        """Start the thread that ends this rank when another one fails."""
        if self.world_size > 1 and self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="tpl-fault-monitor", daemon=True
            )
            self._thread.start()
        return self

    def _beat(self) -> None:
        """Post this rank's phase (when it changed) with the time."""
        phase = self.phase
        if phase != self._posted:
            self.store.set(self._key(f"beat/{self.rank}"), f"{time.time():.3f} {phase}")
            self._posted = phase

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                failed = self._count("failed")
            except Exception:  # noqa: BLE001 - the store went away: the launcher is stopping us
                return
            if failed and self._leaving.acquire(blocking=False):
                self._leave(reporter=False)
            if failed:
                return

    def stop(self) -> None:
        """Stop watching (the run ended well on this rank)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    # -- failing ----------------------------------------------------------------------------------
    def fail(self, message: str, *, waited: bool = False) -> NoReturn:
        """Announce that this rank failed with ``message`` (one line), wait for the other ranks
        and end the process with status 1; one rank of the job prints the ``error:`` line.
        ``waited``: the failure is a wait for other ranks (a collective timed out, a peer went
        away), so the line also names the ranks that were elsewhere."""
        self._waited = waited
        self._stop.set()
        if not self._leaving.acquire(blocking=False):  # the thread is ending the process already
            threading.Event().wait()
        try:
            self._beat()
            self.store.set(self._key(f"error/{self.rank}"), message)
            self.store.add(self._key("failed"), 1)
            claimed = self.store.compare_set(self._key("reporter"), "", str(self.rank))
            reporter = claimed.decode() == str(self.rank)
        except Exception:  # noqa: BLE001 - no store: say it here and leave alone
            self._say_and_exit(message)
        if reporter:  # stopped by the launcher before the others arrive: still say what failed
            signal.signal(signal.SIGTERM, lambda *_: self._say_and_exit(message))
        self._leave(reporter=reporter, message=message)

    def _say_and_exit(self, message: str) -> NoReturn:
        line = f"rank {self.rank}: {message}"
        with contextlib.suppress(Exception):
            elsewhere = self._elsewhere() if self._waited else ""
            line += f"; not there: {elsewhere}" if elsewhere else ""
        print(f"error: {line}", file=sys.stderr)
        _flush()
        os._exit(1)

    def _leave(self, *, reporter: bool, message: str = "") -> NoReturn:
        try:
            self.store.append(self._key("arrived"), f"{self.rank},")
            self.store.add(self._key("leaving"), 1)
            deadline = time.monotonic() + self.grace
            while self._count("leaving") < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
            if reporter:
                print(f"error: {self._line(message)}", file=sys.stderr)
                _flush()
                self.store.set(self._key("done"), "1")
            else:  # leave after the reporter has printed, which it does within `grace`
                deadline += self.grace
                while not self.store.check([self._key("done")]) and time.monotonic() < deadline:
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store went away (the launcher is stopping the job)
            if reporter:
                self._say_and_exit(message)
        _flush()
        os._exit(1)

    def _line(self, message: str) -> str:
        """The reporter's line: its message, naming it unless every rank failed, and naming the
        ranks that did not arrive."""
        failed = self._count("failed")
        line = message if failed == self.world_size else f"rank {self.rank}: {message}"
        if failed not in (1, self.world_size):
            line += f" ({failed} of {self.world_size} ranks failed)"
        elsewhere = self._elsewhere() if self._waited else ""
        if elsewhere:
            line += f"; not there: {elsewhere}"
        arrived = {int(r) for r in self.store.get(self._key("arrived")).decode().split(",") if r}
        missing = sorted(set(range(self.world_size)) - arrived)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            ranks = "ranks" if len(missing) > 1 else "rank"
            line += f"; {ranks} {shown} did not respond in {self.grace:g} s"
        return line

    def _elsewhere(self, limit: int = 64) -> str:
        """The ranks (up to ``limit`` looked at) last seen in another phase than this rank, for how
        long: ``rank 1 in 'step 2: data' for 10.2 s``. For a collective that timed out, the
        ranks that did not arrive."""
        if self.world_size > limit:
            return ""
        now, mine, found = time.time(), self.phase, []
        for r in range(self.world_size):
            key = self._key(f"beat/{r}")
            if r == self.rank or not self.store.check([key]):
                continue
            stamp, _, phase = self.store.get(key).decode().partition(" ")
            if phase != mine:
                found.append(f"rank {r} in '{phase}' for {now - float(stamp):.1f} s")
        return ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")


# ---------------------------------------------------------------------------------------------
# Fault injection (tests only)
# ---------------------------------------------------------------------------------------------
INJECT_ENV = "TPL_INJECT_FAULT"
"""Test hook: faults to inject, ``kind@rank:step`` separated by commas (``nan@1:3,nan@1:4``).
Kinds: ``nan`` (this rank's loss of that step becomes NaN, as a diverging forward would make it),
``raise`` (this rank raises an ``OSError`` before the step, alone), ``hang`` (this rank sleeps
before the step, its peers wait in the step's first collective), and the kill points of
:data:`KILL_POINTS` (this rank SIGKILLs itself there). Steps count from 1 (the step being
computed). The n-th kill of the list (counting every rank's, in the order written) happens in
attempt n of a ``torchrun --max-restarts`` job only (``TORCHELASTIC_RESTART_COUNT``), so one job
can be killed at several points in turn and each restart runs on. For fault-tolerance tests,
never for training; unset, it costs nothing (no hook is installed)."""

KILL_POINTS = {
    "kill": "before the step",
    "kill-forward": "in the forward (a pre-hook on the middle layer this rank holds)",
    "kill-backward": "in the backward (a gradient hook on that layer's first parameter)",
    "kill-tp": "entering the step's first tensor-parallel collective",
    "kill-send": "at the step's first pipeline send",
    "kill-dp": "in the data-parallel gradient all-reduce (before a bucket, in the engine's DDP hook)",
    "kill-optim": "in the optimizer step (a step pre-hook)",
    "kill-save": "inside the checkpoint save after the step",
}
"""Where each kill fault strikes. ``kill-save``: the peers are inside the save's collectives
(``--async-checkpoint``: the save is in flight on every rank)."""

FAULT_KINDS = ("nan", "raise", "hang", *KILL_POINTS)

# the layout axis a kill point needs (its size must be > 1)
_NEEDS_AXIS = {"kill-tp": "tp", "kill-send": "pp", "kill-dp": "dp"}
# what the comm ledger (kernels.collectives) calls the operations of each kill point
_LEDGER_KINDS = {"kill-tp": ("all_reduce", "all_gather", "reduce_scatter"), "kill-send": ("send",)}


class FaultPlan:
    """The faults :data:`INJECT_ENV` asks of ``rank`` in this attempt: ``plan.has("nan", step)``.

    The trainer calls :meth:`install` once (hooks for the kill points planned here; none when
    nothing is planned), :meth:`before_step` before each step (which also tells the hooks the
    step), :meth:`in_save` inside each checkpoint save, and :meth:`close` at the end.
    """

    def __init__(self, rank: int, spec: str | None = None, attempt: int | None = None) -> None:
        spec = os.environ.get(INJECT_ENV, "") if spec is None else spec
        if attempt is None:
            attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.rank = rank
        self.faults: set[tuple[str, int]] = set()
        self.kinds: set[str] = set()  # every rank's, so every rank checks the layout alike
        self.step = 0
        """The step being computed (set by :meth:`before_step`; the hooks compare with it)."""
        self._hooks = contextlib.ExitStack()
        kills = 0
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                kind, where = item.split("@")
                at_rank, step = (int(v) for v in where.split(":"))
            except ValueError:
                raise ValueError(
                    f"{INJECT_ENV}={spec!r}: expected kind@rank:step items, e.g. nan@1:3"
                ) from None
            if kind not in FAULT_KINDS:
                raise ValueError(f"{INJECT_ENV}: fault {kind!r}, expected one of {FAULT_KINDS}")
            self.kinds.add(kind)
            if kind in KILL_POINTS:
                kills += 1
                if kills - 1 != attempt:
                    continue
            if at_rank == rank:
                self.faults.add((kind, step))

    def has(self, kind: str, step: int) -> bool:
        return (kind, step) in self.faults

    def install(self, engine, optimizer: torch.optim.Optimizer) -> None:
        """Check the kill points fit the layout (on every rank alike) and hook those planned for
        this rank into ``engine`` (a :class:`~triton_parallel_layers.training.engine.Engine`) and
        ``optimizer``."""
        for kind in sorted(self.kinds & set(_NEEDS_AXIS)):
            axis = _NEEDS_AXIS[kind]
            if getattr(engine.dims, axis) == 1:
                raise ValueError(f"{INJECT_ENV}: {kind} needs a layout with {axis} > 1")
        for kind, step in sorted(self.faults):
            kill = self._killer(kind, step)
            if kind in ("kill-forward", "kill-backward"):
                held = [  # the layers this rank holds (with parameters, none on meta)
                    m
                    for m in engine.model.pipeline_layers()
                    if (ps := list(m.parameters())) and not any(p.is_meta for p in ps)
                ]
                layer = held[len(held) // 2]
                if kind == "kill-forward":
                    handle = layer.register_forward_pre_hook(lambda *_, kill=kill: kill())
                else:
                    param = next(p for p in layer.parameters() if p.requires_grad)
                    handle = param.register_hook(lambda _grad, kill=kill: kill())
                self._hooks.callback(handle.remove)
            elif kind in _LEDGER_KINDS:  # the ledger sees every collective and send as it starts
                ledger = self._hooks.enter_context(record_comm())
                kinds = _LEDGER_KINDS[kind]
                ledger.record = lambda op, *_, kill=kill, kinds=kinds: (
                    kill() if op in kinds else None
                )
            elif kind == "kill-dp":
                ddps = [engine.ddp] if engine.ddp is not None else []
                ddps += [s.ddp for s in engine.stages or [] if s.ddp is not None]
                for ddp in ddps:  # the engine's gradient-reduction hook (grad_reduce.py)
                    ddp.grad_reduce.before_bucket.append(kill)
            elif kind == "kill-optim":
                handle = optimizer.register_step_pre_hook(lambda *_, kill=kill: kill())
                self._hooks.callback(handle.remove)

    def _killer(self, kind: str, step: int) -> Callable[[], None]:
        def kill() -> None:
            if self.step == step:
                _kill(self.rank, kind, step)

        return kill

    def before_step(self, step: int) -> None:
        """The ``raise``, ``hang`` and ``kill`` faults planned for ``step``, which the hooks are
        told is now computed."""
        self.step = step
        if self.has("raise", step):
            raise OSError(f"injected fault ({INJECT_ENV}) on rank {self.rank} before step {step}")
        if self.has("hang", step):
            time.sleep(3600)
        if self.has("kill", step):
            _kill(self.rank, "kill", step)

    def in_save(self, step: int) -> None:
        """The ``kill-save`` fault planned for the checkpoint after ``step``."""
        if self.has("kill-save", step):
            _kill(self.rank, "kill-save", step)

    def close(self) -> None:
        """Remove the hooks (a process that trains again must not inherit them)."""
        self._hooks.close()


def _kill(rank: int, kind: str, step: int) -> NoReturn:
    """SIGKILL this process, saying first where and when (tests measure the restart time from
    the ``time`` stamp)."""
    print(
        f"fault injection: rank {rank} SIGKILLs itself in step {step}, {KILL_POINTS[kind]} "
        f"({kind}), time {time.time():.3f}",
        file=sys.stderr,
    )
    _flush()
    os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()  # pragma: no cover - the signal ends the process
