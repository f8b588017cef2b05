"""Bytes on the wire per training step, exactly: the ledger against the analytic count.

A GPT trains one step under bf16 autocast on gloo at three layouts of two ranks: (tp=2, sequence
parallel), (pp=2, 1F1B, 2 microbatches) and (dp=2, the gradient reduction in fp32 and in bf16).
Each rank records what it sends during the step (``Engine.train_step`` and the gradient-norm
all-reduce of ``clip_grad_norm_``) with :func:`record_comm`, split by collective kind and dtype.

The analytic count is derived here, from the model's shape alone (``b``, ``s``, ``h``, layers,
vocabulary, microbatches), Megatron-LM's communication pattern and the ring algorithm's bytes per
rank (``2 (p-1)/p n`` for an all-reduce of ``n`` bytes, ``(p-1) n`` for an all-gather of an
``n``-byte shard, ``(p-1)/p n`` for a reduce-scatter of ``n`` bytes, ``(p-1)/p n`` for a
broadcast, ``n`` for a send), never from the ledger. Ledger and count must agree for every
(kind, dtype) to the byte (so the ratio is 1.00), which also says that every activation message
of TP, SP and PP is bf16: the only other dtypes are the fp32 loss statistics of the
vocabulary-parallel cross-entropy (per token, as in Megatron), the fp32 gradient reductions of
replicated and tied parameters and of DP (per ``--grad-reduce-dtype``), the gradient norm, and
the pipeline's int64 shape header (first step only).

The same run checks that the parallel step computes what one device computes under bf16
autocast (loss and every gradient, bf16 tolerances). A short run of the trainer at (tp=2,
sequence parallel) then checks its memory and communication report (``summary.json``,
``metrics.jsonl``) against the same count and against the parameter, gradient and optimizer
bytes the shapes give.
"""

from __future__ import annotations

import contextlib
import io
import json
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import record_comm
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig
from triton_parallel_layers.parallel_layers import ParallelDims
from triton_parallel_layers.training.cli import main
from triton_parallel_layers.training.config import ParallelConfig
from triton_parallel_layers.training.engine import build_engine

CFG = dict(vocab_size=90, n_layers=2, n_heads=4, embed_dim=64, max_seq_len=32,
           vocab_pad_multiple=8, norm="layernorm")  # fmt: skip
B, S = 4, 16
SEED = 5
BF16, FP32 = 2, 4  # bytes per element
# normwise bf16 tolerance (max|ours - ref| <= RTOL * max|ref|); measured at most 1.3e-2
RTOL = 3e-2

LAYOUTS = {
    "tp2-sp": dict(tp=2, sequence_parallel=True),
    "pp2": dict(pp=2, microbatches=2),
    "dp2-fp32": dict(dp=2, grad_reduce_dtype="fp32"),
    "dp2-bf16": dict(dp=2, grad_reduce_dtype="bf16"),
}


def _model() -> GPT:
    return GPT(GPTConfig(**CFG), seed=SEED)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CFG["vocab_size"], (B, S + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _run_layouts() -> dict:
    """Every layout on this rank: the ledger of two steps, and the errors against one device."""
    ref = _model()
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = ref.loss(ref(x), y)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    out = {}
    for name, layout in LAYOUTS.items():
        parallel = ParallelConfig(**layout)
        dims = ParallelDims(dp=parallel.dp, pp=parallel.pp, tp=parallel.tp)
        engine = build_engine(_model, GPT_TP_PLAN, dims, parallel, autocast_dtype=torch.bfloat16)
        ledgers, errors = [], {}
        for step in range(2):
            x, y = _batch(0)
            rows = slice(dims.dp_rank * B // dims.dp, (dims.dp_rank + 1) * B // dims.dp)
            with record_comm() as ledger:
                loss = engine.train_step(x[rows], y[rows])
                engine.clip_grad_norm_(0.0)
            ledgers.append(ledger.by_dtype())
            if step == 0:
                errors["loss"] = _rel(loss, ref_loss.detach()) if dims.dp == 1 else 0.0
                for p in engine.params:
                    full = ref_grads[p.name]
                    want = full if p.dim is None else full.chunk(dims.tp, p.dim)[dims.tp_rank]
                    errors[p.name] = _rel(p.param.grad, want)
            for p in engine.params:
                p.param.grad = None
        if dims.dp > 1:  # each replica's loss is its half of the batch: compare the mean
            loss = loss.clone()
            dist.all_reduce(loss)
            errors["loss"] = _rel(loss / dims.dp, ref_loss.detach())
        out[name] = {"ledgers": ledgers, "errors": errors, "rank": dist.get_rank()}
    return out


# ---------------------------------------------------------------------------------------------
# The analytic count
# ---------------------------------------------------------------------------------------------
def _all_reduce(nbytes: int, p: int) -> Fraction:
    """Ring all-reduce: a reduce-scatter then an all-gather of ``p`` chunks of ``nbytes / p``;
    each rank sends ``p - 1`` chunks in each phase."""
    return 2 * (p - 1) * Fraction(nbytes, p)


def _expected(
    name: str, rank: int, first_step: bool, cfg: GPTConfig | None = None, b: int = B, s: int = S
) -> dict[tuple[str, str], int]:
    """``{(kind, dtype): bytes this rank sends}`` in one step of layout ``name`` for a GPT of
    ``cfg`` (default ``CFG``) on ``b`` sequences of ``s`` tokens."""
    cfg = cfg or GPTConfig(**CFG)
    h, L, V = cfg.embed_dim, cfg.n_layers, cfg.padded_vocab_size
    world = 2
    count: dict[tuple[str, str], Fraction] = {}

    def add(kind: str, dtype: str, nbytes: Fraction) -> None:
        count[(kind, dtype)] = count.get((kind, dtype), 0) + nbytes

    # every step ends with the gradient norm: one fp32 scalar all-reduced over the world
    add("all_reduce", "float32", _all_reduce(FP32, world))
    if name == "tp2-sp":
        p = 2
        act = b * s * h * BF16  # one whole (b, s, h) activation in bf16
        # Megatron-LM with sequence parallelism, per layer: the attention's and the MLP's input
        # all-gathered (b, s/p, h) and their outputs reduce-scattered (b, s, h) in forward, the
        # duals in backward; plus the embedding's reduce-scatter and the head's all-gather. The
        # column layers (two per layer, and the head) save only their input shard, so backward
        # gathers each input again, as Megatron-LM does: 2 L + 1 more.
        gathers = 3 * (2 * L + 1)
        scatters = 2 * (2 * L + 1)
        # ring all-gather: each rank passes on p - 1 shards of act / p; ring reduce-scatter: each
        # rank sends p - 1 partial chunks of act / p
        add("all_gather", "bfloat16", gathers * (p - 1) * Fraction(act, p))
        add("reduce_scatter", "bfloat16", scatters * (p - 1) * Fraction(act, p))
        # the replicated LayerNorm weights (2 per layer and the head's, h each) see 1/p of the
        # tokens: their fp32 gradients are all-reduced over TP
        add("all_reduce", "float32", (2 * L + 1) * _all_reduce(h * FP32, p))
        # vocabulary-parallel cross-entropy: the max, then (sum of exp, target logit), fp32 per
        # token
        add("all_reduce", "float32", 3 * _all_reduce(b * s * FP32, p))
    elif name == "pp2":
        p, m = 2, 2
        micro = (b // m) * s * h * BF16
        # stage 0 sends each microbatch's activation forward, stage 1 its gradient back
        add("send", "bfloat16", m * micro)
        if rank == 0 and first_step:
            add("send", "int64", (3 + 8) * 8)  # the shape header, once
        # tied embeddings: the head's copy of the (V, h) embedding gradient is summed over pp
        add("all_reduce", "float32", _all_reduce(V * h * FP32, p))
        # the loss, from the last stage: a chain in which every rank but the last sends it once
        add("broadcast", "float32", (p - 1) * Fraction(FP32, p))
    else:  # dp2-*: one gradient all-reduce of every parameter (tied ones once) per step
        p = 2
        params = V * h + L * (12 * h * h + 2 * h) + h  # embedding, blocks, final norm
        dtype, size = ("bfloat16", BF16) if name.endswith("bf16") else ("float32", FP32)
        add("all_reduce", dtype, _all_reduce(params * size, p))
    return {k: round(v) for k, v in count.items()}


@pytest.fixture(scope="module")
def results(dist_run):
    return dist_run(2, _run_layouts, timeout=600)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_step_bytes_equal_the_analytic_count(results, name):
    for rank_result in results:
        r = rank_result[name]
        for step, measured in enumerate(r["ledgers"]):
            expected = _expected(name, r["rank"], first_step=step == 0)
            ratio = sum(measured.values()) / sum(expected.values())
            assert measured == expected, (name, r["rank"], step, measured, expected)
            assert abs(ratio - 1) <= 0.01
        activations = {k for k in r["ledgers"][1] if k[0] in ("all_gather", "reduce_scatter")}
        activations |= {k for k in r["ledgers"][1] if k[0] == "send"}
        assert all(dtype == "bfloat16" for _, dtype in activations), r["ledgers"][1]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_step_matches_one_device(results, name):
    for rank_result in results:
        errors = rank_result[name]["errors"]
        worst = max(errors, key=errors.get)
        assert errors[worst] <= RTOL, (name, worst, errors[worst])


# ---------------------------------------------------------------------------------------------
# The trainer's report
# ---------------------------------------------------------------------------------------------
TRAIN = dict(n_layers=2, embed_dim=64, n_heads=4, seq_len=32, batch_size=8)
TRAIN_ARGS = ["--data-bytes", "200000", "--eval-batches", "1", "--sample-tokens", "0",
              "--no-progress", "--no-plot", "--log-interval", "0", "--eval-interval", "0",
              "--ckpt-interval", "0", "--warmup-steps", "1", "--max-steps", "2", "--dtype", "bf16",
              "--tp", "2", "--sequence-parallel"]  # fmt: skip


def _train(out: str) -> int:
    args = [*TRAIN_ARGS, "--out", out]
    for key, value in TRAIN.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main("gpt", args)


def test_training_report_is_exact(dist_run, tmp_path):
    assert dist_run(2, _train, str(tmp_path), timeout=300) == [0, 0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cfg = GPTConfig(vocab_size=256, vocab_pad_multiple=256, n_layers=TRAIN["n_layers"],
                    embed_dim=TRAIN["embed_dim"], n_heads=TRAIN["n_heads"],
                    max_seq_len=TRAIN["seq_len"])  # fmt: skip
    expected = _expected("tp2-sp", 0, True, cfg, TRAIN["batch_size"], TRAIN["seq_len"])
    # parameters per rank at tp = 2: the embedding's rows and the blocks' matrices halved, the
    # LayerNorm weights whole (fp32); Adam(W) keeps two moments and a step count per tensor
    h, L, V = cfg.embed_dim, cfg.n_layers, cfg.padded_vocab_size
    params = (V * h + L * 12 * h * h) // 2 + (2 * L + 1) * h
    tensors = 1 + 6 * L + 1
    report = summary["step_report"]
    assert report["step"] == 1 and len(report["per_rank"]) == 2
    for r in report["per_rank"]:
        by_dtype = {(k, d): n for k, e in r["comm"].items() for d, n in e["dtypes"].items()}
        assert by_dtype == expected, (r["rank"], by_dtype, expected)
        assert r["comm_bytes"] == sum(expected.values())
        assert r["param_bytes"] == r["grad_bytes"] == params * FP32, r
        assert r["optimizer_bytes"] == 2 * params * FP32 + tensors * FP32, r
        assert r["saved_activation_peak_bytes"] > 0
    per_kind: dict[str, int] = {}
    for (kind, _), n in expected.items():
        per_kind[kind] = per_kind.get(kind, 0) + n
    assert [m["comm_bytes"] for m in metrics if "loss" in m] == [per_kind, per_kind]
    assert metrics[0]["param_bytes"] == params * FP32
