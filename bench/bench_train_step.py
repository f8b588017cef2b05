"""One training step of the GPT on one GPU, eager and ``torch.compile``d: tokens/s and MFU.

The step is what ``scripts/train_gpt.py`` does at (dp, pp, tp) = (1, 1, 1): bf16 autocast forward
(``GPT`` of ``models/gpt.py``, attention through the Triton kernel), the vocabulary-parallel loss,
backward, AdamW. Measured twice, on the same initial weights and batches:

* ``eager``: the model as it is;
* ``compiled``: ``torch.compile(fullgraph=True)`` of forward + loss (Inductor on CUDA), the
  backward compiled by AOTAutograd with it; compile time reported apart from the step time.

Throughput counts the tokens of a step over its median wall time (``torch.cuda.synchronize``
around each timed step, outside the model); MFU = ``tokens/s * (6 N + 6 L S E)`` over the GPU's
dense bf16 peak (the FLOP count and peak table the trainer uses, ``training/``). The first step's
loss of both modes is recorded as well: they must agree (same weights, same batch).

Usage (from the repository root; the package need not be installed)::

    PYTHONPATH=$PWD python3 bench/bench_train_step.py --out /tmp/ts            # GPU: the 125m preset
    PYTHONPATH=$PWD python3 bench/bench_train_step.py --smoke --out /tmp/ts    # CPU, seconds

Output: ``<out>/train_step_<tag>.json``, rewritten after each mode (a timeout keeps what was
measured). ``bench/gpu_check.sh`` runs it as its last part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_name  # noqa: E402

from triton_parallel_layers.models.gpt import GPT, GPTConfig  # noqa: E402
from triton_parallel_layers.training.report import gpu_peak_tflops  # noqa: E402
from triton_parallel_layers.training.tasks import GPT_PRESETS  # noqa: E402

VOCAB = 256  # byte-level, as scripts/train_gpt.py
SMOKE = dict(n_layers=2, embed_dim=64, n_heads=4, seq_len=32)


def build(preset: dict, seed: int, device: torch.device) -> GPT:
    config = GPTConfig(
        vocab_size=VOCAB,
        n_layers=preset["n_layers"],
        n_heads=preset["n_heads"],
        embed_dim=preset["embed_dim"],
        max_seq_len=preset["seq_len"],
        vocab_pad_multiple=VOCAB,
    )
    return GPT(config, seed=seed).to(device)


def measure(
    mode: str, args: argparse.Namespace, preset: dict, device: torch.device, compile_backend: str
) -> dict:
    """Warm-up steps (compiling, for ``compiled``), then ``args.steps`` timed steps."""
    if device.type == "cuda":  # this mode's own peak (the H200 run reported the eager one twice)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(preset, args.seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    seq = preset["seq_len"]
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, VOCAB, (args.batch, seq + 1), generator=gen).to(device)
        for _ in range(args.warmup + args.steps)
    ]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_of(ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model.loss(model(ids), target)

    fn = loss_of
    if mode == "compiled":
        fn = torch.compile(loss_of, fullgraph=True, backend=compile_backend)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss = fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    first_loss = float(step(batches[0]))
    for tokens in batches[1 : args.warmup]:
        step(tokens)
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for tokens in batches[args.warmup :]:
        sync()
        t = time.perf_counter()
        step(tokens)
        sync()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_step = args.batch * seq
    n_params = model.num_parameters()
    flops_per_token = 6.0 * n_params + 6.0 * preset["n_layers"] * seq * preset["embed_dim"]
    peak = gpu_peak_tflops(device)
    tflops = tokens_per_step / step_s * flops_per_token / 1e12
    return {
        "mode": mode,
        "compile_backend": compile_backend if mode == "compiled" else None,
        "first_loss": first_loss,
        "warmup_s": warmup_s,
        "step_s_median": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "parameters": n_params,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="125m", choices=sorted(GPT_PRESETS), help="GPT preset")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation included)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument(
        "--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"]
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default=None, help="file name: train_step_<tag>.json")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a 2-layer GPT, 2 steps, on the CPU; compiled by Dynamo alone (backend 'eager')",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    preset = dict(GPT_PRESETS[args.model])
    compile_backend = "inductor"
    if args.smoke:
        preset.update(SMOKE)
        args.batch, args.warmup, args.steps = 2, 1, 1
        compile_backend = "eager"  # Dynamo capture only (fullgraph still checked)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_step_{args.tag or ('smoke' if args.smoke else device.type)}.json"
    report = {
        "machine": machine_name() if device.type == "cuda" else "cpu smoke",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model if not args.smoke else "smoke",
        "shape": {k: preset[k] for k in ("n_layers", "embed_dim", "n_heads", "seq_len")},
        "batch": args.batch,
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "peak_tflops": gpu_peak_tflops(device),
        "results": [],
    }
    for mode in args.modes:
        row = measure(mode, args, preset, device, compile_backend)
        report["results"].append(row)
        path.write_text(json.dumps(report, indent=1) + "\n")
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
        print(
            f"{mode}: {row['tokens_per_s']:,.0f} tokens/s ({row['step_s_median'] * 1e3:.1f} ms "
            f"per step, {row['tflops']:.1f} TFLOP/s{mfu}; warm-up {row['warmup_s']:.1f} s), "
            f"first loss {row['first_loss']:.4f}",
            flush=True,
        )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
