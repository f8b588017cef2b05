"""The command-line entry behind ``scripts/train_gpt.py``, ``scripts/train_lstm.py`` and ``scripts/train_cnn.py``.

One run, on every rank::

    main(kind, argv)                    # parse flags into the config dataclasses
      task.validate(layout, world)      # before any process group: one-line errors
      check the --resume checkpoint     # meta.json: same model? same optimizer?
      init the process group            # nccl on CUDA (one GPU per local rank), gloo on CPU
      Trainer.setup()                   # ParallelDims, build_engine, optimizer, load checkpoint
      Trainer.fit()                     # steps, evaluation, checkpoints, progress; summary

**Errors.** Known error types (bad flags, a layout that does not fit, a missing, corrupt or
foreign checkpoint, a missing optional package, a diverged loss) end the run with one line
(``error: ...``) and exit status 1 on every rank. Under ``torchrun`` (this call made the process
group) the ranks leave together through
:class:`~triton_parallel_layers.training.fault.FaultMonitor`:
a failure on some ranks only (any exception, a lost peer) ends every rank with status 1 and one
line naming the rank that failed, and SIGTERM from the launcher exits with status 1, never a
signal. Called in a process whose group exists already (tests), unknown exceptions propagate and
known ones return 1 after the line on rank 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from triton_parallel_layers.parallel_layers.checkpoint import (
    CheckpointError,
    failure_summary,
    find_checkpoint,
    read_meta,
)
from triton_parallel_layers.parallel_layers.dims import env_world_size, init_distributed
from triton_parallel_layers.training.config import (
    OptimConfig,
    ParallelConfig,
    RunConfig,
    build_parser,
    from_args,
)
from triton_parallel_layers.training.fault import FaultMonitor, exit_on_sigterm
from triton_parallel_layers.training.trainer import FORMAT, Trainer

__all__ = ["KNOWN_ERRORS", "check_resume", "main", "one_line_error", "run_main"]

KNOWN_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError, CheckpointError)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def check_resume(resume: str, out: Path, task, optim: OptimConfig) -> tuple[Path, dict]:
    """Find the checkpoint ``--resume`` names and check it fits this run; no process group
    needed, so every rank fails alike, before anything distributed exists."""
    where = out / "checkpoints" if resume == "latest" else Path(resume)
    if resume == "latest" and not where.exists():
        raise CheckpointError(f"nothing to resume: no checkpoints in {where}")
    path = find_checkpoint(where)
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this trainer (format {meta.get('format')!r})"
        )
    mine, theirs = task.model_meta(), meta.get("model", {})
    if theirs.get("kind") != mine["kind"]:
        raise CheckpointError(
            f"{path} holds a {theirs.get('kind')} model, this run trains a {mine['kind']}"
        )
    if theirs.get("config") != mine["config"]:
        diff = [
            f"{k}={theirs['config'].get(k)!r} (here {v!r})"
            for k, v in mine["config"].items()
            if theirs.get("config", {}).get(k) != v
        ]
        raise CheckpointError(
            f"{path} holds another {mine['kind']}: {', '.join(diff[:4])}; pass the same model flags"
        )
    saved_opt = meta.get("optimizer", {}).get("name")
    if saved_opt != optim.optimizer:
        raise CheckpointError(
            f"{path} was saved with --optimizer {saved_opt}, this run uses {optim.optimizer}"
        )
    return path, meta


def _resume_request(resume: str | None, out: Path) -> str | None:
    """What ``--resume`` asks for, with ``auto`` resolved: the run folder's latest checkpoint if
    it has one, else a fresh start. ``auto`` is the default of a job ``torchrun`` restarted
    (``TORCHELASTIC_RESTART_COUNT`` > 0), so ``--max-restarts`` resumes by itself."""
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"
    if resume != "auto":
        return resume
    try:
        find_checkpoint(out / "checkpoints")
    except CheckpointError:
        return None  # nothing complete saved yet: start from the beginning
    return "latest"


def one_line_error(e: BaseException) -> str:
    """``e`` as the one line after ``error:`` (whitespace folded; the type named where it helps)."""
    if isinstance(e, CheckpointException):
        return f"checkpoint failure ({failure_summary(e)})"
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ImportError | OSError | FloatingPointError | TypeError):
        text = f"{type(e).__name__}: {text}" if not isinstance(e, CheckpointError) else text
    return text


def run_main(
    description: str,
    task_cls: type,
    task_cfg_cls: type,
    argv: list[str] | None = None,
    *,
    on_step: Callable[[int, dict], None] | None = None,
) -> int:
    """Parse flags, validate, train; returns the exit status (0, or 1 after a one-line error).
    ``argv`` defaults to ``sys.argv[1:]``. A failure of a run that made its own process group of
    several ranks does not return: the process ends with status 1 (see the module docstring)."""
    parser = build_parser(
        description,
        {
            "parallel layout": ParallelConfig,
            "model and data": task_cfg_cls,
            "optimizer": OptimConfig,
            "run": RunConfig,
        },
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    created = False  # this call made the process group, so it also decides how the process ends
    monitor: FaultMonitor | None = None
    run: RunConfig | None = None
    joined = False  # init_distributed was called (it may have failed)
    if not dist.is_initialized() and env_world_size() > 1:
        exit_on_sigterm()  # this process is a rank of a launched job: stopped means failed
    try:
        parallel = from_args(args, ParallelConfig)
        task_cfg = from_args(args, task_cfg_cls)
        optim = from_args(args, OptimConfig)
        run = from_args(args, RunConfig)
        task = task_cls(task_cfg, run)
        if parallel.layout == "manual":
            task.validate(parallel, env_world_size())
        out = Path(run.out or f"runs/{task.name}")
        resume = meta = None
        if run.eval_only and run.resume is None:
            raise ValueError("--eval-only needs --resume (the checkpoint to evaluate)")
        wanted = _resume_request(run.resume, out)
        if wanted is not None:
            resume, meta = check_resume(wanted, out, task, optim)
        data_info = task.load_data()
        joined = True
        created = init_distributed(timeout=run.timeout)
        rank = dist.get_rank()
        monitor = _start_monitor(created)
        planned = None
        if parallel.layout == "auto":
            from triton_parallel_layers.training.auto_layout import choose_layout

            parallel, planned = choose_layout(
                task, parallel, dist.get_world_size(), verbose=rank == 0
            )
        trainer = Trainer(
            task, parallel, optim, run, resume, meta, on_step, data_info, monitor,
            planned_layout=planned,
        )  # fmt: skip
        trainer.setup()
        trainer.fit()
        if monitor is not None:
            monitor.stop()
        return 0
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        known = isinstance(e, (*KNOWN_ERRORS, CheckpointException))
        if not known and not created and (dist.is_initialized() or env_world_size() == 1):
            raise  # one process, or a caller's process group (tests): its traceback, its handling
        message = one_line_error(e)
        waited = _is_communication_failure(e)
        if waited:  # a peer timed out, died or reset the connection
            where = f" in {monitor.phase}" if monitor is not None else ""
            text = _GLOO_SOURCE.sub("", message).split(". This is typically caused")[0]
            message = f"communication failed{where}: {text}"
        elif not known:
            traceback.print_exc()  # a bug, not a user error: keep where it happened
        if not joined and env_world_size() > 1:
            # failed before the process group existed: join it only to leave with the others
            with contextlib.suppress(Exception):
                created = init_distributed(timeout=run.timeout if run else None)
                monitor = _start_monitor(created)
        if monitor is not None:  # every rank leaves with status 1, one line printed; no return
            monitor.fail(message, waited=waited)
        if rank == 0 or not known:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        if created and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


_GLOO_SOURCE = re.compile(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*")  # "[.../pair.cc:534] "


def _is_communication_failure(e: BaseException) -> bool:
    """A collective or point-to-point wait that timed out or lost its peer (gloo raises plain
    ``RuntimeError`` s naming its source file)."""
    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and ("gloo" in text or "NCCL" in text)
    )


def _start_monitor(created: bool) -> FaultMonitor | None:
    """For a run that owns its process group of several ranks: a :class:`FaultMonitor` that ends
    this rank when another one fails."""
    if not created or dist.get_world_size() == 1:
        return None
    return FaultMonitor().start()


def main(kind: str, argv: list[str] | None = None) -> int:
    """``main("gpt")`` / ``main("lstm")`` / ``main("cnn")``: the training scripts."""
    from triton_parallel_layers.training.tasks import (
        CNNTask,
        CNNTaskConfig,
        GPTTask,
        GPTTaskConfig,
        LSTMTask,
        LSTMTaskConfig,
    )

    if kind == "gpt":
        return run_main(
            "Train the GPT (byte-level) on the Python standard library's sources, at any "
            "(dp, pp, tp) under torchrun.",
            GPTTask,
            GPTTaskConfig,
            argv,
        )
    if kind == "lstm":
        return run_main(
            "Train the stacked LSTM (byte-level) on the Python standard library's sources, at any "
            "(dp, pp, tp) under torchrun.",
            LSTMTask,
            LSTMTaskConfig,
            argv,
        )
    return run_main(
        "Train the ResNet-style CNN on scikit-learn's digits, at any (dp, pp, tp) under torchrun.",
        CNNTask,
        CNNTaskConfig,
        argv,
    )
