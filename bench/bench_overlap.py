"""How much communication the overlapped sequence-parallel MLP block hides behind its matmuls.

The block is ``ColumnParallelLinear(E, 4E) -> GELU -> RowParallelLinear(4E, E)`` with
``sequence_parallel=True``, input ``(1, T/p, E)`` per rank. Each step (forward + backward, input
gradient included, as inside a network) is timed four ways, interleaved step by step in the same
processes so machine noise hits all four alike:

* ``plain``: ``overlap_comm=False``: each collective, then its matmul.
* ``overlap``: ``overlap_comm=True``: :func:`triton_parallel_layers.kernels.all_gather_matmul` and
  :func:`triton_parallel_layers.kernels.matmul_reduce_scatter` (ring-decomposed, see ``kernels/collective_matmul.py``).
* ``comm``: the step's collectives alone, same sizes: forward all-gather ``(1, T/p, E)`` and
  reduce-scatter ``(1, T, E)``, backward reduce-scatter ``(1, T, E)`` and all-gather
  ``(1, T/p, E)``, and the row bias gradient's all-reduce ``(E,)``.
* ``compute``: the step's local compute alone, no communication: the same two matmuls, GELU and
  their backward on a rank's full-sequence activations, ``(1, T, E)``.

Reported per (world size, T, E): the median over steps of the slowest rank's time (and, less
sensitive to other load on a shared machine, the fastest step: ``min_s``, ``efficiency_from_min``),
and the overlap efficiency ``(t_comm + t_compute - t_overlap) / min(t_comm, t_compute)``: 1 when
the shorter of the two is hidden entirely, 0 when nothing is, negative when overlapping costs
more than it hides. The same formula applied to ``t_plain`` is reported as a control
(``efficiency_plain``, ~0 when the plain step is indeed comm + compute; below 0 it costs more,
from the copies, bias adds and autograd work neither timing covers), and the time overlap saves
against the real plain step, ``saved_vs_plain = (t_plain - t_overlap) / min(t_comm, t_compute)``
(the efficiency with the plain step as its baseline). The ledger of
:mod:`triton_parallel_layers.kernels.collectives` checks that both paths send the same bytes.

On CPU the ranks are gloo processes with ``torch.set_num_threads(--threads)`` each: more ranks
(x threads) than cores oversubscribes the machine (the output says so), and gloo's transport
threads then compete with the matmuls for the same cores, so overlap can only hide what the
cores have spare. With several GPUs the same runs on NCCL, one GPU per rank.

Usage (from the repository root)::

    python bench/bench_overlap.py                        # gloo CPU, TP=2 and 4, default sizes
    python bench/bench_overlap.py --world-sizes 2 --sizes 4096:128 --iters 40
    python bench/bench_overlap.py --smoke --out /tmp/ov  # tiny, seconds (the test suite runs it)

Results: ``<out>/overlap_<backend>_<cpu|gpu>.json`` (machine, CPU model, torch, date, arguments,
all numbers) and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, machine_name  # noqa: E402

from triton_parallel_layers.kernels import force_backend  # noqa: E402
from triton_parallel_layers.kernels.collectives import (  # noqa: E402
    all_gather,
    all_reduce,
    record_comm,
    reduce_scatter,
)
from triton_parallel_layers.parallel_layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from triton_parallel_layers.parallel_layers.testing import free_port, run_distributed  # noqa: E402

# (tokens T, hidden E): on CPU, compute grows as T*E^2/p and communication as T*E, so small E
# is where the two are comparable (the interesting regime for overlap) and large E is
# compute-bound.
DEFAULT_SIZES = [(4096, 32), (4096, 64), (4096, 128), (2048, 256), (2048, 512)]
SMOKE_SIZES = [(64, 16), (128, 32)]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
VARIANTS = ("plain", "overlap", "comm", "compute")


# ----------------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------------


def _zero_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def _measure(
    sizes, iters: int, warmup: int, threads: int, matmul_backend: str, device: str
) -> list[dict]:
    """Time the four variants on this rank; return rows (rank 0's carry the max over ranks)."""
    with force_backend(matmul_backend):
        return _measure_all(sizes, iters, warmup, threads, device)


def _step_functions(tokens: int, hidden: int, group, dev: torch.device) -> dict:
    """The four step variants for one (tokens, hidden), as closures over their own tensors."""
    p = dist.get_world_size(group)
    ffn = 4 * hidden
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(hidden, ffn).to(dev), nn.Linear(ffn, hidden).to(dev)
    blocks = {}
    for overlap in (False, True):
        col = ColumnParallelLinear.from_linear(
            fc1, group, sequence_parallel=True, overlap_comm=overlap
        )
        row = RowParallelLinear.from_linear(
            fc2, group, sequence_parallel=True, overlap_comm=overlap
        )
        blocks[overlap] = (col, row)
    n = tokens // p
    x = torch.randn(1, n, hidden, device=dev, requires_grad=True)  # (1, T/p, E)
    dy = torch.randn(1, n, hidden, device=dev)  # (1, T/p, E)
    x_full = torch.randn(1, tokens, hidden, device=dev, requires_grad=True)  # (1, T, E)
    dy_full = torch.randn(1, tokens, hidden, device=dev)
    partial = torch.randn(1, tokens, hidden, device=dev)  # (1, T, E) partial sums
    col0, row0 = blocks[False]
    w1 = col0.weight.detach().clone().requires_grad_()  # (4E/p, E)
    b1 = col0.bias.detach().clone().requires_grad_()
    w2 = row0.weight.detach().clone().requires_grad_()  # (E, 4E/p)
    bias_grad = torch.randn(hidden, device=dev)

    def block_step(overlap: bool) -> None:
        col, row = blocks[overlap]
        y = row(F.gelu(col(x)))  # (1, T/p, E)
        y.backward(dy)
        _zero_grads(x, col.weight, col.bias, row.weight, row.bias)

    def comm_step() -> None:
        all_gather(x.detach(), group, dim=1)  # fwd: (1, T/p, E) -> (1, T, E)
        reduce_scatter(partial, group, dim=1)  # fwd: (1, T, E) -> (1, T/p, E)
        all_gather(dy, group, dim=1)  # bwd: output gradient (1, T/p, E) -> (1, T, E)
        reduce_scatter(partial, group, dim=1)  # bwd: input gradient (1, T, E) -> (1, T/p, E)
        all_reduce(bias_grad, group)  # bwd: the row bias gradient (E,)

    def compute_step() -> None:
        h = F.gelu(F.linear(x_full, w1, b1))  # (1, T, E) @ (E, 4E/p) -> (1, T, 4E/p)
        y = F.linear(h, w2)  # (1, T, 4E/p) @ (4E/p, E) -> (1, T, E)
        y.backward(dy_full)
        _zero_grads(x_full, w1, b1, w2)

    return {
        "plain": lambda: block_step(False),
        "overlap": lambda: block_step(True),
        "comm": comm_step,
        "compute": compute_step,
    }


def _measure_all(sizes, iters: int, warmup: int, threads: int, device: str) -> list[dict]:
    torch.set_num_threads(threads)
    group = dist.group.WORLD
    p, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for tokens, hidden in sizes:
        fns = _step_functions(tokens, hidden, group, dev)
        ledgers = {}
        for name in ("plain", "overlap", "comm"):
            with record_comm() as ledger:
                fns[name]()
            ledgers[name] = dict(ledger.bytes_sent)
        times = {name: [] for name in VARIANTS}
        for it in range(warmup + iters):
            order = VARIANTS[it % 4 :] + VARIANTS[: it % 4]  # rotate: no variant always first
            for name in order:
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                fns[name]()
                sync()
                if it >= warmup:
                    times[name].append(time.perf_counter() - t0)
        # The step of the slowest rank, per iteration; then the median over iterations.
        med, best = {}, {}
        for name in VARIANTS:
            t = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            med[name], best[name] = statistics.median(t.tolist()), min(t.tolist())
        t_comm, t_comp = med["comm"], med["compute"]
        # The same figure from the fastest step of each variant: less sensitive to other work on
        # a shared machine, which only ever adds time.
        eff_min = (best["comm"] + best["compute"] - best["overlap"]) / min(
            best["comm"], best["compute"]
        )
        rows.append(
            {
                "world_size": p,
                "tokens": tokens,
                "hidden": hidden,
                "ffn": 4 * hidden,
                "t_plain_s": med["plain"],
                "t_overlap_s": med["overlap"],
                "t_comm_s": t_comm,
                "t_compute_s": t_comp,
                "efficiency": (t_comm + t_comp - med["overlap"]) / min(t_comm, t_comp),
                "efficiency_plain": (t_comm + t_comp - med["plain"]) / min(t_comm, t_comp),
                "speedup": med["plain"] / med["overlap"],
                "saved_vs_plain": (med["plain"] - med["overlap"]) / min(t_comm, t_comp),
                "min_s": best,
                "efficiency_from_min": eff_min,
                "bytes_plain": ledgers["plain"],
                "bytes_overlap": ledgers["overlap"],
                "bytes_comm_alone": ledgers["comm"],
            }
        )
    return rows


def _nccl_main(rank: int, world_size: int, port: int, args: tuple, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        rows = _measure(*args, device="cuda")
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run(backend: str, world_size: int, sizes, iters: int, warmup: int, threads: int, mm: str):
    """Spawn ``world_size`` ranks on ``backend`` and return rank 0's rows."""
    if backend == "gloo":
        return run_distributed(
            _measure, world_size, sizes, iters, warmup, threads, mm, "cpu", timeout=3600
        )[0]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "rows.json")
        mp.spawn(
            _nccl_main,
            args=(world_size, free_port(), (sizes, iters, warmup, threads, mm), out_path),
            nprocs=world_size,
        )
        return json.loads(Path(out_path).read_text())


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world_sizes = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(
        len(world_sizes), 2, figsize=(12, 3.6 * len(world_sizes)), squeeze=False
    )
    colors = {
        "plain": "tab:gray",
        "overlap": "tab:blue",
        "comm": "tab:orange",
        "compute": "tab:green",
    }
    for ax_t, ax_e, p in zip(axes[:, 0], axes[:, 1], world_sizes):
        mine = [r for r in rows if r["world_size"] == p]
        labels = [f"T={r['tokens']}\nE={r['hidden']}" for r in mine]
        width = 0.2
        for j, name in enumerate(VARIANTS):
            xs = [i + (j - 1.5) * width for i in range(len(mine))]
            ax_t.bar(
                xs, [1e3 * r[f"t_{name}_s"] for r in mine], width, label=name, color=colors[name]
            )
        ax_t.set_xticks(range(len(mine)), labels)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("median step (ms)")
        ax_t.set_title(f"TP={p}: fwd+bwd step time")
        ax_t.legend(fontsize=8)
        ax_e.bar(range(len(mine)), [r["efficiency"] for r in mine], 0.4, label="overlap")
        ax_e.plot(
            range(len(mine)), [r["efficiency_plain"] for r in mine], "kx", label="plain (control)"
        )
        ax_e.plot(
            range(len(mine)),
            [r["saved_vs_plain"] for r in mine],
            "o",
            color="tab:red",
            label="(t_plain - t_overlap) / min",
        )
        ax_e.axhline(0, color="k", lw=0.5)
        ax_e.axhline(1, color="k", lw=0.5, ls="--")
        ax_e.set_xticks(range(len(mine)), labels)
        ax_e.set_ylabel("(t_comm + t_compute - t) / min")
        ax_e.set_title(f"TP={p}: overlap efficiency")
        ax_e.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _size(text: str) -> tuple[int, int]:
    tokens, hidden = text.split(":")
    return int(tokens), int(hidden)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=_size, nargs="+", help="tokens:hidden pairs")
    parser.add_argument("--iters", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument(
        "--matmul",
        choices=["auto", "ref", "triton"],
        default="auto",
        help="the overlapped path's GEMMs: auto = Triton on CUDA, torch on CPU; ref = torch "
        "(cuBLAS), the same GEMMs as the plain path, isolating the overlap",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, TP=2, a few steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.world_sizes, args.iters, args.warmup = [2], 3, 1
        args.sizes = args.sizes or SMOKE_SIZES
    sizes = args.sizes or DEFAULT_SIZES
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    for p in args.world_sizes:
        bad = [t for t, _ in sizes if t % p]
        if bad:
            parser.error(f"tokens {bad} are not divisible by world size {p}")

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    notes = []
    rows = []
    for p in args.world_sizes:
        if backend == "nccl" and p > torch.cuda.device_count():
            notes.append(f"TP={p} skipped: only {torch.cuda.device_count()} GPUs")
            continue
        if backend == "gloo" and p * args.threads > cores:
            note = (
                f"TP={p}: {p} ranks x {args.threads} thread(s) on {cores} cores: oversubscribed, "
                "ranks and gloo's transport threads time-share the cores"
            )
            notes.append(note)
            print("note:", note)
        t0 = time.perf_counter()
        got = run(backend, p, sizes, args.iters, args.warmup, args.threads, args.matmul)
        for r in got:
            r["oversubscribed"] = backend == "gloo" and p * args.threads > cores
            print(
                f"TP={p} T={r['tokens']:6d} E={r['hidden']:5d}: plain {1e3 * r['t_plain_s']:8.2f} ms"
                f"  overlap {1e3 * r['t_overlap_s']:8.2f} ms  comm {1e3 * r['t_comm_s']:8.2f} ms"
                f"  compute {1e3 * r['t_compute_s']:8.2f} ms  efficiency {r['efficiency']:+.2f}"
                f" (plain {r['efficiency_plain']:+.2f})  speedup {r['speedup']:.3f}"
                f"  saved/min {r['saved_vs_plain']:+.2f}"
            )
            if r["bytes_plain"] != r["bytes_overlap"]:
                raise RuntimeError(f"ledgers differ: {r['bytes_plain']} vs {r['bytes_overlap']}")
        print(f"TP={p}: {time.perf_counter() - t0:.0f} s")
        rows.extend(got)

    device = "gpu" if backend == "nccl" else "cpu"
    report = {
        "benchmark": "sequence_parallel_mlp_overlap",
        "machine": machine_name(),
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "backend": backend,
        "threads_per_rank": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": {
            "world_sizes": args.world_sizes,
            "sizes": [list(s) for s in sizes],
            "iters": args.iters,
            "warmup": args.warmup,
            "matmul": args.matmul,
            "smoke": args.smoke,
        },
        "efficiency_formula": "(t_comm + t_compute - t_overlap) / min(t_comm, t_compute)",
        "notes": notes,
        "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"overlap_{backend}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    title = f"seq-parallel MLP (Linear E->4E, GELU, 4E->E), {backend}, {report['machine']}"
    if notes and backend == "gloo":
        title += "\n" + "; ".join(n.split(":")[0] + " oversubscribed" for n in notes)
    plot(rows, title, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return report


if __name__ == "__main__":
    main()
