"""VocabParallelEmbedding against nn.Embedding, on gloo at TP = 1, 2, 4.

Exactly one rank contributes each token's row and the others add zeros, so the output and the
weight gradient are bit-exact in every dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import assert_close, chunk, expect_error
from triton_parallel_layers.parallel_layers import ParallelDims, VocabParallelEmbedding
from triton_parallel_layers.parallel_layers.checks import debug_checks

WORLD_SIZES = [1, 2, 4]


def _embedding_case(vocab, dim, padding_idx, sequence_parallel, dtype):
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    ref = nn.Embedding(vocab, dim, padding_idx=padding_idx, dtype=dtype)
    layer = VocabParallelEmbedding.from_embedding(
        ref, dims.tp_group, sequence_parallel=sequence_parallel
    )
    seq = 5 * dims.tp
    ids = torch.randint(0, vocab, (3, seq))
    ids[0, :3] = torch.tensor([0, vocab - 1, (padding_idx or 1) % vocab])
    dy = torch.randn(3, seq, dim, dtype=dtype)

    y_ref = ref(ids)
    y_ref.backward(dy)
    y = layer(ids)
    y.backward(chunk(dy, 1) if sequence_parallel else dy)

    expected = chunk(y_ref, 1) if sequence_parallel else y_ref
    assert_close(y.detach(), expected.detach(), exact=True, what="output")
    # With sequence parallelism the backward all-gathers the output gradient, so every rank
    # still sees every token's gradient: its rows' gradient is complete and exact.
    assert_close(layer.weight.grad, chunk(ref.weight.grad, 0), exact=True, what="weight grad")
    if padding_idx is not None and layer.local_padding_idx is not None:
        assert not layer.weight.grad[layer.local_padding_idx].any(), "padding row got a gradient"


CASES = [
    # vocab (divisible by 4), dim, padding_idx, sequence_parallel
    (52, 13, None, False),
    (68, 17, 3, False),
    (388, 8, -1, True),
    (16, 97, None, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_embedding_matches_nn_embedding(dist_run, world_size, case, dtype):
    dist_run(world_size, _embedding_case, *case, dtype)


def _init_parity_case():
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(7)
    ref = nn.Embedding(20, 6, padding_idx=5)
    torch.manual_seed(7)
    layer = VocabParallelEmbedding(20, 6, tp_group=dims.tp_group, padding_idx=5)
    assert_close(layer.weight.detach(), chunk(ref.weight.detach(), 0), exact=True, what="weight")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_initialization_parity(dist_run, world_size):
    dist_run(world_size, _init_parity_case)


def _bad_input_case():
    dims = ParallelDims(tp=dist.get_world_size())
    g = dims.tp_group
    expect_error(
        ValueError,
        r"num_embeddings=50257 is not divisible by the tensor-parallel size 4",
        VocabParallelEmbedding,
        50257,
        8,
        tp_group=g,
    )
    expect_error(
        ValueError, r"padding_idx=12 must be within", VocabParallelEmbedding, 12, 4, padding_idx=12
    )
    layer = VocabParallelEmbedding(12, 4, tp_group=g)
    with debug_checks():  # the opt-in eager check names the bad id
        expect_error(
            ValueError,
            r"token id 12 is outside the vocabulary \[0, 12\)",
            layer,
            torch.tensor([[1, 12]]),
        )
        expect_error(
            ValueError, r"token id -1 is outside the vocabulary", layer, torch.tensor([[-1, 2]])
        )
    # by default a device-side assert (a RuntimeError on CPU), no host sync
    expect_error(
        RuntimeError, r"a token id is outside the vocabulary \[0, 12\)", layer, torch.tensor([[12]])
    )
    expect_error(
        TypeError, r"must be an integer tensor, got dtype torch.float32", layer, torch.zeros(2, 3)
    )
    sp = VocabParallelEmbedding(12, 4, tp_group=g, sequence_parallel=True)
    expect_error(
        ValueError,
        r"sequence length 6 .* not divisible by the tensor-parallel size 4",
        sp,
        torch.zeros(2, 6, dtype=torch.long),
    )
    expect_error(
        ValueError,
        r"does not support nn.Embedding options \['max_norm'\]",
        VocabParallelEmbedding.from_embedding,
        nn.Embedding(12, 4, max_norm=1.0),
        g,
    )
    x = torch.ones(1)
    dist.all_reduce(x, group=g)  # nobody was left inside a collective
    assert x.item() == 4


def test_bad_input_raises_on_every_rank(dist_run):
    dist_run(4, _bad_input_case)
