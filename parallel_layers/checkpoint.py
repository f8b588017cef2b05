"""Resharding, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP).

**Layout-free keys.** Every tensor is saved under the name it has in the *single-device* model
(``model/blocks.3.mlp.fc1.weight``), as a ``DTensor`` over the tensor-parallel mesh whose placement
says how this rank's local tensor sits in the full one::

    ColumnParallelLinear weight (out/tp, in)  -> DTensor(local, tp_mesh, [Shard(0)]), shape (out, in)
    RowParallelLinear weight    (out, in/tp)  -> DTensor(local, tp_mesh, [Shard(1)]), shape (out, in)
    a norm weight, a row bias   (E,)          -> DTensor(local, tp_mesh, [Replicate()])
    ParallelLSTM weight_ih_l0   (4H/tp, I)    -> DTensor(local as (4, H/tp, I), [Shard(1)]), (4, H, I)

(an LSTM's parameters are four gate blocks, each sharded alike, so they are saved as
``(4, H, *)`` at every tp, ``nn.LSTM``'s included: see ``param_blocks`` in ``sharding.py``)

DCP stores each tensor by its global shape and each shard by its global offset, so the checkpoint
knows nothing of the layout that wrote it: a run at another ``tp`` asks for other slices of the same
tensors and DCP reads exactly the overlapping pieces (saved at tp=2, loaded at tp=4 or tp=1). Ranks
that hold the same slice (data-parallel replicas, a replicated norm on every TP rank) write it once
(DCP deduplicates by key and offset). Pipeline stages each put their own names in the state dict,
so a checkpoint saved at ``pp=2`` is one set of names, loaded by any ``pp``. A parameter shared by
two modules (tied embeddings) is saved once under its first name; a pipeline that holds a copy of it
on another stage saves and loads the copy under that same name.

The optimizer state follows the parameters: ``optim/<param name>/<state key>``; state tensors of the
parameter's shape (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``) get the
parameter's placement, scalars (Adam's ``step``) are saved as plain tensors.

**Atomic.** :func:`save_checkpoint` writes into ``<root>/.tmp-step_<n>``, and only once DCP has
written every rank's data and its ``.metadata`` does rank 0 add ``meta.json``, rename the folder to
``<root>/step_<n>`` and then replace the ``<root>/latest`` pointer (write a temporary file, then
``os.replace``). A process killed at any moment leaves either the old ``latest`` pointing at the
previous, complete checkpoint, or the new one complete: never a pointer to a half-written one.
Leftover ``.tmp-*`` folders are removed by the next save.

**Asynchronous.** :func:`save_checkpoint_async` returns once ``dcp.async_save`` has copied the
state to host memory; a background thread writes it, and when that thread's save has finished
(every rank's data and ``.metadata`` written) rank 0 runs the same last steps in it: ``meta.json``,
the rename, the pointer. So an asynchronous checkpoint too is complete or invisible: a process
killed while one is in flight leaves ``latest`` at the previous one. The caller waits for it
(:meth:`AsyncCheckpoint.wait`) before its next save.

**What a folder holds.** ``step_<n>/`` = DCP's ``.metadata`` and ``__<rank>_0.distcp`` files, plus
``meta.json`` (written by the caller's ``meta`` dict: step, model description, layout, ...), which
can be read without any process group (:func:`read_meta`), so a run can check a checkpoint before it
builds anything distributed.

All ranks must call :func:`save_checkpoint` and :func:`load_checkpoint` (collectives); the
checkpoint folder must be visible to every rank (a shared file system for multi-node runs).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from triton_parallel_layers.parallel_layers.sharding import param_blocks, param_sharding

__all__ = [
    "AsyncCheckpoint",
    "CheckpointError",
    "ShardedParam",
    "check_keys",
    "failure_summary",
    "find_checkpoint",
    "init_optimizer_state_",
    "load_checkpoint",
    "model_state",
    "optimizer_state",
    "read_meta",
    "save_checkpoint",
    "save_checkpoint_async",
    "sharded_params",
    "to_dtensor",
]

META_FILE = "meta.json"
LATEST = "latest"
_STEP_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, unreadable or does not fit the model asking for it."""


# ---------------------------------------------------------------------------------------------
# Local tensors <-> layout-free DTensors
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardedParam:
    """One parameter as this rank holds it, and where it sits in the single-device model.

    ``tensor`` is ``torch.chunk(full, tp, dim)[tp_rank]`` of the full ``full_shape`` tensor, or the
    whole tensor when ``dim`` is ``None`` (replicated over the TP group). A gate-blocked LSTM
    parameter ``(4H/tp, *)`` is viewed as ``(4, H/tp, *)`` of a ``(4, H, *)`` ``full_shape``.
    """

    name: str
    """The parameter's name in the single-device model (its first name when shared)."""
    param: nn.Parameter
    dim: int | None
    """The tensor dim sharded over the TP group, or ``None``."""
    full_shape: torch.Size
    """The parameter's shape in the single-device model."""


def sharded_params(
    modules: Iterable[tuple[str, nn.Module]], canonical: Mapping[tuple[str, str], str] | None = None
) -> list[ShardedParam]:
    """:class:`ShardedParam` s of the parameters owned by ``modules`` (``(qualified name, module)``
    pairs, e.g. ``model.named_modules()``), each parameter once.

    ``canonical`` maps ``(module name, param name)`` to the name to save under (for a parameter
    shared by two modules, its first name); by default ``"<module name>.<param name>"``. Parameters
    on the ``meta`` device (layers held by another pipeline stage) are skipped.
    """
    out: list[ShardedParam] = []
    seen: set[int] = set()
    for mname, module in modules:
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen or param.is_meta:
                continue
            seen.add(id(param))
            qualified = f"{mname}.{pname}" if mname else pname
            name = canonical.get((mname, pname), qualified) if canonical else qualified
            dim, parts, _ = param_sharding(module, pname)
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= parts
            blocks = param_blocks(module)
            if blocks > 1:  # saved as (blocks, rows / blocks, *): each rank's a chunk of dim 1
                shape = [blocks, shape[0] // blocks, *shape[1:]]
                dim = None if dim is None else 1
            out.append(ShardedParam(name, param, dim, torch.Size(shape)))
    return out


def to_dtensor(
    local: torch.Tensor, mesh: DeviceMesh, dim: int | None, full_shape: torch.Size
) -> DTensor:
    """``local`` (this rank's chunk along ``dim`` of a ``full_shape`` tensor, or all of it) as a
    DTensor over the 1-D ``mesh``, sharing ``local``'s storage (DCP loads into it in place).

    ``local`` may itself be a ``DTensor``: FSDP2's shard, ``torch.chunk(tp_shard, dp, 0)[dp_rank]``
    over a 1-D ``dp`` mesh. It is then saved over the ``(tp, dp)`` mesh with placements
    ``[tp placement, Shard(0)]`` (the TP split first, then FSDP's split of the TP shard), so every
    rank writes only its own piece, at its global offset, and any layout reads it back."""
    placements = [Replicate() if dim is None else Shard(dim)]
    if isinstance(local, DTensor):
        if local.dim() < len(full_shape):
            raise CheckpointError(
                f"a gate-blocked parameter of shape {tuple(local.shape)} (saved as "
                f"{tuple(full_shape)}) cannot be checkpointed FSDP-sharded: use DDP for LSTMs"
            )
        mesh = _tp_dp_mesh(mesh, local.device_mesh)
        placements.append(Shard(0))
        local = local.to_local()
    if local.dim() < len(full_shape):  # a gate-blocked parameter, (4H/p, *) as (4, H/p, *)
        local = local.unflatten(0, (full_shape[0], -1))
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(
        local.detach(), mesh, placements, run_check=False, shape=full_shape, stride=stride
    )


_MESHES: dict[tuple, DeviceMesh] = {}


def _tp_dp_mesh(tp_mesh: DeviceMesh, dp_mesh: DeviceMesh) -> DeviceMesh:
    """The ``(tp, dp)`` grid of this rank's pipeline stage as a mesh in that order (the
    ``ParallelDims`` mesh is ``(pp, dp, tp)``, row-major: rank ``(d, t)`` is
    ``tp_ranks[t] + dp_ranks[d] - this rank``). Built without process groups: a DTensor in a
    checkpoint needs only its coordinates on the mesh."""
    key = (
        tp_mesh.device_type,
        *tp_mesh.mesh.flatten().tolist(),
        -1,
        *dp_mesh.mesh.flatten().tolist(),
    )
    if key not in _MESHES:
        me = dist.get_rank()
        grid = tp_mesh.mesh.flatten()[:, None] + dp_mesh.mesh.flatten()[None, :] - me  # (tp, dp)
        _MESHES[key] = DeviceMesh(
            tp_mesh.device_type, grid, mesh_dim_names=("tp", "dp"), _init_backend=False
        )
    return _MESHES[key]


def model_state(params: Iterable[ShardedParam], tp_mesh: DeviceMesh) -> dict[str, DTensor]:
    """``{"model/<name>": DTensor}`` over ``tp_mesh`` for every parameter in ``params``."""
    return {f"model/{p.name}": to_dtensor(p.param, tp_mesh, p.dim, p.full_shape) for p in params}


def optimizer_state(
    optimizer: torch.optim.Optimizer, params: Iterable[ShardedParam], tp_mesh: DeviceMesh
) -> dict[str, Any]:
    """``{"optim/<name>/<key>": value}`` of ``optimizer.state`` for ``params``.

    A state tensor with its parameter's shape gets the parameter's placement; any other tensor
    (a scalar ``step``) is saved as it is; non-tensor values are saved as objects. Call
    :func:`init_optimizer_state_` first when loading into a fresh optimizer.
    """
    out: dict[str, Any] = {}
    for p in params:
        state = optimizer.state.get(p.param, {})
        for key, value in sorted(state.items()):
            k = f"optim/{p.name}/{key}"
            if isinstance(value, torch.Tensor) and value.shape == p.param.shape and value.dim():
                out[k] = to_dtensor(value, tp_mesh, p.dim, p.full_shape)
            else:
                out[k] = value
    return out


@torch.no_grad()
def init_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (zeros) without changing any parameter, so a
    checkpoint can be loaded into it: one step with zero gradients at learning rate 0 (the moments
    stay 0, AdamW's decay multiplies by exactly 1). Parameters that already have state are left."""
    missing = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]
    if not missing:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = {p: p.grad for g in optimizer.param_groups for p in g["params"]}
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in grads:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, grad in grads.items():
        p.grad = grad


# ---------------------------------------------------------------------------------------------
# Finding and checking checkpoints (no process group needed)
# ---------------------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[Path]:
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(_STEP_PREFIX) and d.name[len(_STEP_PREFIX) :].isdigit():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[len(_STEP_PREFIX) :]))


def _is_complete(d: Path) -> bool:
    return (d / META_FILE).is_file() and (d / ".metadata").is_file()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: a checkpoint itself (it holds ``meta.json``), or a
    checkpoint root whose ``latest`` pointer (or, without one, its newest complete ``step_*``
    folder) is followed.

    Raises:
        CheckpointError: nothing there, a dangling pointer, or an incomplete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (no such file or directory)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if (path / META_FILE).exists() or (path / ".metadata").exists():
        if not _is_complete(path):
            raise CheckpointError(
                f"{path} is an incomplete checkpoint (meta.json or .metadata missing)"
            )
        return path
    pointer = path / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = path / name
        if name.startswith(_TMP_PREFIX) and not target.exists():
            # a re-save of one step was cut short after its rename (see save_checkpoint)
            name = name[len(_TMP_PREFIX) :]
            target = path / name
        if not name or not _is_complete(target):
            raise CheckpointError(
                f"{pointer} points to {name!r}, which is not a complete checkpoint"
            )
        return target
    complete = [d for d in _step_dirs(path) if _is_complete(d)]
    if not complete:
        raise CheckpointError(f"no checkpoint in {path} (no '{LATEST}' pointer, no step_* folder)")
    return complete[-1]


def read_meta(checkpoint: str | os.PathLike) -> dict:
    """The ``meta.json`` of a checkpoint folder (see :func:`find_checkpoint`)."""
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a checkpoint (no {META_FILE})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"corrupt checkpoint {path.parent}: cannot read {META_FILE} ({e})"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt checkpoint {path.parent}: {META_FILE} is not an object")
    return meta


def check_keys(checkpoint: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Check, before any collective, that ``checkpoint`` holds every key of ``state`` with the same
    global shape (reads DCP's ``.metadata`` only).

    Raises:
        CheckpointError: unreadable metadata, missing keys or other shapes, naming a few of them.
    """
    path = Path(checkpoint)
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a corrupt file
        raise CheckpointError(
            f"corrupt checkpoint {path}: cannot read .metadata ({type(e).__name__}: {e})"
        ) from None
    missing = [k for k in state if k not in saved]
    wrong = []
    for key, value in state.items():
        meta = saved.get(key)
        if isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata):
            if tuple(value.shape) != tuple(meta.size):
                wrong.append(f"{key} {tuple(meta.size)} saved, {tuple(value.shape)} here")
        elif isinstance(value, torch.Tensor) and isinstance(meta, BytesStorageMetadata):
            wrong.append(f"{key} is an object in the checkpoint, a tensor here")
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} of the {len(state)} entries this model needs "
            f"({shown}): it was saved from another model or optimizer"
        )
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} holds tensors of other shapes ({'; '.join(wrong[:3])}): it was "
            "saved from another model"
        )


# ---------------------------------------------------------------------------------------------
# Save and load (collectives)
# ---------------------------------------------------------------------------------------------
def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    keep: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Path:
    """Save ``state`` (DCP state dict: DTensors, tensors, objects) as ``<root>/step_<step>``,
    atomically (see the module docstring), and point ``<root>/latest`` at it. Every rank calls it.

    Args:
        root: the checkpoint root folder (created when missing).
        step: the training step the state is after.
        state: this rank's state dict (:func:`model_state`, :func:`optimizer_state`, ...).
        meta: JSON-serializable description written by rank 0 as ``meta.json`` (``step`` and
            ``time`` are added).
        keep: keep only the newest ``keep`` checkpoints (``None``: all).
        process_group: the group of all ranks saving (default: the world).

    Returns:
        The final checkpoint folder.
    """
    final, tmp, rank = _begin_save(Path(root), step, process_group)
    try:
        dcp.save(dict(state), storage_writer=dcp.FileSystemWriter(tmp), process_group=process_group)
    except CheckpointException as e:  # every rank gets it: the previous checkpoint stays latest
        raise CheckpointError(f"saving checkpoint {final} failed ({failure_summary(e)})") from None
    if rank == 0:
        _finish_save(final, tmp, step, meta, keep)
    _barrier(process_group)
    return final


def save_checkpoint_async(
    root: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    keep: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> AsyncCheckpoint:
    """:func:`save_checkpoint` in the background (``dcp.async_save``): returns once ``state`` is
    copied to host memory (the caller may change its tensors from then on); a thread writes it,
    and rank 0 then adds ``meta.json``, renames the folder into place and points ``latest`` at
    it, exactly as :func:`save_checkpoint` does, so the checkpoint is complete or invisible.
    Every rank calls it, and calls :meth:`AsyncCheckpoint.wait` before the next save (and
    before the process group goes away).

    ``process_group``: the save's collectives run in the background thread, concurrently with
    whatever the caller does next, so they need a group nobody else uses meanwhile: a gloo group
    of its own (``dist.new_group(backend="gloo")``, on CUDA too: the staged copy is on the host).
    Its members wait for each other at the start (a barrier) as :func:`save_checkpoint` does.
    """
    final, tmp, rank = _begin_save(Path(root), step, process_group)
    future = dcp.async_save(
        dict(state), storage_writer=dcp.FileSystemWriter(tmp), process_group=process_group
    )
    finish = (lambda: _finish_save(final, tmp, step, meta, keep)) if rank == 0 else None
    return AsyncCheckpoint(future, final, finish)


class AsyncCheckpoint:
    """A checkpoint being written in the background (:func:`save_checkpoint_async`).

    ``path`` is the folder it will have; :meth:`wait` blocks until it is complete on this rank
    (on rank 0: also renamed into place and pointed at by ``latest``) and raises
    :class:`CheckpointError` if writing it failed on any rank.
    """

    def __init__(self, future: Future, path: Path, finish: Callable[[], None] | None) -> None:
        self.path = path
        self._finish = finish
        self._error: BaseException | None = None
        self._done = threading.Event()
        future.add_done_callback(self._complete)  # runs in the writing thread

    def _complete(self, future: Future) -> None:
        try:
            future.result()
            if self._finish is not None:
                self._finish()
        except BaseException as e:  # noqa: BLE001 - raised again by wait(), in the caller
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        """Whether the save has ended (written, or failed) on this rank."""
        return self._done.is_set()

    def wait(self) -> Path:
        """Block until the save has ended; return the checkpoint folder. A failed save raises
        :class:`CheckpointError`, or the process group's own error when a peer went away."""
        self._done.wait()
        e = self._error
        if isinstance(e, CheckpointException):
            why = failure_summary(e)
            raise CheckpointError(f"saving checkpoint {self.path} failed ({why})") from None
        if e is not None:
            raise e
        return self.path


def _begin_save(
    root: Path, step: int, process_group: dist.ProcessGroup | None
) -> tuple[Path, Path, int]:
    """Rank 0 makes the save's temporary folder (removing those of killed saves); every rank
    waits for it. Returns ``(final folder, temporary folder, rank)``."""
    name = f"{_STEP_PREFIX}{step:08d}"
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}"
    rank = dist.get_rank(process_group) if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        current = _pointer_name(root)
        for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a save that was killed
            if stale.name != current:  # (a re-save killed midway may leave `latest` on one)
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(process_group)
    return final, tmp, rank


def _finish_save(
    final: Path, tmp: Path, step: int, meta: Mapping[str, Any], keep: int | None
) -> None:
    """Rank 0, once every rank's data and DCP's ``.metadata`` are written: ``meta.json``, the
    rename into place, the ``latest`` pointer, old checkpoints pruned to ``keep``."""
    root = final.parent
    body = {**meta, "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    _fsync_write(tmp / META_FILE, json.dumps(body, indent=1, sort_keys=True))
    _fsync_dir(tmp)
    if final.exists():
        # The same step saved again (a run resumed from an older checkpoint). `latest` points
        # at the complete new folder while the old one is replaced; if the rename below is
        # cut short, find_checkpoint reads the pointer to `.tmp-step_N` as `step_N`.
        _point_latest(root, tmp.name)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _point_latest(root, final.name)
    if keep is not None and keep > 0:
        for old in _step_dirs(root)[:-keep]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)


def _pointer_name(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _point_latest(root: Path, name: str) -> None:
    """Atomically make ``<root>/latest`` name ``name`` (temporary file + ``os.replace``)."""
    pointer_tmp = root / f"{LATEST}.tmp"
    _fsync_write(pointer_tmp, name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)


def load_checkpoint(
    checkpoint: str | os.PathLike,
    state: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` into ``state`` in place (tensors and DTensors are filled, object entries
    replaced), resharding to this run's layout. Every rank calls it.

    Checks the keys and global shapes first (:func:`check_keys`). Each rank checks the keys it
    loads (its own pipeline stages), so the verdicts are shared in one small exchange before
    ``dcp.load``: a checkpoint that lacks only some stage's keys fails on every rank alike, with
    the first failing rank's message, instead of leaving the others waiting inside the load.

    Raises:
        CheckpointError: a missing, incomplete, unreadable or mismatched checkpoint.
    """
    path = find_checkpoint(checkpoint)
    try:
        check_keys(path, state)
        problem = None
    except CheckpointError as e:
        problem = str(e)
    if dist.is_initialized() and dist.get_world_size(process_group) > 1:
        verdicts: list[str | None] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(verdicts, problem, group=process_group)
        problem = next((v for v in verdicts if v is not None), None)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), process_group=process_group)
    except CheckpointException as e:
        raise CheckpointError(
            f"corrupt checkpoint {path}: reading it failed ({failure_summary(e)})"
        ) from None
    return state


def failure_summary(e: CheckpointException) -> str:
    """``"<ExceptionType>: <last line of its message>"`` of the lowest failing rank."""
    failures = e.failures
    if not failures:
        return "unknown error"
    exc = failures[min(failures)][0]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
