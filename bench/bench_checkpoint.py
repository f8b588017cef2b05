"""What checkpointing costs a training run: no checkpoints, blocking saves, and ``--async-checkpoint``.

The trainer (:class:`~triton_parallel_layers.training.trainer.Trainer`, as ``scripts/train_gpt.py``
runs it) trains a GPT on 2 CPU processes (gloo) for ``--steps`` steps, three times per round,
side by side in one run:

* ``none``: no checkpoint during the run;
* ``sync``: a checkpoint every ``--interval`` steps, written before training goes on
  (``torch.distributed.checkpoint.save``, then the atomic rename);
* ``async``: the same checkpoints with ``--async-checkpoint`` (the state copied to host memory,
  then written by a background thread; the next save waits for the previous one).

A step's time is the wall time between the ends of two consecutive steps (the ``time`` of
``metrics.jsonl``), so it includes the save made after the earlier one; the first step (warm-up)
is left out, and the run's final checkpoint (after the last step) too. Reported: the mean step
time of each mode over every round and its overhead against ``none``, the median step time, and
the stall: how long each save during the run kept the training loop waiting (the time inside
``Trainer.save``; with ``--async-checkpoint`` the copy to host memory, plus any wait for the
previous save). The modes alternate within each round (in turned order every other round), so a
change of machine load hits all three alike; the load average before and after is recorded.

    python bench/bench_checkpoint.py            # writes bench/results/checkpoint_overhead_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name, write_results  # noqa: E402

MODES = ("none", "sync", "async")


def train(out: Path, mode: str, model: dict, layout: tuple[int, int, int], steps: int,
          interval: int) -> dict:  # fmt: skip
    """One run on this rank: the step end times, the stall of each save during the run, the
    parameter count and the size of a checkpoint."""
    from triton_parallel_layers.training.config import OptimConfig, ParallelConfig, RunConfig
    from triton_parallel_layers.training.tasks import GPTTask, GPTTaskConfig
    from triton_parallel_layers.training.trainer import Trainer

    run = RunConfig(
        max_steps=steps, batch_size=model["batch_size"], eval_interval=0,
        ckpt_interval=0 if mode == "none" else interval, keep_checkpoints=2,
        async_checkpoint=mode == "async", out=str(out), progress=False, plot=False,
        log_interval=0,
    )  # fmt: skip
    cfg = {k: v for k, v in model.items() if k != "batch_size"}
    task = GPTTask(GPTTaskConfig(**cfg, data_bytes=400_000, eval_batches=1, sample_tokens=0), run)
    dp, pp, tp = layout
    trainer = Trainer(task, ParallelConfig(dp=dp, pp=pp, tp=tp), OptimConfig(), run)
    trainer.setup()
    stalls, save = [], trainer.save

    def timed_save(**kwargs):
        t0 = time.perf_counter()
        path = save(**kwargs)
        if not kwargs.get("wait"):  # not the final save, after the last step
            stalls.append(time.perf_counter() - t0)
        return path

    trainer.save = timed_save
    trainer.fit()
    final = out / "checkpoints" / f"step_{steps:08d}"
    return {
        "times": [r["time"] for r in trainer.history if "time" in r],
        "stalls": stalls,
        "params": trainer.num_params,
        "checkpoint_bytes": sum(f.stat().st_size for f in final.iterdir()),
    }


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per mode: the mean and median step time (steps 2..N of every round), the overhead of the
    mean against ``none``, the mean stall per save."""
    rows = {}
    for mode, results in runs.items():
        steps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
        stalls = [s for r in results for s in r["stalls"]]
        rows[mode] = {
            "mean_step_s": statistics.fmean(steps), "median_step_s": statistics.median(steps),
            "steps": len(steps), "saves": len(stalls),
            "mean_stall_s": statistics.fmean(stalls) if stalls else 0.0,
        }  # fmt: skip
    base = rows["none"]["mean_step_s"]
    for row in rows.values():
        row["overhead"] = row["mean_step_s"] / base - 1
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| checkpointing | mean step time (s) | overhead vs none | median step time (s) | "
        "training stalled per save (s) | steps, saves timed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in rows.items():
        stall = f"{r['mean_stall_s']:.3f}" if r["saves"] else "-"
        lines.append(
            f"| {mode} | {r['mean_step_s']:.3f} | {r['overhead']:+.1%} | "
            f"{r['median_step_s']:.3f} | {stall} | {r['steps']}, {r['saves']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=21, help="steps per run (default 21)")
    parser.add_argument("--interval", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel size (2 ranks: dp=1)")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs write their folders (default: a temporary folder, "
                        "removed at the end)")  # fmt: skip
    args = parser.parse_args(argv)

    from triton_parallel_layers.parallel_layers.testing import WorkerPools

    model = dict(n_layers=args.n_layers, embed_dim=args.embed_dim, n_heads=4,
                 seq_len=args.seq_len, batch_size=args.batch_size)  # fmt: skip
    layout = (2 // args.tp, 1, args.tp)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_checkpoint-"))
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    load_before = os.getloadavg()
    started = time.time()
    try:
        with WorkerPools() as pools:
            for i in range(args.rounds):
                order = MODES if i % 2 == 0 else MODES[::-1]  # neither mode always runs first
                for mode in order:
                    out = work / f"{mode}{i}"
                    result = pools.run(2, train, out, mode, model, layout, args.steps,
                                       args.interval, timeout=1800)[0]  # fmt: skip
                    runs[mode].append(result)
                    print(f"round {i + 1}: {mode} done", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs)
    load_after = os.getloadavg()
    record = {
        "machine": cpu_name(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": load_after,
        "minutes": (time.time() - started) / 60,
        "model": model,
        "params": runs["none"][0]["params"],
        "checkpoint_bytes": runs["sync"][0]["checkpoint_bytes"],
        "layout": dict(zip(("dp", "pp", "tp"), layout)),
        "steps": args.steps,
        "interval": args.interval,
        "rounds": args.rounds,
        "results": rows,
        "raw": runs,
    }
    text = table(rows)
    print(text)
    markdown = (
        "Checkpoint overhead on the step time (bench/bench_checkpoint.py)\n\n"
        f"Machine: {record['machine']}, 2 gloo processes, 1 thread each; load average (1, 5, 15 "
        f"min) {', '.join(f'{x:.1f}' for x in load_before)} before and "
        f"{', '.join(f'{x:.1f}' for x in load_after)} after (the machine was shared). GPT "
        f"{args.n_layers} layers, E={args.embed_dim}, sequences of {args.seq_len}, batch "
        f"{args.batch_size}, {record['params'] / 1e6:.2f}M parameters, AdamW; layout "
        f"dp={layout[0]} tp={layout[2]}; a checkpoint (model, Adam moments, RNG) is "
        f"{record['checkpoint_bytes'] / 1e6:.1f} MB. {args.rounds} rounds of {args.steps} "
        f"steps per mode, a checkpoint every {args.interval} steps; the modes alternate within "
        "each round.\n\n" + text + "\n"
    )
    write_results(args.out, "checkpoint_overhead_cpu", record, markdown)
    return record


if __name__ == "__main__":
    main()
