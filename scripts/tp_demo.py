"""A short tensor-parallel training demo: run it under torchrun on CPU (gloo) or GPUs (nccl).

    python -m torch.distributed.run --standalone --nproc-per-node=2 scripts/tp_demo.py

A tiny language model (vocab-parallel embedding -> sequence-parallel MLP block -> column-parallel
head -> vocab-parallel cross-entropy) learns to continue a fixed pattern of tokens. Rank 0 trains
the same model on one device alongside, from the same seed, and prints both losses each step: they
agree to float rounding, which is the point of the package.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from triton_parallel_layers.parallel_layers import (
    ColumnParallelLinear,
    ParallelDims,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    vocab_parallel_cross_entropy,
)
from triton_parallel_layers.parallel_layers.comm import gather_from_sequence_parallel
from triton_parallel_layers.parallel_layers.sequence_parallel import SequenceParallelLayerNorm


class TinyLM(nn.Module):
    """Embedding -> residual MLP -> LayerNorm -> head, written for one device."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, S, E)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.norm(h))  # (B, S, V)


class TensorParallelTinyLM(nn.Module):
    """The same model over a TP group, built from the single-device one by ``from_*``.

    Activations between the layers stay sharded along the sequence (sequence parallelism):
    ``(B, S/tp, E)``; the head's logits stay sharded along the vocabulary: ``(B, S, V/tp)``.
    """

    def __init__(self, model: TinyLM, tp_group: dist.ProcessGroup) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.embed = VocabParallelEmbedding.from_embedding(
            model.embed, tp_group, sequence_parallel=True
        )
        self.fc1 = ColumnParallelLinear.from_linear(model.fc1, tp_group, sequence_parallel=True)
        self.fc2 = RowParallelLinear.from_linear(model.fc2, tp_group, sequence_parallel=True)
        # replicated, sees only this rank's tokens: its gradients are partial sums, as fc2's bias
        self.norm = SequenceParallelLayerNorm.from_norm(copy.deepcopy(model.norm), tp_group)
        self.head = ColumnParallelLinear.from_linear(model.head, tp_group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, S/tp, E)
        h = h + self.fc2(F.gelu(self.fc1(h)))  # (B, S/tp, E)
        h = self.norm(h)
        h = gather_from_sequence_parallel(h, self.tp_group, dim=1)  # (B, S, E)
        return self.head(h)  # (B, S, V/tp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    dims = ParallelDims(tp=int(os.environ.get("WORLD_SIZE", "1")))  # every process in one TP group
    rank, group, device = dims.rank, dims.tp_group, dims.device
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim).to(device)
    tp_model = TensorParallelTinyLM(model, group)
    opt = torch.optim.AdamW(tp_model.parameters(), lr=args.lr)
    ref_opt = torch.optim.AdamW(model.parameters(), lr=args.lr) if rank == 0 else None

    # Data: the pattern 0, 1, ..., 12, 0, 1, ... from random offsets; predict the next token.
    gen = torch.Generator().manual_seed(1)
    if rank == 0:
        print(f"{dims}: TinyLM vocab={args.vocab} dim={args.dim} seq={args.seq}", flush=True)
        print(f"{'step':>4}  {'loss (tp=' + str(dims.tp) + ')':>12}  {'loss (1 device)':>15}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, 13, (args.batch, 1), generator=gen)
        tokens = ((offsets + torch.arange(args.seq + 1)) % 13).to(device)
        ids, target = tokens[:, :-1], tokens[:, 1:]

        loss = vocab_parallel_cross_entropy(tp_model(ids), target, group)
        opt.zero_grad()
        loss.backward()
        allreduce_sequence_parallel_grads(tp_model)  # norm and fc2.bias: one all-reduce
        opt.step()

        if ref_opt is not None:
            logits = model(ids)
            ref_loss = F.cross_entropy(logits.reshape(-1, args.vocab), target.reshape(-1))
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"{step:>4}  {loss.item():>12.5f}  {ref_loss.item():>15.5f}", flush=True)
    if rank == 0:
        print(f"done in {time.perf_counter() - start:.1f} s: the losses agree step by step")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
