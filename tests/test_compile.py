"""``torch.compile(fullgraph=True)`` of the single-device models: no graph break, eager's numbers.

Before the kernels were custom ops and the range checks device-side asserts, Dynamo split a small
GPT's loss into 8 graphs (7 breaks: ``.item()`` and ``nonzero`` in the token-id and target checks)
and could not trace the Triton path at all. Now ``fullgraph=True`` (which raises on any break)
compiles GPT and ResNetCNN, forward and backward, and matches eager to 1e-5 (fp32). The tests use
the ``aot_eager`` backend (AOTAutograd's forward/backward graphs, run by eager kernels) to stay
cheap on CPU; Inductor compiles the same graphs (see the README for a run by hand).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers import needs_interpreter, rel_err
from triton_parallel_layers.kernels import conv as conv_mod
from triton_parallel_layers.kernels import conv2d_bias_relu, force_backend
from triton_parallel_layers.models.cnn import CNNConfig, ResNetCNN
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig
from triton_parallel_layers.parallel_layers import ParallelDims, parallelize

RTOL = 1e-5
GPT_CONFIG = dict(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, embed_dim=64, max_seq_len=16,
                  vocab_pad_multiple=8)  # fmt: skip


def _gpt_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 16), generator=gen)
    target = torch.randint(0, 97, (2, 16), generator=gen)
    target[1, :4] = -100
    return ids, target


def _compiled_matches_eager(model: torch.nn.Module, inputs: tuple, **compile_kwargs) -> None:
    """Loss and every gradient of the compiled step equal eager's (``fullgraph=True``: a graph
    break would raise)."""

    def step(*args):
        return model.loss(model(args[0]), args[1])

    eager_loss = step(*inputs)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, **compile_kwargs)
    loss = compiled(*inputs)
    loss.backward()
    assert rel_err(loss.detach(), eager_loss.detach()) <= RTOL
    for (name, p), want in zip(model.named_parameters(), eager_grads):
        assert rel_err(p.grad, want) <= RTOL, name


def test_gpt_compiles_without_graph_breaks():
    torch.manual_seed(0)
    _compiled_matches_eager(GPT(GPTConfig(**GPT_CONFIG)), _gpt_batch(), backend="aot_eager")


def test_resnet_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = ResNetCNN(CNNConfig(width=4, num_stages=2, blocks_per_stage=1))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _compiled_matches_eager(model, (x, torch.tensor([1, 7, 3])), backend="aot_eager")


def test_resnet_compiles_on_the_interpreted_kernels(triton):
    """The Triton path compiles too: the conv op stays one node and runs its kernel."""
    torch.manual_seed(0)
    model = ResNetCNN(CNNConfig(width=4, num_stages=1, blocks_per_stage=1))
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    _compiled_matches_eager(model, (x, torch.tensor([1, 7])), backend="aot_eager")


@needs_interpreter
def test_force_backend_is_honoured_by_a_compiled_function(monkeypatch):
    """The path is read where Dynamo traces (and guards on it), not baked into the op: entering
    force_backend recompiles for the other path."""
    calls = []
    launcher = conv_mod._conv2d_fwd
    monkeypatch.setattr(conv_mod, "_conv2d_fwd", lambda *a: calls.append(1) or launcher(*a))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: conv2d_bias_relu(a, b, padding=1), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    with force_backend("ref"):
        ref = fn(x, w)
    assert calls == []
    with force_backend("triton"):
        out = fn(x, w)
    assert calls == [1]
    with force_backend("ref"):
        fn(x, w)
    assert calls == [1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _tp_sp_graph_breaks(overlap_comm: bool) -> tuple[int, int, float]:
    """A TP=2 GPT with sequence parallelism under torch.compile, forward and backward: (graphs,
    graph breaks, largest relative error of the loss and gradients against eager)."""
    dims = ParallelDims(tp=dist.get_world_size())
    torch.manual_seed(0)
    model = parallelize(GPT(GPTConfig(**GPT_CONFIG)), GPT_TP_PLAN, dims, sequence_parallel=True,
                        overlap_comm=overlap_comm)  # fmt: skip
    ids, target = _gpt_batch()

    def step(a, b):
        return model.loss(model(a), b)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(ids, target)
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        loss = fn(ids, target)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    err = max(rel_err(got, want) for got, want in zip(results[1], results[0]))
    return explained.graph_count, explained.graph_break_count, err


def _tp_sp_cases() -> dict[str, tuple[int, int, float]]:
    return {
        name: _tp_sp_graph_breaks(overlap)
        for name, overlap in (("sp", False), ("sp-overlap", True))
    }


def test_tp_sequence_parallel_gpt_compiles(dist_run):
    """Plain SP: Dynamo traces the collectives of kernels/collectives.py as functional
    collectives. Overlapped SP: the collective matmuls are custom ops (one node each). One graph
    either way, forward and backward equal to eager."""
    for rank_result in dist_run(2, _tp_sp_cases, timeout=600):
        for name, (graphs, breaks, err) in rank_result.items():
            assert (graphs, breaks) == (1, 0), name
            assert err <= RTOL, (name, err)
