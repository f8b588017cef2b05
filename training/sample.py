"""Sample text from a GPT checkpoint at any (dp, pp, tp): ``scripts/sample_gpt.py``.

The model's shape comes from the checkpoint's ``meta.json``; the weights are loaded (resharded)
into this run's layout; every rank runs the forward passes of its stages, the last stage gathers
the vocabulary shards of the last position's logits and draws the next byte (top-k, temperature,
a seeded generator: the same text at every layout up to float rounding), and broadcasts it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from triton_parallel_layers.parallel_layers.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    model_state,
    read_meta,
)
from triton_parallel_layers.parallel_layers.dims import (
    ParallelDims,
    env_world_size,
    init_distributed,
)
from triton_parallel_layers.training.cli import KNOWN_ERRORS, one_line_error
from triton_parallel_layers.training.config import (
    DTYPES,
    ParallelConfig,
    RunConfig,
    build_parser,
    from_args,
)
from triton_parallel_layers.training.engine import build_engine
from triton_parallel_layers.training.tasks import GPTTask, GPTTaskConfig, sample_text
from triton_parallel_layers.training.trainer import FORMAT

__all__ = ["SampleConfig", "main"]


@dataclass
class SampleConfig:
    """What to sample."""

    checkpoint: str = "runs/gpt-tiny/checkpoints"
    """A checkpoint folder, or a run's checkpoints/ folder (its latest is taken)."""
    prompt: str = "def "
    """Text to continue."""
    tokens: int = 300
    """Bytes to generate."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely byte."""
    top_k: int = 40
    """Sample among the k most likely bytes (0: all)."""
    seed: int = 0
    """Seed of the sampling generator."""
    dtype: str = "auto"
    """fp32, or bf16 (autocast); auto: bf16 on GPU, fp32 on CPU."""

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"--tokens={self.tokens}: expected a positive int")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}: expected one of {list(DTYPES)}")


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the checkpoint at this layout, print a sample on rank 0."""
    parser = build_parser(
        "Sample text from a GPT checkpoint at any (dp, pp, tp) under torchrun.",
        {"parallel layout": ParallelConfig, "sampling": SampleConfig},
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    created = False
    try:
        parallel = from_args(args, ParallelConfig)
        cfg = from_args(args, SampleConfig)
        path = find_checkpoint(cfg.checkpoint)
        meta = read_meta(path)
        if meta.get("format") != FORMAT or meta.get("model", {}).get("kind") != "gpt":
            raise CheckpointError(f"{path} is not a GPT checkpoint of scripts/train_gpt.py")
        from triton_parallel_layers.models.gpt import GPTConfig

        config = GPTConfig(**meta["model"]["config"])
        task = GPTTask(
            GPTTaskConfig(seq_len=config.max_seq_len),
            RunConfig(batch_size=parallel.dp * parallel.microbatches, seed=cfg.seed),
        )
        task.config = config
        task.validate(parallel, env_world_size())
        created = init_distributed(timeout=600.0)
        rank = dist.get_rank()
        dims = ParallelDims(dp=parallel.dp, pp=parallel.pp, tp=parallel.tp)
        dtype = (
            cfg.dtype if cfg.dtype != "auto" else ("bf16" if dims.device.type == "cuda" else "fp32")
        )
        engine = build_engine(
            task.build_model,
            task.plan,
            dims,
            parallel,
            autocast_dtype=torch.bfloat16 if dtype == "bf16" else None,
        )
        load_checkpoint(path, model_state(engine.params, dims.tp_mesh))
        start = time.perf_counter()
        text = sample_text(
            engine, config, cfg.prompt, cfg.tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if rank == 0:
            print(
                f"# {path} (step {meta.get('step')}), dp={parallel.dp} pp={parallel.pp} "
                f"tp={parallel.tp}, "
                f"{cfg.tokens} bytes in {seconds:.1f} s",
                flush=True,
            )
            print(text, flush=True)
        return 0
    except (*KNOWN_ERRORS, CheckpointException) as e:
        if rank == 0:
            print(f"error: {one_line_error(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        if created and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
