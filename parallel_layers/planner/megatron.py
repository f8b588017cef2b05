"""Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", SC21), Table 1: GPT models from 1.7B to 1T parameters on up to 3,072 A100 GPUs,
their layouts and the per-GPU throughput achieved. The planner is checked against it
(``bench/bench_planner.py``).

The models are far too large to build, even on ``meta`` in reasonable time at 1T, and they differ
from this package's GPT (learned positions, attention scores materialized), so their profiles are
written down analytically here, with the same fields :func:`profile_model` measures:

* matmul FLOPs per layer and microbatch ``b``: ``24 b s h^2 + 4 b s^2 h`` (QKV, projection and MLP
  GEMMs, scores and values), the logit layer ``2 b s h V``;
* saved activations (Korthikanti et al. 2022, bytes, 16-bit): ``s b h (34 + 5 a s / h)`` per
  layer, of which ``10 s b h`` are replicated over tensor-parallel ranks without sequence
  parallelism;
* element-wise traffic (our estimate of Megatron's fused kernels: two LayerNorms, two fused
  bias-dropout-residual adds, fused bias-GeLU, fused scale-mask-softmax and dropout on the scores):
  about ``19 h + 4.5 a s`` 16-bit elements read and written per token and layer;
* two all-reduces of ``b s h`` forward and two backward per layer under tensor parallelism.

The throughput the paper reports counts ``96 B s l h^2 (1 + s / 6h + V / 16 l h)`` FLOPs per
iteration (activation recomputation included); :data:`PAPER_FLOPS` uses the same count. The paper
trained with activation recomputation and mixed precision (18 bytes of state per parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

from triton_parallel_layers.parallel_layers.planner.cost import Estimate, Layout, estimate
from triton_parallel_layers.parallel_layers.planner.hardware import HARDWARE
from triton_parallel_layers.parallel_layers.planner.profile import LayerProfile, ModelProfile

__all__ = [
    "NARAYANAN_2021",
    "PaperConfig",
    "gpt_profile",
    "paper_flops_per_sample",
    "published_layout_estimate",
]

SEQ = 2048
VOCAB = 51200


@dataclass(frozen=True)
class PaperConfig:
    """One row of the paper's Table 1."""

    params_b: float
    """Parameters, billions."""
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    """Global batch (sequences of 2,048 tokens)."""
    tflops_per_gpu: float
    """Achieved teraFLOP/s per GPU (of the A100's 312 peak)."""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


# Narayanan et al. 2021, Table 1 (weak scaling; sequence length 2048, vocabulary 51,200).
NARAYANAN_2021 = [
    PaperConfig(1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    PaperConfig(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    PaperConfig(7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    PaperConfig(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    PaperConfig(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    PaperConfig(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    PaperConfig(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    PaperConfig(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    PaperConfig(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    PaperConfig(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def paper_flops_per_sample(hidden: int, layers: int, seq: int = SEQ, vocab: int = VOCAB) -> float:
    """The paper's FLOPs per sequence per iteration (with recomputation)."""
    h, n, s = hidden, layers, seq
    return 96 * s * n * h * h * (1 + s / (6 * h) + vocab / (16 * n * h))


def gpt_profile(cfg: PaperConfig, seq: int = SEQ, vocab: int = VOCAB) -> ModelProfile:
    """The analytic profile of one Table-1 GPT at microbatch 1, in bf16."""
    h, a, s, b, item = cfg.hidden, cfg.heads, seq, 1, 2
    act = b * s * h * item  # one (b, s, h) activation, bytes
    block = LayerProfile(
        name="TransformerLayer",
        matmul_flops=24 * b * s * h * h + 4 * b * s * s * h,
        other_bytes=(19 * h + 4.5 * a * s) * b * s * item,
        sharded_other_bytes=(8 * h + 4.5 * a * s) * b * s * item,  # bias-GeLU, softmax, dropout
        params=12 * h * h + 13 * h,
        sharded_params=12 * h * h + 7 * h,
        saved_bytes=s * b * h * (34 + 5 * a * s / h),
        sharded_saved_bytes=s * b * h * (24 + 5 * a * s / h),
        out_bytes=act,
        tp_in_bytes=2 * act,
        tp_out_bytes=2 * act,
        tp_collectives=4,
    )
    embed = LayerProfile(
        name="Embedding",
        matmul_flops=0.0,
        other_bytes=3 * act,
        sharded_other_bytes=0.0,
        params=vocab * h + s * h,
        sharded_params=vocab * h,
        saved_bytes=b * s * 8,
        sharded_saved_bytes=0.0,
        out_bytes=act,
        tp_out_bytes=act,
        tp_collectives=1,
    )
    head = LayerProfile(
        name="LogitsAndLoss",
        matmul_flops=2 * b * s * h * vocab,
        other_bytes=4 * act + 3 * b * s * vocab * 4,  # final norm; the fp32 loss over the logits
        sharded_other_bytes=3 * b * s * vocab * 4,
        params=vocab * h + 2 * h,  # the tied embedding's copy on the last stage
        sharded_params=vocab * h,
        saved_bytes=act + b * s * vocab * 4,
        sharded_saved_bytes=b * s * vocab * 4,
        out_bytes=4.0,
        tp_in_bytes=act,
        tp_collectives=1,
    )
    return ModelProfile(
        name=f"GPT-{cfg.params_b:g}B",
        layers=[embed] + [block] * cfg.layers + [head],
        batch=b,
        tokens_per_sample=s,
        dtype="bf16",
        tp_divides={"heads": a, "ffn hidden": 4 * h, "vocabulary": vocab},
        model_flops_per_sample=paper_flops_per_sample(h, cfg.layers, s, vocab),
    )


def published_layout_estimate(cfg: PaperConfig) -> Estimate | None:
    """The planner's prediction for the paper's own layout: its dp, pp and tp on the A100 spec,
    with activation recomputation and 18 bytes of state per parameter, at the microbatch size
    (1, 2, 4, 8) and schedule (1F1B or interleaved with 2 chunks) the cost model finds fastest
    within the A100's memory. ``None`` if none fits."""
    profile, hw = gpt_profile(cfg), HARDWARE["a100"]
    best = None
    per_replica = cfg.batch // cfg.dp
    for schedule in ("none",) if cfg.pp == 1 else ("1f1b", "interleaved"):
        for mb in (1, 2, 4, 8):
            if per_replica % mb:
                continue
            m = per_replica // mb
            if schedule == "interleaved" and (m % cfg.pp or 2 * cfg.pp > cfg.layers):
                continue
            layout = Layout(cfg.dp, cfg.pp, cfg.tp, schedule=schedule,
                            chunks=2 if schedule == "interleaved" else 1, microbatches=m,
                            micro_batch_size=mb, recompute=True)  # fmt: skip
            e = estimate(profile, hw, layout, bytes_per_param=18)
            if e.peak_memory <= hw.memory_bytes and (best is None or e.step_time < best.step_time):
                best = e
    return best
