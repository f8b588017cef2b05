"""Saved activation bytes of a sequence-parallel GPT block under bf16 autocast, counted exactly
(saved-tensor hooks, each storage once) at tp = 1, 2, 4, equal to the term-by-term count of
``bench/activation_memory.py`` (``analytic_bytes``). The ratio to Korthikanti et al. 2022's
``34 s b h / t`` is the benchmark's to report (``bench/results/activation_memory_cpu.md``)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import activation_memory  # noqa: E402

B, S, H, HEADS = 2, 16, 64, 4  # head dim 16; S and the heads divisible by 4


def _measure() -> list[dict]:
    return activation_memory._worker(B, S, H, HEADS)


def test_saved_bytes_per_layer_equal_the_analytic_count(dist_run):
    rows = dist_run(4, _measure, timeout=120)
    for rank_rows in rows:
        assert [r["tp"] for r in rank_rows] == [1, 2, 4]
        for r in rank_rows:
            itemsize = torch.tensor(
                [], dtype=getattr(torch, r["residual_dtype"][6:])
            ).element_size()
            want = activation_memory.analytic_bytes(B, S, H, HEADS, r["tp"], itemsize)
            # (the count has the column layers' input shards (B, S/t, H): a gathered input
            # saved instead would add (t - 1) times as much)
            assert r["activation"] == want, (r["tp"], r["activation"], want, r["tensors"])
    assert all(rank_rows == rows[0] for rank_rows in rows)  # the same on every rank
