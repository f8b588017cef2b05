"""The command-line entry behind ``scripts/train_gpt.py``, ``scripts/train_lstm.py`` and ``scripts/train_cnn.py``.

One run, on every rank::

    main(kind, argv)                    # parse flags into the config dataclasses
      task.validate(layout, world)      # before any process group: one-line errors
      check the --resume checkpoint     # meta.json: same model? same optimizer?
      init the process group            # nccl on CUDA (one GPU per local rank), gloo on CPU
      Trainer.setup()                   # ParallelDims, build_engine, optimizer, load checkpoint
      Trainer.fit()                     # steps, evaluation, checkpoints, progress; summary

**Errors.** Known error types (bad flags, a layout that does not fit, a missing, corrupt or
foreign checkpoint, a missing optional package, a diverged loss) end the run with one line on
rank 0 (``error: ...``) and exit status 1 on every rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
    """Parse flags, validate, train; returns the exit status (0, or 1 after a one-line error on
    rank 0). ``argv`` defaults to ``sys.argv[1:]``."""
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
    created = False
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
        if run.resume is not None:
            resume, meta = check_resume(run.resume, out, task, optim)
        data_info = task.load_data()
        created = init_distributed(timeout=run.timeout)
        rank = dist.get_rank()
        planned = None
        if parallel.layout == "auto":
            from triton_parallel_layers.training.auto_layout import choose_layout

            parallel, planned = choose_layout(
                task, parallel, dist.get_world_size(), verbose=rank == 0
            )
        trainer = Trainer(
            task, parallel, optim, run, resume, meta, on_step, data_info, planned_layout=planned
        )
        trainer.setup()
        trainer.fit()
        return 0
    except (*KNOWN_ERRORS, CheckpointException) as e:
        if rank == 0:
            print(f"error: {one_line_error(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if created and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


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
