"""Training configuration as dataclasses, and the command line built from them.

Every field of a config dataclass is a command-line flag (``n_layers`` -> ``--n-layers``); its type
gives the parser (``bool`` fields become ``--flag/--no-flag``) and the docstring under the field
its help text. ``__post_init__`` validates what one config can check alone; :mod:`triton_parallel_layers.training.tasks`
checks the layout against the model and the world size, before anything distributed is built.

A field whose default is ``None`` takes its value from the model preset (``--model tiny``) or
from another flag; the help text says which.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCHEDULE_NAMES",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "build_parser",
    "from_args",
]

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1")
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "fp32", "bf16")
GRAD_REDUCE_DTYPES = ("fp32", "bf16")
DP_SHARD_MODES = ("ddp", "fsdp")
FSDP_ZB_H1 = (
    "--dp-shard=fsdp does not run the zb-h1 schedule: its deferred weight-gradient passes (W) "
    "compute a layer's weight gradient after the layer's backward has returned, when FSDP2 has "
    "already freed the gathered parameters and reduce-scattered the gradients; use "
    "--dp-shard=ddp with zb-h1, or --schedule gpipe, 1f1b or interleaved with fsdp"
)


def _positive(name: str, value: Any, *, allow_none: bool = False, zero: bool = False) -> None:
    if value is None and allow_none:
        return
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        want = "a non-negative int" if zero else "a positive int"
        raise ValueError(f"--{name.replace('_', '-')}={value!r}: expected {want}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')}={value!r}: expected one of {list(choices)}")


@dataclass
class ParallelConfig:
    """The (dp, pp, tp) layout and how the pipeline and tensor parallelism run."""

    layout: str = "manual"
    """manual: the --dp/--pp/--tp/--schedule/--microbatches/--chunks/--sequence-parallel flags; auto: the planner picks them for this world size (profiles the model and the machine, prints the best layouts)."""
    dp: int = 1
    """Data-parallel degree (DDP replicas, each fed its share of the global batch)."""
    pp: int = 1
    """Pipeline-parallel degree (stages the layer sequence is cut into)."""
    tp: int = 1
    """Tensor-parallel degree (ranks each layer is sharded over; innermost mesh axis)."""
    schedule: str = "1f1b"
    """Pipeline schedule when pp > 1: gpipe, 1f1b, interleaved or zb-h1."""
    microbatches: int | None = None
    """Microbatches per step (gradient accumulation at pp=1); default 2*pp when pp > 1, else 1."""
    chunks: int | None = None
    """Model chunks (virtual stages) per pipeline rank; default 2 for interleaved, else 1."""
    sequence_parallel: bool = False
    """Shard activations between the tensor-parallel layers along the sequence (GPT)."""
    overlap: bool = False
    """Overlap the sequence-parallel all-gather/reduce-scatter with the matmuls (needs --sequence-parallel)."""
    grad_reduce_dtype: str = "fp32"
    """Dtype of the data-parallel gradient all-reduce: fp32 (exact) or bf16 (half the bytes; the sum is rounded to bf16)."""
    dp_shard: str = "ddp"
    """Data parallelism over dp: ddp (DistributedDataParallel: whole parameters, gradients and optimizer state on every rank) or fsdp (FSDP2 fully_shard: each rank holds 1/dp of them; not with the zb-h1 schedule)."""

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp"):
            _positive(name, getattr(self, name))
        _positive("microbatches", self.microbatches, allow_none=True)
        _positive("chunks", self.chunks, allow_none=True)
        _choice("schedule", self.schedule, SCHEDULE_NAMES)
        _choice("layout", self.layout, ("manual", "auto"))
        _choice("grad_reduce_dtype", self.grad_reduce_dtype, GRAD_REDUCE_DTYPES)
        _choice("dp_shard", self.dp_shard, DP_SHARD_MODES)
        if self.microbatches is None:
            self.microbatches = 2 * self.pp if self.pp > 1 else 1
        if self.chunks is None:
            self.chunks = 2 if (self.schedule == "interleaved" and self.pp > 1) else 1
        if self.overlap and not self.sequence_parallel:
            raise ValueError("--overlap needs --sequence-parallel (it overlaps the SP collectives)")
        if self.pp == 1 and self.chunks != 1:
            raise ValueError(f"--chunks={self.chunks} needs pp > 1 (chunks are pipeline stages)")
        if self.dp_shard == "fsdp" and self.pp > 1 and self.schedule == "zb-h1":
            raise ValueError(FSDP_ZB_H1)
        if self.dp_shard == "fsdp" and self.grad_reduce_dtype != "fp32":
            raise ValueError(
                f"--grad-reduce-dtype={self.grad_reduce_dtype} is a DDP option (a comm hook); "
                "FSDP2's reduce-scatter runs in the gradients' dtype: use --dp-shard=ddp, or "
                "--grad-reduce-dtype=fp32 with fsdp"
            )
        if self.pp > 1:
            from triton_parallel_layers.parallel_layers.pipeline import get_schedule

            get_schedule(self.schedule).check(self.pp, self.microbatches, self.chunks)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def describe(self) -> str:
        """``"dp=1 pp=2 tp=2 (1f1b, 4 microbatches)"``."""
        parts = [f"dp={self.dp} pp={self.pp} tp={self.tp}"]
        extra = []
        if self.pp > 1:
            extra.append(self.schedule + (f" x{self.chunks} chunks" if self.chunks > 1 else ""))
        if self.microbatches > 1:
            extra.append(f"{self.microbatches} microbatches")
        if self.sequence_parallel:
            extra.append("sequence parallel" + (" + overlap" if self.overlap else ""))
        if self.dp_shard == "fsdp":
            extra.append("FSDP2")
        return parts[0] + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    optimizer: str = "adamw"
    """adamw, adam or sgd (momentum)."""
    lr: float | None = None
    """Peak learning rate; default: the preset's."""
    lr_schedule: str = "cosine"
    """Decay after warm-up: cosine, linear or constant."""
    warmup_steps: int | None = None
    """Linear warm-up steps; default 10% of --max-steps (at most 200)."""
    min_lr_ratio: float = 0.1
    """The decay ends at lr * min_lr_ratio."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices (biases and norm weights get none)."""
    beta1: float = 0.9
    """Adam's beta1."""
    beta2: float = 0.95
    """Adam's beta2."""
    momentum: float = 0.9
    """SGD's momentum."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over all ranks) to this; 0 turns clipping off."""

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _positive("warmup_steps", self.warmup_steps, allow_none=True, zero=True)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr={self.lr}: expected a positive learning rate")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio={self.min_lr_ratio}: expected a value in [0, 1]")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be non-negative")


@dataclass
class RunConfig:
    """Length, evaluation, checkpoints, output and numerics of a run."""

    max_steps: int | None = None
    """Optimizer steps to train for (in all, counting resumed ones); default: the preset's."""
    batch_size: int | None = None
    """Global batch (sequences or images per step, over all dp ranks); default: the preset's."""
    eval_interval: int = 50
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    ckpt_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    async_checkpoint: bool = False
    """Write checkpoints in the background (torch.distributed.checkpoint.async_save): a save stalls training only while the state is copied to host memory; each checkpoint still appears complete or not at all, and the next save and the end of the run wait for it."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (the newest); 0 keeps all."""
    out: str | None = None
    """Run folder (metrics.jsonl, loss.png, summary.json, checkpoints/); default runs/<model>."""
    resume: str | None = field(default=None, metadata={"nargs": "?", "const": "latest"})
    """Resume from a checkpoint: --resume alone takes the run folder's latest; or give a path; auto: the latest if there is one, else start afresh (the default of a job torchrun --max-restarts restarted)."""
    eval_only: bool = False
    """Only evaluate the --resume checkpoint (the GPT also samples), at this run's layout."""
    seed: int = 0
    """Seed of the initialization, the data order and dropout."""
    dtype: str = "auto"
    """Compute dtype: fp32, or bf16 (autocast; fp32 master weights); auto: bf16 on GPU, fp32 on CPU."""
    log_interval: int = 10
    """Without a terminal: print a progress line every this many steps."""
    progress: bool = True
    """Show a progress bar on rank 0 (when stderr is a terminal)."""
    plot: bool = True
    """Write loss.png at the end (needs matplotlib)."""
    peak_tflops: float | None = None
    """Peak bf16 TFLOP/s of one accelerator for the MFU estimate; default: known GPUs' table."""
    timeout: float = 600.0
    """Seconds a collective may wait before the process group gives up."""
    max_skipped_steps: int = 5
    """Optimizer steps skipped in a row (a non-finite loss or gradient norm on any rank) before the run stops; 0 stops at the first."""

    def __post_init__(self) -> None:
        _positive("max_steps", self.max_steps, allow_none=True)
        _positive("batch_size", self.batch_size, allow_none=True)
        for name in (
            "eval_interval", "ckpt_interval", "keep_checkpoints", "log_interval",
            "max_skipped_steps",
        ):  # fmt: skip
            _positive(name, getattr(self, name), zero=True)
        _choice("dtype", self.dtype, DTYPES)


# ---------------------------------------------------------------------------------------------
# Dataclass <-> argparse
# ---------------------------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields of dataclass ``cls`` (``{field: text}``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # pragma: no cover - source not available
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[type, bool]:
    """``(int, True)`` for ``int | None``; ``(int, False)`` for ``int``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


class _RankZeroParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors print on rank 0 only (every rank still exits 2)."""

    def error(self, message: str) -> typing.NoReturn:
        if int(os.environ.get("RANK", "0")) == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser(description: str, groups: dict[str, type]) -> argparse.ArgumentParser:
    """A parser with one argument group per config dataclass in ``groups`` (title -> class)."""
    parser = _RankZeroParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    seen: set[str] = set()
    for title, cls in groups.items():
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in seen:
                raise ValueError(f"flag --{f.name} defined by two config classes")
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            base, _ = _base_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            # argparse %-formats help texts: a literal % in a field's doc must reach it as %%.
            help_text = (docs.get(f.name) or "").replace("%", "%%") or None
            kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
            if base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = base
                kwargs["metavar"] = base.__name__.upper()
                kwargs.update(f.metadata)
            group.add_argument(flag, **kwargs)
    return parser


def from_args(args: argparse.Namespace, cls: type) -> Any:
    """An instance of dataclass ``cls`` from the parsed ``args`` (its own fields only)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init}
    return cls(**values)
