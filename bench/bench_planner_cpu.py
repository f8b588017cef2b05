"""The planner's predictions against measurements on this CPU machine: step time and peak memory
per rank of a set of layouts, each predicted by :func:`~triton_parallel_layers.parallel_layers.
planner.estimate` and measured by running it.

Workloads:

* ``gpt`` and ``cnn`` (world sizes 1 and 2, real layers): a small GPT and a small ResNetCNN run by
  the training engine (:func:`~triton_parallel_layers.training.engine.build_engine`: DDP over
  ``dp``, the TP plan over ``tp``, the pipeline schedules over ``pp``) plus an AdamW step, one
  thread per process.
* ``timed`` (world sizes 4 and 8): eight
  :class:`~triton_parallel_layers.parallel_layers.pipeline.TimedLayer` s whose passes sleep a fixed
  time (forward, input gradient, weight gradient: ``--layer-ms`` each), so 8 processes on 2 cores
  behave like 8 devices; run by the same pipeline stages (DDP over ``dp``) and schedules, plus
  AdamW.

The planner's inputs are measured here, never fitted to the step times: the machine by
:func:`~triton_parallel_layers.parallel_layers.planner.measure.profile_hardware` (GEMM rate, copy
bandwidth, AdamW's time per parameter, gloo collectives and point-to-point fitted to
``alpha + bytes / beta``) on the ranks that run the layouts; the models by
:func:`~triton_parallel_layers.parallel_layers.planner.profile_model` with ``time_layers=True``
(each layer's forward and forward+backward time at each microbatch size a layout uses, and its
fixed part from a second timing at half the rows, timed on every rank at once as the ranks then
share the machine; rank 0's kept).
Both are measured again in every round, beside the layouts' steps, and their medians taken, so a
change of the machine's load hits the planner's inputs and the measurements alike. The timed
layers' profile is given their declared split of the backward (``dX`` vs ``dW``).

Measured, per layout:

* **step time**: the slowest rank's wall time of ``train_step`` + ``optimizer.step()`` +
  ``zero_grad`` after a barrier; the median over ``--repeats`` rounds of ``--steps`` steps, the
  layouts of one world size interleaved round by round (so load changes hit them alike).
* **peak memory**, the quantity the planner predicts, exactly: on the busiest rank, the bytes of
  its parameters, their gradients and AdamW's state tensors after a step, plus the peak of the
  activation bytes it holds for backward during a step (autograd's saved tensors, each storage
  once, parameters excluded, and, at ``pp > 1``, the stage inputs/outputs, send buffers and
  receive buffers posted ahead that the schedule keeps: :class:`~triton_parallel_layers.parallel_layers.pipeline.ActivationMemoryTracker`).
  Not the process RSS (allocator caches, the Python heap, DDP's bucket copies are no part of it).

Reported: per layout the predicted and measured figures and errors; per workload and overall the
median absolute step-time error, the Spearman rank correlation, where the planner's choice (the
fastest predicted of the layouts measured for a workload and world size) ranks among them and how far it is from
the best measured, and the largest memory error. The load average is recorded before and after:
real-layer timings on a loaded 2-core machine are noisy (re-run on a quiet one)::

    python bench/bench_planner_cpu.py                # everything (12 minutes on 2 loaded cores)
    python bench/bench_planner_cpu.py --workloads gpt,cnn --repeats 9
    python bench/bench_planner_cpu.py --quick --out-dir /tmp/plan   # a smoke run

Writes ``plan_cpu.json``, ``plan_cpu.md`` (tables) and ``plan_cpu.png`` (predicted against
measured) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402

from triton_parallel_layers.parallel_layers import ParallelDims  # noqa: E402
from triton_parallel_layers.parallel_layers.memory import state_bytes  # noqa: E402
from triton_parallel_layers.parallel_layers.pipeline import (  # noqa: E402
    TimedLayer,
    build_stages,
    get_schedule,
    partition_layers,
)
from triton_parallel_layers.parallel_layers.planner import (  # noqa: E402
    HardwareSpec,
    Layout,
    ModelProfile,
    estimate,
    profile_model,
)
from triton_parallel_layers.parallel_layers.planner.measure import profile_hardware  # noqa: E402
from triton_parallel_layers.parallel_layers.testing import WorkerPool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("gpt", "cnn", "timed")


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """The workloads' shapes (``--quick`` shrinks them)."""

    gpt_layers: int = 4
    gpt_embed: int = 128
    gpt_heads: int = 4
    gpt_seq: int = 64
    gpt_batch: int = 8
    cnn_width: int = 16
    cnn_stages: int = 2
    cnn_blocks: int = 2
    cnn_batch: int = 32
    timed_layers: int = 8
    timed_width: int = 1024
    timed_batch: int = 8
    layer_ms: float = 10.0


class TimedStack(nn.Module):
    """``n`` :class:`TimedLayer` s in a row, with the interface the engine and profiler expect."""

    def __init__(self, n: int, width: int, layer_s: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(TimedLayer(width, layer_s, layer_s, layer_s) for _ in range(n))

    def pipeline_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @staticmethod
    def loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(y, target)


def _model(workload: str, sizes: Sizes) -> nn.Module:
    from triton_parallel_layers.models.cnn import CNNConfig, ResNetCNN
    from triton_parallel_layers.models.gpt import GPT, GPTConfig

    if workload == "timed":
        return TimedStack(sizes.timed_layers, sizes.timed_width, sizes.layer_ms / 1e3)
    if workload == "gpt":
        cfg = GPTConfig(vocab_size=256, n_layers=sizes.gpt_layers, n_heads=sizes.gpt_heads,
                        embed_dim=sizes.gpt_embed, max_seq_len=sizes.gpt_seq,
                        vocab_pad_multiple=256)  # fmt: skip
        return GPT(cfg, seed=0)
    cfg = CNNConfig(width=sizes.cnn_width, num_stages=sizes.cnn_stages,
                    blocks_per_stage=sizes.cnn_blocks)  # fmt: skip
    return ResNetCNN(cfg, seed=0)


def _plan(workload: str) -> dict:
    from triton_parallel_layers.models.cnn import CNN_TP_PLAN
    from triton_parallel_layers.models.gpt import GPT_TP_PLAN

    return {"gpt": GPT_TP_PLAN, "cnn": CNN_TP_PLAN}.get(workload, {})


def _batch(workload: str, sizes: Sizes, rows: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` samples of input and target (the same on every rank for the same step)."""
    gen = torch.Generator().manual_seed(step)
    if workload == "gpt":
        ids = torch.randint(0, 256, (rows, sizes.gpt_seq + 1), generator=gen)
        return ids[:, :-1], ids[:, 1:]
    if workload == "cnn":
        return torch.randn(rows, 1, 28, 28, generator=gen), torch.randint(
            0, 10, (rows,), generator=gen
        )
    w = sizes.timed_width
    return torch.randn(rows, w, generator=gen), torch.randn(rows, w, generator=gen)


def global_batch(workload: str, sizes: Sizes) -> int:
    return {"gpt": sizes.gpt_batch, "cnn": sizes.cnn_batch, "timed": sizes.timed_batch}[workload]


# ---------------------------------------------------------------------------------------------
# The layouts
# ---------------------------------------------------------------------------------------------
def _lay(dp=1, pp=1, tp=1, m=1, batch=8, schedule="none", chunks=1, sp=False) -> Layout:
    return Layout(dp=dp, pp=pp, tp=tp, sequence_parallel=sp, schedule=schedule, chunks=chunks,
                  microbatches=m, micro_batch_size=batch // (dp * m))  # fmt: skip


def layouts(workload: str, world: int, sizes: Sizes) -> list[Layout]:
    """The layouts measured for ``workload`` at ``world`` ranks."""
    b = global_batch(workload, sizes)
    if workload == "timed":
        # one sample per microbatch: a timed layer's pass takes its time whatever its rows
        if world == 4:
            return [_lay(pp=4, m=8, batch=b, schedule=s) for s in ("gpipe", "1f1b", "zb-h1")] + [
                _lay(pp=4, m=8, batch=b, schedule="interleaved", chunks=2),
                _lay(dp=2, pp=2, m=4, batch=b, schedule="1f1b"),
                _lay(dp=2, pp=2, m=4, batch=b, schedule="gpipe"),
            ]
        return [_lay(pp=8, m=8, batch=b, schedule=s) for s in ("gpipe", "1f1b", "zb-h1")] + [
            _lay(dp=2, pp=4, m=4, batch=b, schedule="1f1b"),
            _lay(dp=2, pp=4, m=4, batch=b, schedule="interleaved", chunks=2),
            _lay(dp=4, pp=2, m=2, batch=b, schedule="1f1b"),
        ]
    if world == 1:
        return [_lay(m=m, batch=b) for m in (1, 2, 4)]
    out = [_lay(dp=2, m=1, batch=b), _lay(dp=2, m=2, batch=b), _lay(tp=2, m=1, batch=b),
           _lay(pp=2, m=4, batch=b, schedule="gpipe"), _lay(pp=2, m=4, batch=b, schedule="1f1b"),
           _lay(pp=2, m=2, batch=b, schedule="1f1b")]  # fmt: skip
    if workload == "gpt":
        out.insert(3, _lay(tp=2, m=1, batch=b, sp=True))
    return out


# ---------------------------------------------------------------------------------------------
# Running a layout (on every rank of a worker pool)
# ---------------------------------------------------------------------------------------------
class _Runner:
    """One layout built on this rank: ``step()`` trains one step; ``memory()`` measures it."""

    def __init__(self, workload: str, layout: Layout, sizes: Sizes) -> None:
        from triton_parallel_layers.training.config import ParallelConfig
        from triton_parallel_layers.training.engine import build_engine

        self.workload, self.layout, self.sizes = workload, layout, sizes
        self.dims = dims = ParallelDims(dp=layout.dp, pp=layout.pp, tp=layout.tp)
        self.rows = global_batch(workload, sizes) // layout.dp  # this replica's share
        if workload == "timed":
            model = _model(workload, sizes)
            layers = model.pipeline_layers()
            partition = partition_layers(layers, layout.pp * layout.chunks, "params")
            self.stages = build_stages(layers, partition, dims.pp_group, dp_group=dims.dp_group)
            self.schedule = get_schedule(layout.schedule)(
                self.stages, layout.microbatches, model.loss
            )
            self.params = [p for st in self.stages for p in st.parameters()]
            self.engine = None
        else:
            parallel = ParallelConfig(
                dp=layout.dp, pp=layout.pp, tp=layout.tp, microbatches=layout.microbatches,
                schedule=layout.schedule if layout.pp > 1 else "1f1b", chunks=layout.chunks,
                sequence_parallel=layout.sequence_parallel,
            )  # fmt: skip
            self.engine = build_engine(lambda: _model(workload, sizes), _plan(workload), dims,
                                       parallel)  # fmt: skip
            self.schedule = self.engine.schedule
            self.params = [p.param for p in self.engine.params]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def _train(self, step: int) -> None:
        x, y = _batch(self.workload, self.sizes, self.rows, step)
        if self.engine is not None:
            self.engine.train_step(x, y)
        else:
            first = self.schedule.stages[0].is_first
            last = self.schedule.stages[-1].is_last
            self.schedule.step(x if first else None, y if last else None, batch_size=self.rows)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_steps(self, steps: int, first_step: int) -> list[float]:
        """Wall seconds of each of ``steps`` steps on this rank, each after a barrier."""
        out = []
        for i in range(steps):
            dist.barrier()
            start = time.perf_counter()
            self._train(first_step + i)
            out.append(time.perf_counter() - start)
        return out

    def memory(self) -> dict[str, int]:
        """This rank's exact bytes: parameters + gradients + optimizer state (after a step, the
        gradients counted as they are before ``zero_grad``), and the peak activations of a step."""
        x, y = _batch(self.workload, self.sizes, self.rows, 10**6)
        if self.engine is not None:
            self.engine.train_step(x, y, track_memory=True)
            activations = self.engine.peak_saved_bytes
        else:
            self.schedule.set_track_memory(True)
            self.schedule.step(x if self.schedule.stages[0].is_first else None,
                               y if self.schedule.stages[-1].is_last else None,
                               batch_size=self.rows)  # fmt: skip
            self.schedule.set_track_memory(False)
            activations = self.schedule.peak_activation_bytes
        self.optimizer.step()
        held = state_bytes(self.params, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "params": held["param_bytes"],
            "grads": held["grad_bytes"],
            "optimizer": held["optimizer_bytes"],
            "activations": activations,
        }


_RUNNERS: dict[tuple, _Runner] = {}


def _measure_world(
    cases: list[tuple[str, Layout]], sizes: Sizes, repeats: int, steps: int, warmup: int,
    hw_kwargs: dict,
) -> dict:  # fmt: skip
    """Every rank: build each layout and measure its memory; then, round by round, measure the
    machine (``profile_hardware``), profile each model (at each microbatch size a layout uses;
    every rank at once, rank 0's kept) and time every layout. Measuring the planner's inputs in the same
    rounds as the layouts makes a change of the machine's load hit both alike."""
    world = dist.get_world_size()
    runners = []
    for workload, layout in cases:
        key = (workload, layout, sizes)
        if key not in _RUNNERS:
            _RUNNERS[key] = _Runner(workload, layout, sizes)
        runners.append(_RUNNERS[key])
    rows = []
    for r in runners:
        mem = r.memory()
        total = torch.tensor([sum(mem.values())], dtype=torch.float64)
        every = [torch.zeros_like(total) for _ in range(world)]
        dist.all_gather(every, total)
        busiest = int(torch.stack(every).argmax())
        box = [mem]
        dist.broadcast_object_list(box, src=busiest)
        r.time_steps(warmup, 0)
        rows.append({"memory": box[0], "samples": []})
    keys = sorted({(w, lay.micro_batch_size) for w, lay in cases})
    hardware: list[str] = []
    profiles: dict[str, list[str]] = {f"{w}/{b}": [] for w, b in keys}
    for rep in range(repeats):
        hardware.append(profile_hardware(**hw_kwargs).to_json())
        # every rank profiles at once, sharing the machine as the ranks of a layout do (as
        # devices of a node would profile side by side); rank 0's profile is kept
        for w, b in keys:
            profiles[f"{w}/{b}"].append(model_profile(w, sizes, b).to_json())
            dist.barrier()
        order = range(len(runners)) if rep % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            local = torch.tensor(runners[i].time_steps(steps, 1000 * rep), dtype=torch.float64)
            slowest = local.clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            rows[i]["samples"] += slowest.tolist()
    return {"rows": rows, "hardware": hardware, "profiles": profiles}


def median_spec(specs: list[HardwareSpec]) -> HardwareSpec:
    """One spec from several rounds' measurements: the median of each measured figure."""
    med = statistics.median
    measured = json.loads(json.dumps(specs[0].measured))
    measured["gemm_flops"] = {
        k: med([s.measured["gemm_flops"][k] for s in specs]) for k in measured["gemm_flops"]
    }
    for key in ("copy_bandwidth", "optimizer_s_per_param", "memory_bytes"):
        measured[key] = med([s.measured[key] for s in specs])
    for kind, fits in measured["collectives"].items():
        for n, fit in fits.items():
            for k in fit:
                fit[k] = med([s.measured["collectives"][kind][n][k] for s in specs])
    return replace(
        specs[0],
        peak_flops=dict(measured["gemm_flops"]),
        memory_bandwidth=measured["copy_bandwidth"],
        measured=measured,
        source=f"{specs[0].source}; medians of {len(specs)} rounds",
    )


def median_profile(profiles: list[ModelProfile]) -> ModelProfile:
    """One profile from several rounds': the median of each layer's measured times (and of
    their fixed parts)."""
    out = profiles[0]
    for i, layer in enumerate(out.layers):
        for key in [k for k in vars(layer) if k.endswith("seconds")]:
            values = [getattr(p.layers[i], key) for p in profiles]
            if values[0] is not None:
                setattr(layer, key, statistics.median(values))
    return out


def _pool_run(pool: WorkerPool, fn, *args) -> list:
    """``pool.run`` with one retry: on a loaded machine 8 processes may not start in time."""
    try:
        return pool.run(fn, *args, timeout=3600)
    except TimeoutError:
        return pool.run(fn, *args, timeout=3600)


# ---------------------------------------------------------------------------------------------
# Profiles, predictions, statistics
# ---------------------------------------------------------------------------------------------
def model_profile(workload: str, sizes: Sizes, micro_batch: int) -> ModelProfile:
    """The planner's profile of ``workload`` at ``micro_batch`` samples, with measured layer
    times; for the timed layers, also their declared ``dW`` share of the backward."""
    torch.set_num_threads(1)
    model = _model(workload, sizes)
    x, y = _batch(workload, sizes, micro_batch, 0)
    profile = profile_model(model, x, plan=_plan(workload), dtype="fp32", time_layers=True,
                            repeats=5, loss=(model.loss, y))  # fmt: skip
    if workload == "timed":
        for lp, layer in zip(profile.layers, model.pipeline_layers()):
            share = layer.weight_grad_s / (layer.input_grad_s + layer.weight_grad_s)
            lp.weight_grad_seconds = share * (lp.seconds - lp.forward_seconds)
    return profile


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 1.0


def summarize(rows: list[dict]) -> dict:
    """Median |error| of step time, Spearman of predicted vs measured, the planner's choice per
    (workload, world) against the best measured, and the memory errors."""
    time_err = [abs(r["time_error"]) for r in rows]
    mem_err = [abs(r["memory_error"]) for r in rows]
    choices = []
    for key in sorted({(r["workload"], r["world"]) for r in rows}):
        group = [r for r in rows if (r["workload"], r["world"]) == key]
        if len(group) < 2:
            continue
        chosen = min(group, key=lambda r: r["predicted_s"])
        best = min(group, key=lambda r: r["measured_s"])
        rank = sorted(r["measured_s"] for r in group).index(chosen["measured_s"]) + 1
        choices.append({
            "workload": key[0], "world": key[1], "layouts": len(group),
            "chosen": chosen["layout"], "best_measured": best["layout"],
            "chosen_rank": rank, "chosen_over_best": chosen["measured_s"] / best["measured_s"] - 1,
        })  # fmt: skip
    return {
        "layouts": len(rows),
        "median_abs_time_error": statistics.median(time_err),
        "max_abs_time_error": max(time_err),
        "spearman": spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]),
        "max_abs_memory_error": max(mem_err),
        "median_abs_memory_error": statistics.median(mem_err),
        "choices": choices,
        "worst_choice_over_best": max((c["chosen_over_best"] for c in choices), default=0.0),
    }


def compare(workload: str, world: int, layout: Layout, measured: dict, profile: ModelProfile,
            hardware: HardwareSpec) -> dict:  # fmt: skip
    """One row: the planner's estimate of ``layout`` against its measurement."""
    est = estimate(profile, hardware, layout, dtype="fp32")
    mem = measured["memory"]
    step = statistics.median(measured["samples"])
    peak = sum(mem.values())
    return {
        "workload": workload,
        "world": world,
        "layout": str(layout),
        "layout_fields": asdict(layout),
        "predicted_s": est.step_time,
        "measured_s": step,
        "measured_iqr_s": _iqr(measured["samples"]),
        "time_error": est.step_time / step - 1,
        "predicted_bubble": est.bubble_fraction,
        "predicted_peak_bytes": est.peak_memory,
        "measured_peak_bytes": peak,
        "measured_memory": mem,
        "memory_error": est.peak_memory / peak - 1,
        "samples": len(measured["samples"]),
    }


def _iqr(x: list[float]) -> float:
    q = statistics.quantiles(x, n=4) if len(x) > 1 else [x[0]] * 3
    return q[2] - q[0]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run(workloads: tuple[str, ...], worlds: tuple[int, ...], sizes: Sizes, repeats: int,
        steps: int, warmup: int, hw_kwargs: dict, log=print) -> dict:  # fmt: skip
    """Profile, measure and predict every layout of ``workloads`` at ``worlds``; the rows and
    the summary (what the bench writes)."""
    plan_worlds = {"gpt": (1, 2), "cnn": (1, 2), "timed": (4, 8)}
    rows: list[dict] = []
    hardware: dict[int, dict] = {}
    for world in worlds:
        cases = [(w, lay) for w in workloads if world in plan_worlds[w]
                 for lay in layouts(w, world, sizes)]  # fmt: skip
        if not cases:
            continue
        with WorkerPool(world) as pool:
            out = _pool_run(pool, _measure_world, cases, sizes, repeats, steps, warmup, hw_kwargs)
        spec = median_spec([HardwareSpec.from_json(h) for h in out[0]["hardware"]])
        hardware[world] = json.loads(spec.to_json())
        profiles = {
            key: median_profile([ModelProfile.from_json(p) for p in texts])
            for key, texts in out[0]["profiles"].items()
        }
        measured = out[0]["rows"]
        log(f"world {world}: {spec.source}; GEMM {spec.peak_flops['fp32'] / 1e9:.1f} GFLOP/s, "
            f"copy {spec.memory_bandwidth / 1e9:.1f} GB/s")  # fmt: skip
        for (w, lay), meas in zip(cases, measured):
            row = compare(w, world, lay, meas, profiles[f"{w}/{lay.micro_batch_size}"], spec)
            rows.append(row)
            log(f"{w:5s} world {world} {row['layout']:<36} predicted {row['predicted_s'] * 1e3:8.1f}"
                f" ms  measured {row['measured_s'] * 1e3:8.1f} ms ({row['time_error']:+6.1%})  "
                f"peak {row['predicted_peak_bytes'] / 1e6:7.3f} / "
                f"{row['measured_peak_bytes'] / 1e6:7.3f} MB ({row['memory_error']:+6.1%})",
                flush=True)  # fmt: skip
    summary = {"all": summarize(rows)}
    for w in workloads:
        sel = [r for r in rows if r["workload"] == w]
        if sel:
            summary[w] = summarize(sel)
    return {"rows": rows, "summary": summary, "hardware": hardware}


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    markers = {"gpt": "o", "cnn": "s", "timed": "^"}
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red"}
    for ax, (pred, meas, unit, scale) in zip(axes, (
        ("predicted_s", "measured_s", "step time (ms)", 1e3),
        ("predicted_peak_bytes", "measured_peak_bytes", "peak memory per rank (MB)", 1e-6),
    )):  # fmt: skip
        lo, hi = float("inf"), 0.0
        for r in rows:
            x, y = r[meas] * scale, r[pred] * scale
            lo, hi = min(lo, x, y), max(hi, x, y)
            ax.scatter(x, y, marker=markers[r["workload"]], color=colors.get(r["world"], "k"),
                       s=36, alpha=0.8)  # fmt: skip
        line = [lo * 0.8, hi * 1.25]
        ax.plot(line, line, color="black", lw=0.8)
        for f in (0.9, 1.1):
            ax.plot(line, [v * f for v in line], color="gray", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"predicted {unit}")
    s = summary["all"]
    axes[0].set_title(f"step time: median |error| {s['median_abs_time_error']:.1%}, "
                      f"Spearman {s['spearman']:.3f}", fontsize=10)  # fmt: skip
    axes[1].set_title(f"peak memory: max |error| {s['max_abs_memory_error']:.1%}", fontsize=10)
    handles = [plt.Line2D([], [], marker=m, ls="", color="gray", label=w)
               for w, m in markers.items()]  # fmt: skip
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=f"world {n}")
                for n, c in colors.items()]  # fmt: skip
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    meta, summary = result["meta"], result["summary"]
    lines = [
        "# Planner: predicted against measured on this CPU machine",
        "",
        f"{meta['machine']}, torch {meta['torch']}, gloo, 1 thread per process; {meta['date']}; "
        f"load average (1 min) {meta['load_before']:.2f} before, {meta['load_after']:.2f} after. "
        f"Command: `{meta['command']}`.",
        "",
        "| workload | layouts | median abs step-time error | max | Spearman | planner's choice: "
        "measured rank, over best | max abs memory error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        picks = "; ".join(f"w{c['world']} {c['workload']}: #{c['chosen_rank']}/{c['layouts']}, "
                          f"{c['chosen_over_best']:+.1%}" for c in s["choices"])  # fmt: skip
        lines.append(
            f"| {name} | {s['layouts']} | {s['median_abs_time_error']:.1%} | "
            f"{s['max_abs_time_error']:.1%} | {s['spearman']:.3f} | {picks} | "
            f"{s['max_abs_memory_error']:.2%} |"
        )
    lines += [
        "",
        "| workload | world | layout | predicted ms | measured ms (IQR) | error | predicted MB | "
        "measured MB | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['workload']} | {r['world']} | {r['layout']} | {r['predicted_s'] * 1e3:.1f} | "
            f"{r['measured_s'] * 1e3:.1f} ({r['measured_iqr_s'] * 1e3:.1f}) | "
            f"{r['time_error']:+.1%} | {r['predicted_peak_bytes'] / 1e6:.3f} | "
            f"{r['measured_peak_bytes'] / 1e6:.3f} | {r['memory_error']:+.2%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated, of gpt, cnn, timed")  # fmt: skip
    parser.add_argument(
        "--worlds", default="1,2,4,8", help="world sizes (gpt/cnn: 1, 2; timed: 4, 8)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per world")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per layout")
    parser.add_argument("--layer-ms", type=float, default=Sizes.layer_ms,
                        help="timed layers: milliseconds per pass")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps (a smoke run)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the results go")
    args = parser.parse_args(argv)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: {w!r} is not one of {WORKLOADS}")
    worlds = tuple(int(n) for n in args.worlds.split(","))
    sizes = Sizes(layer_ms=args.layer_ms)
    hw_kwargs: dict = {}
    if args.quick:
        sizes = Sizes(gpt_layers=2, gpt_embed=64, gpt_seq=16, cnn_width=8, cnn_blocks=1,
                      cnn_batch=8, layer_ms=1.0)  # fmt: skip
        args.repeats, args.steps, args.warmup = 1, 1, 1
        hw_kwargs = dict(gemm_size=128, message_bytes=(1 << 10, 1 << 16), repeats=2)
    load_before = os.getloadavg()[0]
    result = run(workloads, worlds, sizes, args.repeats, args.steps, args.warmup, hw_kwargs)
    result["meta"] = {
        "machine": cpu_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "sizes": asdict(sizes),
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "command": " ".join(
            ["python bench/bench_planner_cpu.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "plan_cpu.md").write_text(markdown(result))
    plot(result["rows"], result["summary"], out / "plan_cpu.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
