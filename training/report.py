"""What a person watching a run sees and keeps: progress on rank 0, ``metrics.jsonl``, ``loss.png``,
the final summary (throughput, MFU estimate on GPU, peak memory per rank, layout, and the memory
and communication report of a step).

Only rank 0 writes; every other rank's :class:`Reporter` is silent.

**The step report** (:func:`format_step_report`): every step's messages are counted by the
communication ledger (:func:`~triton_parallel_layers.kernels.collectives.
record_comm`: Python bookkeeping per message, no device work), and the session's first step is
also measured for memory: the peak bytes held for backward (saved-tensor hooks) and the bytes of
parameters, gradients and optimizer state each rank holds
(:func:`~triton_parallel_layers.parallel_layers.memory.state_bytes`: FSDP2's by their shards). The README's "Memory and communication
report" section lists the fields.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "Reporter",
    "format_step_report",
    "gather_from_ranks",
    "gpu_peak_tflops",
    "peak_memory_bytes",
    "plot_metrics",
]

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets), matched on the device name.
_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def gpu_peak_tflops(device: torch.device) -> float | None:
    """The bf16 dense peak of ``device`` from the table above, or ``None`` (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: CUDA's max allocated bytes, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024))  # Linux reports KiB


def _fmt_rate(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def _fmt_bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f} B"


class Reporter:
    """Progress bar (or progress lines), metrics log and plot of one run, on rank 0.

    Args:
        out: the run folder.
        rank: this process's rank; only rank 0 prints and writes.
        total_steps: the run's last step.
        start_step: the step it starts (or resumes) after.
        unit: ``"tok"`` or ``"img"``.
        progress: whether to show a bar; without a terminal, lines every ``log_interval`` steps.
    """

    def __init__(
        self,
        out: Path,
        rank: int,
        total_steps: int,
        start_step: int,
        unit: str,
        *,
        progress: bool = True,
        log_interval: int = 10,
    ) -> None:
        self.out, self.active = out, rank == 0
        self.total, self.unit, self.log_interval = total_steps, unit, log_interval
        self.metrics_path = out / "metrics.jsonl"
        self.bar = None
        self._want_bar = False
        self._rate: float | None = None
        self._t0 = time.perf_counter()
        self._start = start_step
        if not self.active:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._want_bar = progress and sys.stderr.isatty()

    def _make_bar(self) -> None:
        """The tqdm bar, made at the first step (so the run's header prints above it)."""
        from tqdm import tqdm

        self._want_bar = False
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            width = 0
        # a terminal that reports no size (some ptys) gets a fixed one, else tqdm draws nothing
        sizing = {"dynamic_ncols": True} if width > 0 else {"ncols": 110, "nrows": 40}
        self.bar = tqdm(
            total=self.total, initial=self._start, unit="step", desc="train", smoothing=0.1,
            **sizing,
        )  # fmt: skip

    def _truncate_after(self, step: int) -> None:
        """Keep the log of steps up to ``step`` (a resumed run rewrites what came after)."""
        if not self.metrics_path.exists():
            return
        if step == 0:
            self.metrics_path.unlink()
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue
        self.metrics_path.write_text("".join(k + "\n" for k in kept))

    # -- writing ------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append ``record`` (one JSON object) to ``metrics.jsonl``."""
        if self.active:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, text: str) -> None:
        """A line on rank 0 (above the bar when there is one)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, items_per_s: float, lr: float) -> None:
        """Advance the progress to ``step``."""
        if not self.active:
            return
        self._rate = items_per_s if self._rate is None else 0.8 * self._rate + 0.2 * items_per_s
        if self._want_bar:
            self._make_bar()
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {loss:.4f}, {_fmt_rate(self._rate)} {self.unit}/s, lr {lr:.2e}",
                refresh=False,
            )
            self.bar.update(step - self.bar.n)
        elif self.log_interval and (step % self.log_interval == 0 or step == self.total):
            done = step - self._start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(
                f"step {step:>6}/{self.total} | loss {loss:.4f} | {_fmt_rate(self._rate)} "
                f"{self.unit}/s | lr {lr:.2e} | eta {_fmt_time(eta)}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def gather_from_ranks(mine: object) -> list:
    """Every rank's ``mine`` (a collective; picklable objects), in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def format_step_report(report: dict) -> list[str]:
    """The summary's lines for its ``step_report`` (see the module docstring)."""
    ranks = report["per_rank"]
    first = ranks[0]
    kinds = ", ".join(
        f"{kind} {_fmt_bytes(e['bytes'])} ({'/'.join(e['dtypes'])})"
        for kind, e in first["comm"].items()
    )

    def per_rank(key: str) -> str:
        return ", ".join(_fmt_bytes(r[key]) for r in ranks if r.get(key) is not None) or "-"

    return [
        f"  sent in step {report['step']} by rank 0: {_fmt_bytes(first['comm_bytes'])}"
        + (f" ({kinds})" if kinds else ""),
        f"  per rank: saved activations (peak) {per_rank('saved_activation_peak_bytes')}; "
        f"parameters {per_rank('param_bytes')}; gradients {per_rank('grad_bytes')}; optimizer "
        f"state {per_rank('optimizer_bytes')}",
    ]


def format_summary(s: dict) -> str:
    """The end-of-run summary as a few lines."""
    lines = [
        f"done: {s['steps_run']} steps in {_fmt_time(s['train_seconds'])} "
        f"({s['model']}, {s['num_params'] / 1e6:.2f}M parameters, layout {s['layout']}, "
        f"{s['world_size']} x {s['device']} over {s['backend']})",
        f"  train loss {s['first_loss']:.4f} (first step) -> {s['last_loss']:.4f} (mean of the "
        f"last {s.get('last_loss_steps', 1)} steps)"
        + "".join(f", {k} {v:.4f}" for k, v in s.get("eval", {}).items()),
        f"  throughput {_fmt_rate(s['items_per_s'])} {s['unit']}/s"
        + (
            f", MFU {100 * s['mfu']:.1f}% (of {s['peak_tflops']:.0f} TFLOP/s bf16 peak per GPU)"
            if s.get("mfu") is not None
            else ""
        )  # fmt: skip
        + (
            f", {s['tflops_per_device']:.2f} TFLOP/s per device"
            if s.get("tflops_per_device")
            else ""
        ),
        "  peak memory per rank: " + ", ".join(_fmt_bytes(b) for b in s["peak_memory_bytes"]),
    ]
    if s.get("step_report"):
        lines += format_step_report(s["step_report"])
    if s.get("checkpoint"):
        lines.append(f"  checkpoint {s['checkpoint']}")
    if s.get("plot"):
        lines.append(f"  loss curve {s['plot']}")
    lines.append(f"  metrics {s['metrics']}")
    return "\n".join(lines)


def plot_metrics(metrics_path: Path, png: Path, title: str) -> str | None:
    """Draw train loss (raw and smoothed) and eval metrics against the step into ``png``.
    Returns ``None`` on success, or a one-line note why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss.png: matplotlib is not installed (pip install matplotlib)"
    train, evals = [], {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        for key in ("val_loss", "test_loss", "test_accuracy"):
            if key in rec:
                evals.setdefault(key, []).append((rec["step"], rec[key]))
    if not train:
        return "no loss.png: nothing was logged"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    smooth, ema = [], 0.0
    for i, v in enumerate(losses, 1):
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema / (1 - 0.9**i))  # bias-corrected, as Adam's moments
    ax.plot(steps, smooth, color="tab:blue", lw=2, label="train loss (EMA 0.9)")
    for key, color in (("val_loss", "tab:orange"), ("test_loss", "tab:orange")):
        if key in evals:
            ax.plot(*zip(*evals[key]), "o-", color=color, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if "test_accuracy" in evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals["test_accuracy"]), "s--", color="tab:green", label="test accuracy")
        ax2.set_ylabel("test accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return None
