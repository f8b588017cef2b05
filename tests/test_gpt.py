"""GPT: the tensor-parallel model against the single-device one, on gloo at TP = 1, 2, 4.

Every rank builds the single-device GPT and the parallelized one from the same seed, runs both on
the same batch and compares the loss, every parameter's gradient (this rank's shard of the
single-device gradient) and the loss curve over 10 AdamW steps. fp32; the tolerance is normwise:
``max|ours - ref| <= RTOL * max|ref|`` per tensor, with ``RTOL = 1e-5`` (measured: ~1e-7 for the
gradients, a few 1e-7 on the losses after 10 steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import expect_error, rel_err, seeded
from triton_parallel_layers.kernels.collectives import record_comm
from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig
from triton_parallel_layers.parallel_layers import ParallelDims, parallelize
from triton_parallel_layers.parallel_layers.checks import debug_checks
from triton_parallel_layers.parallel_layers.sequence_parallel import (
    SequenceParallelDropout,
    allreduce_sequence_parallel_grads,
)
from triton_parallel_layers.parallel_layers.sharding import param_sharding

RTOL = 1e-5
B, S = 2, 16  # S divisible by 4 for sequence parallelism
STEPS = 10

CONFIGS = {
    # LayerNorm with biases, tied embeddings, grouped-query attention, vocab 97 padded to 104.
    # (Head dim 16: the attention kernel's smallest.)
    "ln-tied-gqa": dict(vocab_size=97, n_layers=2, n_heads=8, n_kv_heads=4, embed_dim=128,
                        max_seq_len=32, vocab_pad_multiple=8, bias=True, norm="layernorm"),
    # RMSNorm, no biases, separate head, vocab 96 (no padding at tp 1, 2, 4)
    "rms-untied": dict(vocab_size=96, n_layers=2, n_heads=4, embed_dim=64, max_seq_len=32,
                       vocab_pad_multiple=4, tie_embeddings=False, norm="rmsnorm"),
}  # fmt: skip


def _shard_pairs(par: torch.nn.Module, ref: torch.nn.Module):
    """``(name, local param, this rank's shard of the matching single-device param, dim)``."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for mname, module in par.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}"
            dim, parts, rank = param_sharding(module, pname)
            full = ref_params[name]
            yield name, p, full, (dim, parts, rank)


def _local(full: torch.Tensor, spec) -> torch.Tensor:
    dim, parts, rank = spec
    return full if dim is None else full.chunk(parts, dim)[rank]


def _batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = seeded(seed)
    tokens = torch.randint(0, vocab, (B, S + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _parity_case(cfg_kwargs: dict, sequence_parallel: bool, overlap_comm: bool) -> dict:
    dims = ParallelDims(tp=dist.get_world_size())
    cfg = GPTConfig(**cfg_kwargs)
    torch.manual_seed(0)
    ref = GPT(cfg)
    torch.manual_seed(0)
    par = parallelize(GPT(cfg), GPT_TP_PLAN, dims, sequence_parallel=sequence_parallel,
                      overlap_comm=overlap_comm)  # fmt: skip
    errors: dict[str, float] = {}

    # Initialization: exactly the shards of the single-device model.
    for name, p, full, spec in _shard_pairs(par, ref):
        assert torch.equal(p.detach(), _local(full.detach(), spec)), f"init of {name}"
    if cfg.tie_embeddings:
        assert par.head.proj.weight is par.embed.tok.weight

    # One forward/backward: loss and every gradient.
    ids, target = _batch(cfg.vocab_size, 1)
    ref_loss = ref.loss(ref(ids), target)
    ref_loss.backward()
    with record_comm() as ledger:
        logits = par(ids)
        loss = par.loss(logits, target)
    with record_comm() as backward_ledger:
        loss.backward()
    with record_comm() as sp_ledger:
        allreduce_sequence_parallel_grads(par)
    tp = dims.tp
    if sequence_parallel and tp > 1:
        # The replicated parameters of the sequence-parallel regions (the norms, the row-parallel
        # biases) are not all-reduced in the backward, one by one, but once, all together.
        assert backward_ledger.calls["all_reduce"] == 0, str(backward_ledger)
        replicated = [n for n, _ in ref.named_parameters() if "norm" in n]
        replicated += [
            n for n, _ in ref.named_parameters() if n.endswith(("proj.bias", "fc2.bias"))
        ]
        params = dict(ref.named_parameters())
        numel = sum(params[n].numel() for n in replicated)
        assert sp_ledger.calls == {"all_reduce": 1}, str(sp_ledger)
        assert sp_ledger.bytes_sent["all_reduce"] == round(2 * (tp - 1) / tp * 4 * numel)
    else:
        assert sp_ledger.calls == {}, str(sp_ledger)
    assert logits.shape == (B, S, cfg.padded_vocab_size // tp)
    if not sequence_parallel:  # vocab-parallel loss: nothing is gathered, logits included
        assert ledger.calls["all_gather"] == 0, str(ledger)
    errors["loss"] = rel_err(loss.detach(), ref_loss.detach())
    grad_err = 0.0
    for name, p, full, spec in _shard_pairs(par, ref):
        assert p.grad is not None, f"{name} has no gradient"
        err = rel_err(p.grad, _local(full.grad, spec))
        assert err <= RTOL, f"{name} grad: relative error {err:.3g} > {RTOL}"
        grad_err = max(grad_err, err)
    errors["grad"] = grad_err

    # Padded vocabulary columns are -inf wherever they live (never sampled, never in the loss).
    start, end = par.head.vocab_range()
    pad = torch.arange(start, end) >= cfg.vocab_size
    assert torch.isneginf(logits[..., pad]).all() and torch.isfinite(logits[..., ~pad]).all()

    # The pipeline view composes to the forward pass, on the parallelized model too.
    with torch.no_grad():
        x = ids
        for layer in par.pipeline_layers():
            x = layer(x)
        assert torch.equal(x, logits.detach())

    # The loss curve over 10 optimizer steps.
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt_par = torch.optim.AdamW(par.parameters(), lr=3e-3)
    curve_err = 0.0
    for step in range(STEPS):
        ids, target = _batch(cfg.vocab_size, 100 + step)
        losses = []
        for model, opt in ((ref, opt_ref), (par, opt_par)):
            opt.zero_grad(set_to_none=True)
            losses.append(model.loss(model(ids), target))
            losses[-1].backward()
            allreduce_sequence_parallel_grads(model)  # nothing to do on the reference
            opt.step()
        err = rel_err(losses[1].detach(), losses[0].detach())
        assert err <= RTOL, f"step {step}: loss {losses[1].item()} vs {losses[0].item()}"
        curve_err = max(curve_err, err)
    errors["curve"] = curve_err
    assert errors["loss"] <= RTOL, errors
    return errors


MODES = {  # sequence_parallel, overlap_comm
    "tp": (False, False),
    "sp": (True, False),
    "sp-overlap": (True, True),
}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_gpt_matches_single_device(dist_run, world_size):
    """Both configs in all three modes (TP, TP + SP, TP + SP + overlap) in one pool call."""
    results = dist_run(world_size, _all_parity_cases, timeout=300)
    for name, errs in results[0].items():
        print(f"tp={world_size} {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


def _all_parity_cases() -> dict:
    out = {}
    for cname, cfg in CONFIGS.items():
        for mname, (sp, ov) in MODES.items():
            if dist.get_world_size() == 1 and mname != "tp":
                continue  # at tp=1 the modes are the same model
            out[f"{cname}/{mname}"] = _parity_case(cfg, sp, ov)
    return out


def _dropout_case() -> None:
    """dropout > 0: equal to one device when the TP ranks share their RNG state, with and
    without sequence parallelism (the SP dropout draws the whole sequence's mask)."""
    dims = ParallelDims(tp=dist.get_world_size())
    cfg = GPTConfig(**{**CONFIGS["ln-tied-gqa"], "dropout": 0.2})
    for sp in (False, True):
        torch.manual_seed(0)
        ref = GPT(cfg)
        torch.manual_seed(0)
        par = parallelize(GPT(cfg), GPT_TP_PLAN, dims, sequence_parallel=sp)
        assert isinstance(par.blocks[0].drop, SequenceParallelDropout) == sp
        ids, target = _batch(cfg.vocab_size, 3)
        torch.manual_seed(42)
        ref_loss = ref.loss(ref(ids), target)
        torch.manual_seed(42)
        loss = par.loss(par(ids), target)
        ref_loss.backward()
        loss.backward()
        allreduce_sequence_parallel_grads(par)
        assert rel_err(loss.detach(), ref_loss.detach()) <= RTOL, (sp, loss, ref_loss)
        for name, p, full, spec in _shard_pairs(par, ref):
            err = rel_err(p.grad, _local(full.grad, spec))
            assert err <= RTOL, f"sp={sp} {name} grad: {err:.3g}"
        # eval mode: no dropout at all
        ref.eval(), par.eval()
        with torch.no_grad():
            ref_eval, par_eval = ref.loss(ref(ids), target), par.loss(par(ids), target)
        assert rel_err(par_eval, ref_eval) <= RTOL
        assert rel_err(ref_loss.detach(), ref_eval) > 1e-3  # dropout did drop something


def test_dropout_matches_single_device(dist_run):
    dist_run(2, _dropout_case)


def _meta_case() -> None:
    """Built on meta, parallelized, materialized: exactly the shards of the full build."""
    dims = ParallelDims(tp=dist.get_world_size())
    for cfg_kwargs in CONFIGS.values():
        cfg = GPTConfig(**cfg_kwargs)
        torch.manual_seed(7)
        full = GPT(cfg)
        torch.manual_seed(7)
        with torch.device("meta"):
            model = GPT(cfg)
        model = parallelize(model, GPT_TP_PLAN, dims, sequence_parallel=True)
        assert all(p.is_meta for p in model.parameters())
        model.to_empty(device=torch.get_default_device())
        model.init_weights()
        for name, p, ref_p, spec in _shard_pairs(model, full):
            assert torch.equal(p.detach(), _local(ref_p.detach(), spec)), name
        if cfg.tie_embeddings:
            assert model.head.proj.weight is model.embed.tok.weight
        # and it runs: the same loss as the full model
        ids, target = _batch(cfg.vocab_size, 5)
        with torch.no_grad():
            a, b = model.loss(model(ids), target), full.loss(full(ids), target)
        assert rel_err(a, b) <= RTOL


@pytest.mark.parametrize("world_size", [2, 4])
def test_meta_build_holds_the_full_build_shards(dist_run, world_size):
    dist_run(world_size, _meta_case)


def _bad_tp_case() -> None:
    """A size tp does not divide: one error on every rank, naming every offending module."""
    dims = ParallelDims(tp=dist.get_world_size())
    cfg = GPTConfig(vocab_size=97, n_layers=2, n_heads=6, embed_dim=96, mlp_ratio=2.0,
                    vocab_pad_multiple=2)  # fmt: skip
    msg = expect_error(ValueError, r"not divisible by the tensor-parallel size 4",
                       parallelize, GPT(cfg), GPT_TP_PLAN, dims)  # fmt: skip
    for name in ("embed.tok: num_embeddings=98", "blocks.0.attn: num_heads=6",
                 "blocks.1.attn: num_heads=6", "head.proj: out_features=98"):  # fmt: skip
        assert name in msg, msg
    x = torch.ones(1)
    dist.all_reduce(x)  # every rank got here: nobody is stuck in a collective
    assert x.item() == 4


def test_bad_sizes_raise_on_every_rank(dist_run):
    dist_run(4, _bad_tp_case)


# -- single process ------------------------------------------------------------------------------
def test_config_validation():
    GPTConfig(vocab_size=10, n_layers=1, n_heads=2, embed_dim=32)
    bad = [
        (dict(n_layers=0), r"n_layers=0: expected a positive int"),
        (
            dict(n_heads=4, n_kv_heads=3, embed_dim=32),
            r"n_heads=4 is not a multiple of n_kv_heads=3",
        ),
        (dict(n_heads=4, embed_dim=30), r"embed_dim=30 must divide by n_heads=4"),
        (dict(n_heads=4, embed_dim=96), r"into a head dim the attention kernel supports"),
        (dict(mlp_ratio=1.3, embed_dim=64, n_heads=4), r"must be a positive whole number"),
        (dict(dropout=1.0), r"dropout=1.0"),
        (dict(norm="batchnorm"), r"norm='batchnorm'"),
    ]
    for kwargs, match in bad:
        expect_error(ValueError, match, GPTConfig, **kwargs)
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304


def test_padding_and_loss_inputs():
    cfg = GPTConfig(**CONFIGS["ln-tied-gqa"])
    torch.manual_seed(0)
    model = GPT(cfg)
    ids, target = _batch(cfg.vocab_size, 0)
    logits = model(ids)
    assert logits.shape == (B, S, 104) and torch.isneginf(logits[..., 97:]).all()
    # the loss equals F.cross_entropy over the real vocabulary alone
    expected = torch.nn.functional.cross_entropy(
        logits[..., :97].reshape(-1, 97), target.reshape(-1)
    )
    assert rel_err(model.loss(logits, target), expected) <= RTOL
    target_pad = target.clone()
    target_pad[0, 0] = 100
    with debug_checks():  # the opt-in eager checks name the bad value
        expect_error(ValueError, r"target id 100 is a padding id", model.loss, logits, target_pad)
        expect_error(ValueError, r"token id 97 is outside the vocabulary \[0, 97\)",
                     model, torch.full((1, 4), 97))  # fmt: skip
    # by default device-side asserts (a RuntimeError on CPU), no host sync
    expect_error(RuntimeError, r"a target id is a padding id", model.loss, logits, target_pad)
    expect_error(RuntimeError, r"a token id is outside the vocabulary \[0, 97\)",
                 model, torch.full((1, 4), 97))  # fmt: skip
    expect_error(ValueError, r"exceeds max_seq_len=32", model, torch.zeros(1, 33, dtype=torch.long))
    # the seed decides the initialization, whatever ran before
    torch.manual_seed(1)
    torch.randn(10)
    other = GPT(cfg, seed=model.seed)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
