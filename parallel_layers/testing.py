"""Run a function on every rank of a process group: the multi-process test harness.

Starting a process that imports torch and joins a process group costs seconds; paying that for
every test case would make the suite crawl. A :class:`WorkerPool` starts ``world_size`` worker
processes once, joins them into a gloo group once, and then runs any number of functions on all
ranks, returning each rank's result::

    pool = WorkerPool(world_size=2)
    results = pool.run(my_test_body, 17, dtype=torch.float32)   # [rank0_result, rank1_result]
    pool.close()

The function and its arguments travel by pickle, so the function must be importable by its
module-qualified name (a module-level function in a test file is). Inside it,
``torch.distributed`` is initialized with the pool's world group.

Failure is clean, never a hang:

* A rank that raises sends its traceback back; :meth:`WorkerPool.run` then waits a short grace
  period for the other ranks and raises :class:`DistributedError` with every failing rank's
  traceback. If some rank is stuck in a collective its partner will never enter, the pool is torn
  down (and rebuilt on the next call).
* ``timeout`` bounds each call; past it the pool is torn down and :class:`TimeoutError` names the
  ranks that did not finish.
* Process groups a function creates (meshes, TP groups) are destroyed after it returns, so one
  test's groups never leak into the next.

The backend is gloo on CPU processes unless ``TPL_TEST_BACKEND=nccl`` (or ``backend="nccl"``) asks
for NCCL with one GPU per rank: rank ``r`` takes ``cuda:r``, which is also its default device, so
the same test bodies (tensors made without a device, meshes from :class:`ParallelDims`) run on
GPUs. A pool that needs more GPUs than the machine has raises :class:`BackendUnavailable` (the
test fixture turns it into a skip with the reason).

Gloo buffers sends, so a point-to-point order that runs here may hang on NCCL: record what the
ranks post with :func:`triton_parallel_layers.parallel_layers.pipeline.p2p_check.record_p2p` and
replay it under NCCL's rule with :func:`~triton_parallel_layers.parallel_layers.pipeline.p2p_check.replay_nccl`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from triton_parallel_layers.parallel_layers.dims import free_port, init_distributed

__all__ = [
    "BackendUnavailable",
    "DistributedError",
    "WorkerPool",
    "WorkerPools",
    "run_distributed",
    "harness_backend",
]

# How long the other ranks get to finish once one rank has failed, before the pool is torn down.
_FAILURE_GRACE_S = 5.0
# How long a fresh pool may take to start and join its process group.
_STARTUP_TIMEOUT_S = 120.0


class DistributedError(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this many ranks here (NCCL with fewer GPUs than ranks)."""


_BACKENDS = ("gloo", "nccl")


def harness_backend() -> str:
    """The backend the harness uses: ``TPL_TEST_BACKEND`` (``gloo``, the default, or ``nccl``)."""
    backend = os.environ.get("TPL_TEST_BACKEND", "gloo").strip().lower() or "gloo"
    if backend not in _BACKENDS:
        raise ValueError(
            f"TPL_TEST_BACKEND={backend!r}: expected one of {_BACKENDS} (gloo on CPU processes, "
            "or nccl with one GPU per rank)"
        )
    return backend


def _check_backend(backend: str, world_size: int) -> None:
    """Raise :class:`BackendUnavailable` unless ``backend`` can run ``world_size`` ranks here."""
    if backend != "nccl":
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < world_size:
        raise BackendUnavailable(
            f"nccl with {world_size} ranks needs {world_size} GPUs (one per rank); this machine "
            f"has {gpus}: run fewer ranks, or use TPL_TEST_BACKEND=gloo"
        )


def _new_groups_since(known: set) -> list:
    import torch.distributed as dist

    pg_map = dist.distributed_c10d._world.pg_map
    return [pg for pg in list(pg_map) if pg not in known and pg is not dist.GroupMember.WORLD]


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    tasks: mp.Queue,
    results: mp.Queue,
    num_threads: int,
    backend: str,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(num_threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        if backend == "nccl":
            torch.set_default_device(torch.device("cuda", rank))
        init_distributed("cuda" if backend == "nccl" else "cpu", timeout=300)
    except Exception:  # pragma: no cover - reported to the parent
        results.put((None, rank, False, traceback.format_exc()))
        return
    results.put((None, rank, True, None))  # ready

    known_groups = set(dist.distributed_c10d._world.pg_map)
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            reply = (task_id, rank, True, value)
        except BaseException:  # noqa: BLE001 - every failure is reported, never swallowed
            reply = (task_id, rank, False, traceback.format_exc())
        for pg in _new_groups_since(known_groups):
            with contextlib.suppress(Exception):
                dist.destroy_process_group(pg)
        try:
            results.put(reply)
        except Exception:  # the value did not pickle
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` long-lived worker processes joined in one process group.

    Args:
        world_size: number of ranks.
        num_threads: intra-op threads per worker (keep ranks * threads <= cores).
        backend: ``"gloo"`` (CPU processes) or ``"nccl"`` (rank ``r`` on ``cuda:r``); ``None``
            reads ``TPL_TEST_BACKEND`` (default gloo).

    Raises:
        BackendUnavailable: on the first :meth:`run`, if nccl needs more GPUs than there are.
    """

    def __init__(
        self, world_size: int, *, num_threads: int = 1, backend: str | None = None
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: expected a positive number of ranks")
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {_BACKENDS}")
        self.world_size = world_size
        self.num_threads = num_threads
        self.backend = backend or harness_backend()
        self._procs: list[mp.process.BaseProcess] = []
        self._next_task = 0

    # -- life cycle ---------------------------------------------------------------------------
    def _start(self) -> None:
        _check_backend(self.backend, self.world_size)
        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(
                    r,
                    self.world_size,
                    port,
                    self._tasks[r],
                    self._results,
                    self.num_threads,
                    self.backend,
                ),  # fmt: skip
                daemon=True,
                name=f"tpl-worker-{r}/{self.world_size}",
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        ready = self._collect(None, _STARTUP_TIMEOUT_S, what="start-up")
        failed = {r: tb for r, (ok, tb) in ready.items() if not ok}
        if failed:
            self.close()
            raise DistributedError(_format_failures("start-up", failed))

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        if not self._procs:
            return
        for q in self._tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        deadline = time.monotonic() + 2.0
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ------------------------------------------------------------------------------
    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any
    ) -> list:
        """Call ``fn(*args, **kwargs)`` on every rank; return the ranks' results in rank order.

        Raises:
            DistributedError: some rank raised (every failing rank's traceback is in the message).
            TimeoutError: not every rank finished within ``timeout`` seconds.
        """
        if not self.alive:
            self.close()
            self._start()
        task_id = self._next_task
        self._next_task += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        replies = self._collect(task_id, timeout, what=getattr(fn, "__qualname__", repr(fn)))
        failed = {r: payload for r, (ok, payload) in replies.items() if not ok}
        if failed:
            if len(replies) < self.world_size:
                self.close()  # the others are stuck in a collective the failed rank left
            name = getattr(fn, "__qualname__", repr(fn))
            raise DistributedError(_format_failures(name, failed))
        return [replies[r][1] for r in range(self.world_size)]

    def _collect(self, task_id: int | None, timeout: float, *, what: str) -> dict:
        """Gather one reply per rank for ``task_id``; shorten the wait once a rank has failed."""
        replies: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                tid, rank, ok, payload = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead and not any(not ok for ok, _ in replies.values()):
                    self.close()
                    raise DistributedError(
                        f"{what}: worker(s) {dead} died without a reply"
                    ) from None
                continue
            if tid != task_id:
                continue  # a late reply from an earlier, abandoned call
            replies[rank] = (ok, payload)
            if not ok:
                deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
        if len(replies) < self.world_size and not any(not ok for ok, _ in replies.values()):
            missing = sorted(set(range(self.world_size)) - set(replies))
            self.close()
            raise TimeoutError(
                f"{what}: rank(s) {missing} of {self.world_size} did not finish within "
                f"{timeout:.0f} s; the worker pool was restarted"
            )
        return replies


def _format_failures(what: str, failed: dict[int, str]) -> str:
    parts = [f"{what} failed on rank(s) {sorted(failed)}:"]
    for rank in sorted(failed):
        parts.append(f"--- rank {rank} ---\n{failed[rank]}")
    return "\n".join(parts)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, **kwargs: Any
) -> list:
    """One-off: start a pool of ``world_size`` gloo ranks, run ``fn`` on all of them, stop it."""
    with WorkerPool(world_size) as pool:
        return pool.run(fn, *args, timeout=timeout, **kwargs)


class WorkerPools:
    """One lazily started :class:`WorkerPool` per world size (what the test suite shares); a
    context manager that closes them all on exit::

        with WorkerPools() as pools:
            rows = pools.run(4, measure, ...)
    """

    def __init__(self, *, num_threads: int = 1, backend: str | None = None) -> None:
        self.num_threads = num_threads
        self.backend = backend
        self._pools: dict[int, WorkerPool] = {}

    def run(
        self,
        world_size: int,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 120.0,
        **kwargs: Any,
    ) -> list:
        """``fn(*args, **kwargs)`` on every rank of the ``world_size`` pool; results by rank."""
        pool = self._pools.get(world_size)
        if pool is None:
            pool = self._pools[world_size] = WorkerPool(
                world_size, num_threads=self.num_threads, backend=self.backend
            )
        return pool.run(fn, *args, timeout=timeout, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __enter__(self) -> WorkerPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
