"""The training loop shared by ``scripts/train_gpt.py`` and ``scripts/train_cnn.py``; their
command-line entry (flags, checks before any process group, one-line errors) is
:mod:`triton_parallel_layers.training.cli`.

``Trainer.setup()`` builds ``ParallelDims``, the engine, the optimizer and loads a checkpoint;
``Trainer.fit()`` runs the steps, evaluation, checkpoints and progress, then the summary.

A step: the learning rate of the schedule at this step; this rank's rows of the global batch
(:mod:`triton_parallel_layers.training.data`); :meth:`triton_parallel_layers.training.engine.Engine.train_step` (plain or pipelined);
the global gradient norm clipped; the optimizer step; the loss averaged over ``dp``.

**Non-finite guard.** Each rank's loss rides in the gradient norm's all-reduce (no collective of
its own), so a non-finite loss or gradient on any rank makes the norm NaN on every rank, and every
rank skips that optimizer step alike. Skipped steps still consume their batch; they are logged
(``"skipped": true`` in ``metrics.jsonl``, ``skipped_steps`` in the summary), and more than
``--max-skipped-steps`` of them in a row stop the run with an error.

**Checkpoints** (:mod:`triton_parallel_layers.parallel_layers.checkpoint`) hold the model and optimizer state under
single-device names (DTensors over the TP mesh, so any layout loads them), each rank's RNG state
(``rng/rank<r>/...``, restored only at the same layout), and in ``meta.json`` the step (which is the
data position: batches are addressed by step), the LR schedule's state, the optimizer's
hyperparameters, the model's description and the layout. ``--resume`` at the same layout continues
bit for bit; at another layout it continues from the same weights and optimizer moments.
``--async-checkpoint`` writes them in a background thread (training waits only for the copy to host
memory), as atomically; the next save and the end of the run wait for the one in flight.

"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import all_reduce_, record_comm
from triton_parallel_layers.parallel_layers.checkpoint import (
    AsyncCheckpoint,
    find_checkpoint,
    init_optimizer_state_,
    load_checkpoint,
    model_state,
    optimizer_state,
    read_meta,
    save_checkpoint,
    save_checkpoint_async,
)
from triton_parallel_layers.parallel_layers.dims import ParallelDims
from triton_parallel_layers.parallel_layers.init import name_seed
from triton_parallel_layers.parallel_layers.memory import state_bytes
from triton_parallel_layers.training.config import (
    OptimConfig,
    ParallelConfig,
    RunConfig,
)
from triton_parallel_layers.training.engine import Engine, build_engine
from triton_parallel_layers.training.fault import FaultMonitor, FaultPlan
from triton_parallel_layers.training.report import (
    Reporter,
    format_summary,
    gather_from_ranks,
    gpu_peak_tflops,
    peak_memory_bytes,
    plot_metrics,
)

__all__ = ["FORMAT", "LRSchedule", "Trainer"]

FORMAT = "triton-parallel-layers/train-v1"


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------
@dataclass
class LRSchedule:
    """Linear warm-up to ``lr``, then cosine or linear decay to ``lr * min_lr_ratio`` at
    ``max_steps`` (or constant). A pure function of the step: its state is the step."""

    lr: float
    warmup_steps: int
    max_steps: int
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    last_step: int = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of the step after ``step`` steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1.0 - t
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])


def _make_optimizer(engine: Engine, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Matrices decay, vectors (biases, norm weights) do not; groups are named for checkpoints."""
    decay = [p.param for p in engine.params if p.param.dim() >= 2]
    other = [p.param for p in engine.params if p.param.dim() < 2]
    wd = 0.0 if cfg.optimizer == "adam" else cfg.weight_decay
    groups = [
        {"params": ps, "weight_decay": w, "name": n}
        for ps, w, n in ((decay, wd, "decay"), (other, 0.0, "no_decay"))
        if ps
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """Trains ``task`` at ``parallel``'s layout. Every rank builds one; see the module docstring.

    ``on_step(step, record)`` is called on every rank after each step (tests use it to stop a
    run as if it were killed).
    """

    task: Any
    parallel: ParallelConfig
    optim: OptimConfig
    run: RunConfig
    resume: Path | None = None
    resume_meta: dict | None = None
    on_step: Callable[[int, dict], None] | None = None
    task_data_info: dict | None = None
    """What ``task.load_data()`` returned (loaded in ``setup`` when ``None``)."""
    monitor: FaultMonitor | None = None
    """Told where the run is (:attr:`FaultMonitor.phase`), for failure reports."""
    planned_layout: dict | None = None
    """What ``--layout auto``'s planner said (kept in the summary)."""
    history: list[dict] = field(default_factory=list)

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Layout, model, optimizer, data and (with ``resume``) the checkpoint's state."""
        p = self.parallel
        self.dims = ParallelDims(dp=p.dp, pp=p.pp, tp=p.tp)
        dims = self.dims
        self.rank = dims.rank
        self.out = Path(self.run.out or f"runs/{self.task.name}")
        self.ckpt_root = self.out / "checkpoints"
        # restarts of a `torchrun --max-restarts` job so far (each one is the same run)
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if self.rank == 0 and self.resume is None and self.attempt == 0:
            _move_aside_previous_run(self.out)
        # dropout and any other randomness: one stream per (dp, pp) position, shared by TP ranks
        torch.manual_seed(name_seed(self.run.seed, f"rng/dp{dims.dp_rank}/pp{dims.pp_rank}"))
        if dims.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dims.device)
        if self.task_data_info is None:
            self.task_data_info = self.task.load_data()
        dtype = self.run.dtype
        if dtype == "auto":
            dtype = "bf16" if dims.device.type == "cuda" else "fp32"
        self.dtype = dtype
        self.engine = build_engine(
            self.task.build_model,
            self.task.plan,
            dims,
            p,
            autocast_dtype=torch.bfloat16 if dtype == "bf16" else None,
        )
        self.num_params = self.engine.num_parameters()
        self.max_steps = self.run.max_steps or self.task.default_steps
        lr = self.optim.lr or self.task.default_lr
        warmup = self.optim.warmup_steps
        if warmup is None:
            warmup = min(200, max(1, self.max_steps // 10))
        self.schedule = LRSchedule(
            lr, warmup, self.max_steps, self.optim.lr_schedule, self.optim.min_lr_ratio
        )
        self.optimizer = _make_optimizer(self.engine, self.optim, lr)
        self.step = 0
        self.skipped_steps = 0  # steps whose optimizer step was skipped (non-finite), this session
        self.skipped_in_a_row = 0
        self.step_report: dict | None = None  # this session's first step (fit)
        self.notes: list[str] = []
        self._pending: AsyncCheckpoint | None = None  # the async save in flight
        self._ckpt_group = None
        if self.run.async_checkpoint and dims.world_size > 1:
            # the background saves' collectives need a group no other thread uses meanwhile
            self._ckpt_group = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.run.timeout)
            )
        if self.resume is not None:
            path = find_checkpoint(self.resume)
            self._load(path, self.resume_meta or read_meta(path))
        self.faults = FaultPlan(self.rank)  # test hook (fault.INJECT_ENV): nothing when unset
        self.faults.install(self.engine, self.optimizer)

    def _layout(self) -> dict:
        p = self.parallel
        return {
            "dp": p.dp, "pp": p.pp, "tp": p.tp, "schedule": p.schedule,
            "microbatches": p.microbatches, "chunks": p.chunks,
            "sequence_parallel": p.sequence_parallel,
        }  # fmt: skip

    # -- checkpoints ----------------------------------------------------------------------------
    def _rng_keys(self) -> dict[str, torch.Tensor]:
        keys = {f"rng/rank{self.rank}/cpu": torch.get_rng_state()}
        if self.dims.device.type == "cuda":
            keys[f"rng/rank{self.rank}/cuda"] = torch.cuda.get_rng_state(self.dims.device)
        return keys

    def state_dict(self, *, optimizer: bool = True, rng: bool = True) -> dict[str, Any]:
        """This rank's checkpoint entries (see :mod:`triton_parallel_layers.parallel_layers.checkpoint`)."""
        mesh = self.dims.tp_mesh
        state: dict[str, Any] = model_state(self.engine.params, mesh)
        if optimizer:
            state.update(optimizer_state(self.optimizer, self.engine.params, mesh))
        if rng:
            state.update(self._rng_keys())
        return state

    def _phase(self, text: str) -> None:
        if self.monitor is not None:
            self.monitor.phase = text

    def save(self, *, wait: bool = False) -> Path:
        """Checkpoint the state after ``self.step`` steps (every rank calls it). With
        ``--async-checkpoint`` the checkpoint is written in the background (``wait``: wait for
        it); the previous one is waited for first."""
        self.wait_for_checkpoint()
        self._phase(f"step {self.step}: checkpoint save")
        meta = {
            "format": FORMAT,
            "model": self.task.model_meta(),
            "layout": self._layout(),
            "world_size": self.dims.world_size,
            "optimizer": {
                "name": self.optim.optimizer,
                "param_groups": [
                    {k: v for k, v in g.items() if k != "params"}
                    for g in self.optimizer.param_groups
                ],
            },
            "scheduler": self.schedule.state_dict(),
            "data": {"position": self.step, **(self.task_data_info or {})},
            "items_seen": self.step * self.task.items_per_step,
            "seed": self.run.seed,
            "last_loss": self.history[-1].get("loss") if self.history else None,
        }
        self.schedule.last_step = self.step
        meta["scheduler"] = self.schedule.state_dict()
        state = self.state_dict()
        keep = self.run.keep_checkpoints
        if self.run.async_checkpoint:
            self._pending = save_checkpoint_async(
                self.ckpt_root, self.step, state, meta, keep=keep, process_group=self._ckpt_group
            )
            self.faults.in_save(self.step)  # test hook: killed while the save is in flight
            path = self._pending.path
            if wait:
                self.wait_for_checkpoint()
        else:
            self.faults.in_save(self.step)  # test hook: killed as the others enter the save
            path = save_checkpoint(self.ckpt_root, self.step, state, meta, keep=keep)
        self._saved_step = self.step
        return path

    def wait_for_checkpoint(self) -> None:
        """Wait for the checkpoint being written in the background, if any (raises
        :class:`CheckpointError` if writing it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._phase(f"step {self.step}: waiting for the checkpoint {pending.path.name}")
            pending.wait()

    def _load(self, path: Path, meta: dict) -> None:
        """Load model, optimizer, schedule, data position and (same layout) RNG state."""
        same_layout = all(
            meta.get("layout", {}).get(k) == getattr(self.parallel, k) for k in ("dp", "pp", "tp")
        )
        init_optimizer_state_(self.optimizer)
        state = self.state_dict(rng=same_layout)
        load_checkpoint(path, state)
        if same_layout:
            torch.set_rng_state(state[f"rng/rank{self.rank}/cpu"])
            if self.dims.device.type == "cuda":
                torch.cuda.set_rng_state(state[f"rng/rank{self.rank}/cuda"], self.dims.device)
        else:
            old = meta.get("layout", {})
            self.notes.append(
                f"resharded: saved at dp={old.get('dp')} pp={old.get('pp')} tp={old.get('tp')}, "
                f"loaded at {self.parallel.describe()} (same weights and optimizer state; "
                "RNG streams restart)"
            )
        saved_groups = {g.get("name"): g for g in meta.get("optimizer", {}).get("param_groups", [])}
        for g in self.optimizer.param_groups:
            for k, v in saved_groups.get(g.get("name"), {}).items():
                if k not in ("params", "name"):
                    g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
        self.schedule.load_state_dict(meta.get("scheduler", {"last_step": meta["step"]}))
        self.step = int(meta["step"])
        self._saved_step = self.step
        data = meta.get("data", {})
        info = self.task_data_info or {}
        if data.get("fingerprint") and data.get("fingerprint") != info.get("fingerprint"):
            self.notes.append(
                f"the training data differs from the checkpoint's ({data.get('corpus')} "
                f"{data.get('fingerprint')} then, {info.get('corpus')} {info.get('fingerprint')} "
                "now): batches after the resume differ from an uninterrupted run"
            )
        self.loaded_from = path

    # -- the loop -------------------------------------------------------------------------------
    def _evaluate(self) -> dict:
        return self.task.evaluate(self.engine)

    def fit(self) -> dict:
        """Train from ``self.step`` to ``max_steps``; evaluate, checkpoint, report. Returns the
        summary (on every rank; rank 0 also prints it and writes the run folder)."""
        dims, engine, task, run = self.dims, self.engine, self.task, self.run
        device = dims.device
        rep = Reporter(
            self.out, self.rank, self.max_steps, self.step, task.unit,
            progress=run.progress, log_interval=run.log_interval,
        )  # fmt: skip
        rep.print(
            f"{task.name}: {self.num_params / 1e6:.2f}M parameters | layout "
            f"{self.parallel.describe()} | {dims.world_size} x {device.type} ({dims.backend}) | "
            f"{self.dtype} | global batch {task.batch_size} ({task.items_per_step} {task.unit}) | "
            f"{self.optim.optimizer} lr {self.schedule.lr:g} {self.schedule.kind}, warm-up "
            f"{self.schedule.warmup_steps}"
        )
        rep.print(f"data: {task.describe_data()} | run folder {self.out}")
        if getattr(self, "loaded_from", None) is not None:
            restarted = f" (torchrun restart {self.attempt})" if self.attempt else ""
            rep.print(f"resumed from {self.loaded_from} at step {self.step}{restarted}")
            rep.log({"step": self.step, "resumed_from": str(self.loaded_from),
                     "attempt": self.attempt, "time": time.time()})  # fmt: skip
        for note in self.notes:
            rep.print(f"note: {note}")
        if self.run.eval_only:
            self.max_steps = self.step
        start_step = self.step
        step_times: list[float] = []
        first_loss = None
        recent: list[float] = []  # this session's last losses, for a less noisy final figure
        last_eval: dict = {}
        try:
            while self.step < self.max_steps:
                lr = self.schedule.lr_at(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self._phase(f"step {self.step + 1}: data")
                x, y = task.train_batch(self.step, dims.dp_rank, dims.dp)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                self.faults.before_step(self.step + 1)
                self._phase(f"step {self.step + 1}: forward and backward")
                measure = self.step == start_step  # the step report (report.py): memory too
                t0 = time.perf_counter()
                with record_comm() as ledger:
                    loss = engine.train_step(x, y, track_memory=measure)
                    if self.faults.has("nan", self.step + 1):
                        loss = loss * float("nan")  # test hook (fault.INJECT_ENV)
                    self._phase(f"step {self.step + 1}: gradient norm and optimizer step")
                    # NaN on every rank when any rank's loss or gradient is not finite
                    grad_norm = engine.clip_grad_norm_(self.optim.grad_clip, loss)
                    if dims.dp > 1:
                        all_reduce_(loss, dims.dp_group)
                        loss = loss / dims.dp
                # The step's one host-device sync: the loss and the norm read back together,
                # which decides (alike on every rank) whether the optimizer steps.
                loss_value, grad_norm = torch.stack([loss.float(), grad_norm]).tolist()
                finite = math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                if measure:
                    memory = {
                        "saved_activation_peak_bytes": engine.peak_saved_bytes,
                        **state_bytes([p.param for p in engine.params], self.optimizer),
                    }
                    self.step_report = {
                        "step": self.step + 1,
                        "comm": ledger.summary(),
                        "comm_bytes": ledger.total_bytes,
                        **memory,
                    }
                self.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                self.step += 1
                step_times.append(dt)
                if finite:
                    self.skipped_in_a_row = 0
                    first_loss = loss_value if first_loss is None else first_loss
                    recent = [*recent[-9:], loss_value]
                    record = {
                        "step": self.step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "step_seconds": dt,
                        f"{task.unit}_per_s": task.items_per_step / dt,
                        f"{task.unit}_seen": self.step * task.items_per_step,
                        "time": time.time(),
                    }
                else:
                    record = self._skip(self.step, lr, dt, rep)
                record["comm_bytes"] = dict(ledger.bytes_sent)
                if measure:
                    record.update(memory)  # this rank's (every rank's: summary.json)
                evaluate = run.eval_interval and self.step % run.eval_interval == 0
                if evaluate and self.step < self.max_steps:
                    self._phase(f"step {self.step}: evaluation")
                    last_eval = self._evaluate()
                    record.update(last_eval)
                    rep.print(
                        f"step {self.step:>6} | train loss {loss_value:.4f} | "
                        + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                    )
                self.history.append(record)
                rep.log(record)
                rep.step(self.step, loss_value, task.items_per_step / dt, lr)
                if self.on_step is not None:
                    self.on_step(self.step, record)
                if (
                    run.ckpt_interval
                    and self.step % run.ckpt_interval == 0
                    and self.step < self.max_steps
                ):
                    self.save()
        finally:
            rep.close()
            self.faults.close()

        self._phase(f"step {self.step}: final evaluation")
        final_eval = self._evaluate()
        if self.history and self.step > start_step:
            self.history[-1].update(final_eval)
            rep.log({"step": self.step, **final_eval})
        checkpoint = None
        if self.step > start_step and getattr(self, "_saved_step", None) != self.step:
            checkpoint = str(self.save(wait=True))
        elif self.step > start_step:
            checkpoint = str(self.ckpt_root / f"step_{self.step:08d}")
        self.wait_for_checkpoint()
        extra = task.final_report(engine)
        last_loss = sum(recent) / len(recent) if recent else None
        summary = self._summary(step_times, first_loss, last_loss, final_eval, checkpoint)
        summary["last_loss_steps"] = len(recent)
        summary.update(extra)
        if self.rank == 0:
            self._write_outputs(summary, rep)
        return summary

    def _skip(self, step: int, lr: float, dt: float, rep: Reporter) -> dict:
        """Step ``step`` had a non-finite loss or gradient norm on some rank: every rank skipped
        its optimizer step alike. Count it (its metrics record, returned); stop after
        ``--max-skipped-steps`` in a row."""
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        rep.print(
            f"step {step:>6} | skipped: non-finite loss or gradient norm ({self.skipped_in_a_row} "
            "in a row)"
        )
        limit = self.run.max_skipped_steps
        if self.skipped_in_a_row > limit:
            raise FloatingPointError(
                f"the loss or gradient norm was not finite in {self.skipped_in_a_row} consecutive "
                f"steps (up to step {step}; --max-skipped-steps {limit}): training diverged (try "
                "a lower --lr or --grad-clip, or resume from an earlier checkpoint)"
            )
        return {
            "step": step, "skipped": True, "skipped_in_a_row": self.skipped_in_a_row,
            "skipped_steps": self.skipped_steps, "lr": lr, "step_seconds": dt, "time": time.time(),
        }  # fmt: skip

    def _summary(self, times, first_loss, last_loss, final_eval, checkpoint) -> dict:
        task, dims = self.task, self.dims
        steady = times[1:] if len(times) > 1 else times
        items_per_s = task.items_per_step * len(steady) / sum(steady) if steady else 0.0
        peak = self.run.peak_tflops or gpu_peak_tflops(dims.device)
        flops = task.flops_per_item(self.num_params)
        tflops = flops * items_per_s / dims.world_size / 1e12 if flops else None
        mfu = tflops / peak if (tflops and peak and self.dtype == "bf16") else None
        return {
            "model": task.name,
            "num_params": self.num_params,
            "layout": self.parallel.describe(),
            **({"layout_plan": self.planned_layout} if self.planned_layout else {}),
            "world_size": dims.world_size,
            "device": dims.device.type
            if dims.device.type == "cpu"
            else torch.cuda.get_device_name(dims.device),
            "backend": dims.backend,
            "dtype": self.dtype,
            "steps_run": len(times),
            "skipped_steps": self.skipped_steps,
            "final_step": self.step,
            "train_seconds": sum(times),
            "first_loss": first_loss if first_loss is not None else float("nan"),
            "last_loss": last_loss if last_loss is not None else float("nan"),
            "eval": final_eval,
            "unit": task.unit,
            "items_per_s": items_per_s,
            "tflops_per_device": tflops if dims.device.type == "cuda" else None,
            "peak_tflops": peak,
            "mfu": mfu,
            "peak_memory_bytes": gather_from_ranks(peak_memory_bytes(dims.device)),
            "step_report": self._step_report(),
            "checkpoint": checkpoint,
            "metrics": str(self.out / "metrics.jsonl"),
        }

    def _step_report(self) -> dict | None:
        """The memory and communication report of this session's first step, every rank's (a
        collective); ``None`` when no step ran."""
        ranks = gather_from_ranks(self.step_report)
        if any(r is None for r in ranks):
            return None
        return {"step": ranks[0]["step"], "per_rank": [
            {"rank": rank, **{k: v for k, v in r.items() if k != "step"}}
            for rank, r in enumerate(ranks)
        ]}  # fmt: skip

    def _write_outputs(self, summary: dict, rep: Reporter) -> None:
        import json

        if self.run.plot and rep.metrics_path.exists():
            png = self.out / "loss.png"
            note = plot_metrics(
                rep.metrics_path, png, f"{self.task.name}, {self.parallel.describe()}"
            )
            if note:
                print(note, flush=True)
            else:
                summary["plot"] = str(png)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if summary.get("steps_run"):
            print(format_summary(summary), flush=True)
        else:
            print(
                f"evaluated {self.loaded_from if getattr(self, 'loaded_from', None) else 'the model'} "
                f"at step {self.step}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()),
                flush=True,
            )
        if summary.get("sample"):
            print(f"sample (prompt {self.task.cfg.prompt!r}):\n{summary['sample']}", flush=True)


def _move_aside_previous_run(out: Path) -> None:
    """A fresh run in a folder that holds another run's files: move those to ``<out>.prev-<time>``
    (nothing is deleted) and say so."""
    if not out.exists() or not any(out.iterdir()):
        return
    dest = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(out, dest)
    print(
        f"note: moved the previous run in {out} to {dest} (pass --resume to continue a run)",
        flush=True,
    )
