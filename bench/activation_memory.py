"""Saved activation bytes per transformer layer under tensor + sequence parallelism, measured
exactly, against Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", eq. 4 with the attention-score term removed, as flash attention saves no scores):

    34 * s * b * h / t  bytes per layer (16-bit activations, 1-byte dropout masks)

Measured: one :class:`~triton_parallel_layers.models.gpt.GPTBlock` of a GPT parallelized with
``GPT_TP_PLAN`` and ``sequence_parallel=True``, its forward run under ``torch.autocast(bf16)``
inside :class:`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd saves
for the backward; each underlying storage is counted once (a view saves its whole base). Saved
parameters and their bf16 casts (autocast's weight copies) are counted apart, as "weights": they
scale with the parameters, not with ``s * b``. The block's input (the residual stream) is counted:
its first norm saves it.

    python bench/activation_memory.py                      # t = 1, 2, 4 on gloo (CPU)
    python bench/activation_memory.py --seq 64 --hidden 256

Results: ``bench/results/activation_memory_cpu.json`` and ``.md``. The byte counts do not depend
on the machine; which attention path ran does (see ``attention_path`` in the results).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_name, write_results  # noqa: E402

from triton_parallel_layers.kernels._dispatch import use_triton  # noqa: E402
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig  # noqa: E402
from triton_parallel_layers.parallel_layers import ParallelDims, parallelize  # noqa: E402
from triton_parallel_layers.parallel_layers.testing import run_distributed  # noqa: E402

TPS = (1, 2, 4)


def korthikanti_bytes(s: int, b: int, h: int, t: int) -> float:
    """Korthikanti et al. 2022, tensor + sequence parallel, per layer, without the ``5 a s / h``
    attention-score term: ``34 s b h / t`` bytes."""
    return 34 * s * b * h / t


_VIEWS = ("TBackward0", "TransposeBackward0", "ViewBackward0", "UnsafeViewBackward0",
          "PermuteBackward0", "ExpandBackward0")  # fmt: skip


def analytic_bytes(b: int, s: int, h: int, heads: int, t: int, residual_itemsize: int) -> int:
    """What one sequence-parallel GPT block saves per rank under bf16 autocast (2-byte compute
    dtype), term by term (dropout 0, no grouped-query attention); ``residual_itemsize``: bytes
    per element of the residual stream (the block's input and the second norm's)."""
    tokens = b * s // t  # this rank's tokens between the tensor-parallel regions
    norm = tokens * h * residual_itemsize + 2 * tokens * 4  # input + fp32 mean and rstd
    attention = (
        tokens * h * 2  # the QKV projection's input shard (gathered again in backward)
        + 3 * b * s * (h // t) * 2  # q, k (after RoPE), v: (B, heads/t, S, D)
        # flash attention's output, which the output projection saves too (a view of it), and
        # its lse; RoPE saves nothing (its cos and sin are recomputed in backward)
        + b * s * (h // t) * 2
        + b * (heads // t) * s * 4
    )
    mlp = tokens * h * 2 + 2 * b * s * (4 * h // t) * 2  # fc1's input shard, GELU in, fc2 in
    return 2 * norm + attention + mlp


def _is_weight(t: torch.Tensor, param_storages: set[int]) -> bool:
    """A parameter, or (a view of) autocast's cast of one (``ToCopyBackward0`` from a leaf)."""
    if t.untyped_storage().data_ptr() in param_storages:
        return True
    fn = t.grad_fn
    while fn is not None and fn.name() in _VIEWS:
        fn = fn.next_functions[0][0]
    return (
        fn is not None
        and fn.name() == "ToCopyBackward0"
        and any(getattr(nxt, "variable", None) is not None for nxt, _ in fn.next_functions)
    )


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, dtype=torch.bfloat16) -> dict:
    """Forward ``module(x)`` under autocast(``dtype``) and count what autograd saves for the
    backward, each storage once: ``{"activation": bytes, "weight": bytes, "tensors": [...]}``
    (``tensors``: ``(kind, shape, dtype, storage bytes)`` per storage, in saving order)."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, tuple] = {}
    keep = []  # the saved tensors stay alive (so no storage address is reused) until we are done

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            kind = "weight" if _is_weight(t, param_storages) else "activation"
            seen[storage.data_ptr()] = (kind, tuple(t.shape), str(t.dtype), storage.nbytes())
        keep.append(t)
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast(x.device.type, dtype=dtype):
        module(x)
    totals = Counter()
    for kind, _, _, nbytes in seen.values():
        totals[kind] += nbytes
    return {"activation": totals["activation"], "weight": totals["weight"],
            "tensors": list(seen.values())}  # fmt: skip


def _config(seq: int, hidden: int, heads: int) -> GPTConfig:
    return GPTConfig(vocab_size=128, n_layers=1, n_heads=heads, embed_dim=hidden,
                     max_seq_len=seq, vocab_pad_multiple=8)  # fmt: skip


def measure_layer(tp: int, batch: int, seq: int, hidden: int, heads: int) -> dict:
    """Saved bytes of one GPT block at ``tp`` (this rank's), sequence parallel, bf16 autocast.
    Every rank of the world takes part; the world is split into TP groups of ``tp`` ranks."""
    dims = ParallelDims(dp=dist.get_world_size() // tp, tp=tp)
    torch.manual_seed(0)
    model = parallelize(GPT(_config(seq, hidden, heads)), GPT_TP_PLAN, dims.tp_group,
                        sequence_parallel=True)  # fmt: skip
    block = model.blocks[0]
    # the residual stream entering the block, (B, S/t, E) in the dtype the embedding gives it
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = model.embed(ids).requires_grad_()
    result = saved_bytes(block, x)
    result.update(
        tp=tp,
        residual_dtype=str(x.dtype),
        analytic=analytic_bytes(batch, seq, hidden, heads, tp, x.element_size()),
        formula=korthikanti_bytes(seq, batch, hidden, tp),
        attention_path="triton" if use_triton(x) else "torch reference (the kernel's CPU path)",
    )
    result["ratio"] = result["activation"] / result["formula"]
    return result


def _worker(batch: int, seq: int, hidden: int, heads: int) -> list[dict]:
    return [measure_layer(tp, batch, seq, hidden, heads) for tp in TPS]


def to_markdown(result: dict) -> str:
    b, s, h = result["batch"], result["seq"], result["hidden"]
    lines = [
        "# Saved activation bytes per transformer layer (sequence parallel, bf16 autocast)",
        "",
        f"Measured {result['date']} on {result['machine']}, torch {result['torch']}, gloo; "
        f"b={b}, s={s}, h={h}, heads={result['heads']}; attention path: "
        f"{result['rows'][0]['attention_path']}.",
        "Reproduce: `python bench/activation_memory.py`. Exact byte counts (saved-tensor hooks, "
        "each storage once); the formula is Korthikanti et al. 2022's per-layer activation "
        "memory under tensor + sequence parallelism without the attention-score term, "
        "34·s·b·h/t bytes.",
        "",
        "| t | saved activations (B) | our analytic count (B) | 34·s·b·h/t (B) | ratio | "
        "weights and their bf16 casts, apart (B) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tp']} | {r['activation']} | {r['analytic']} | {r['formula']:.0f} | "
            f"{r['ratio']:.3f} | {r['weight']} |"
        )
    lines += [
        "",
        "Where the difference from the formula comes from (it assumes 16-bit activations, "
        "1-byte dropout masks and no flash attention): the residual stream the two norms save is "
        f"{result['rows'][0]['residual_dtype']} at every t (the embedding's output is cast to "
        "the autocast dtype); flash attention's output (B, S, a/t, d in memory) is the output "
        "projection's input too, a view, saved once, as the formula's 2·s·b·h/t; flash "
        "attention adds its log-sum-exp (4·b·a·s/t) and the norms their mean and rstd "
        "(16·s·b/t); RoPE saves nothing (its tables are recomputed in backward); at dropout 0 "
        "none of the formula's 2·s·b·h/t of masks is saved, hence the ratio below 1. "
        "`analytic_bytes` in `bench/activation_memory.py` counts every term; "
        "tests/test_activation_memory.py checks it equals the measurement at t = 1, 2, 4.",
        "",
        "What is saved at t = 2 (one storage per row, in saving order):",
        "",
              "| kind | shape | dtype | bytes |", "| --- | --- | --- | ---: |"]  # fmt: skip
    for kind, shape, dtype, nbytes in next(r for r in result["rows"] if r["tp"] == 2)["tensors"]:
        lines.append(f"| {kind} | {tuple(shape)} | {dtype} | {nbytes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32, help="divisible by 4")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = run_distributed(
        _worker, max(TPS), args.batch, args.seq, args.hidden, args.heads, timeout=600
    )[0]
    result = {
        "benchmark": "activation_memory",
        "machine": machine_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch": args.batch,
        "seq": args.seq,
        "hidden": args.hidden,
        "heads": args.heads,
        "rows": rows,
    }
    markdown = to_markdown(result)
    print(markdown)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_results(args.out, f"activation_memory_{device}", result, markdown)
    return result


if __name__ == "__main__":
    main()
