"""CNNs: the seed network on real digits, and the ResNet-style CNN under TP at 1, 2, 4 ranks.

Parity is checked as in ``test_gpt.py``: same seed, same batch, the loss, every gradient (this
rank's shard of the single-device one) and a 10-step AdamW loss curve, fp32, normwise relative
error ``<= RTOL = 1e-5`` per tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers import expect_error, rel_err
from triton_parallel_layers.models.cnn import (
    CNN_TP_PLAN,
    SIMPLE_CNN_TP_PLAN,
    CNNConfig,
    Conv2dReLU,
    ResNetCNN,
    SimpleCNN,
    train_digits,
)
from triton_parallel_layers.parallel_layers import (
    ColumnParallelConv2d,
    ParallelDims,
    RowParallelConv2d,
    parallelize,
)
from triton_parallel_layers.parallel_layers.sharding import param_sharding

RTOL = 1e-5
STEPS = 10
CFG = dict(width=8, num_stages=2, blocks_per_stage=1)  # stem, block(8), down 8->16, block(16)


def _shard(full: torch.Tensor, module: nn.Module, pname: str) -> torch.Tensor:
    """This rank's shard of a single-device tensor, as ``module`` holds its ``pname``."""
    dim, parts, rank = param_sharding(module, pname)
    return full if dim is None else full.chunk(parts, dim)[rank]


def _pairs(par: nn.Module, ref: nn.Module):
    """``(name, local param, this rank's shard of the single-device param)``."""
    ref_params = dict(ref.named_parameters())
    for mname, module in par.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            yield f"{mname}.{pname}", p, _shard(ref_params[f"{mname}.{pname}"], module, pname)


def _grad_pairs(par: nn.Module, ref: nn.Module):
    """``(name, local grad, this rank's shard of the single-device grad)``."""
    ref_params = dict(ref.named_parameters())
    for mname, module in par.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = ref_params[f"{mname}.{pname}"].grad
            yield f"{mname}.{pname}", p.grad, _shard(full, module, pname)


def _cnn_case() -> dict:
    dims = ParallelDims(tp=dist.get_world_size())
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    ref = ResNetCNN(CNNConfig(**CFG))
    torch.manual_seed(0)
    par = parallelize(ResNetCNN(CNNConfig(**CFG)), CNN_TP_PLAN, dims)
    if dims.tp > 1:
        assert isinstance(par.blocks[0].conv1, ColumnParallelConv2d) and par.blocks[0].conv1.relu
        assert isinstance(par.blocks[0].conv2, RowParallelConv2d)
    for name, p, expected in _pairs(par, ref):
        assert torch.equal(p.detach(), expected.detach()), f"init of {name}"

    x = torch.randn(4, 1, 16, 16, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    errors = {}
    ref_loss = ref.loss(ref(x), y)
    ref_loss.backward()
    logits = par(x)
    loss = par.loss(logits, y, dims.tp_group)
    loss.backward()
    errors["loss"] = rel_err(loss.detach(), ref_loss.detach())
    errors["grad"] = 0.0
    for name, g, expected in _grad_pairs(par, ref):
        err = rel_err(g, expected)
        assert err <= RTOL, f"{name} grad: {err:.3g}"
        errors["grad"] = max(errors["grad"], err)
    with torch.no_grad():  # the pipeline view composes to forward on the parallel model
        h = x
        for layer in par.pipeline_layers():
            h = layer(h)
        assert torch.equal(h, logits.detach())

    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt_par = torch.optim.AdamW(par.parameters(), lr=3e-3)
    errors["curve"] = 0.0
    for _ in range(STEPS):
        x = torch.randn(4, 1, 16, 16, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        losses = []
        for model, opt in ((ref, opt_ref), (par, opt_par)):
            opt.zero_grad(set_to_none=True)
            losses.append(model.loss(model(x), y))
            losses[-1].backward()
            opt.step()
        err = rel_err(losses[1].detach(), losses[0].detach())
        assert err <= RTOL, f"loss {losses[1].item()} vs {losses[0].item()}"
        errors["curve"] = max(errors["curve"], err)
    assert errors["loss"] <= RTOL, errors

    # Meta build: the local shards are the full build's.
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = ResNetCNN(CNNConfig(**CFG))
    meta = parallelize(meta, CNN_TP_PLAN, dims).to_empty(device="cpu")
    meta.init_weights()
    torch.manual_seed(0)
    full = ResNetCNN(CNNConfig(**CFG))
    for name, p, expected in _pairs(meta, full):
        assert torch.equal(p.detach(), expected.detach()), f"meta build of {name}"

    # The seed CNN with its plan (conv column-parallel, fc row-parallel): one step.
    torch.manual_seed(2)
    simple_ref = SimpleCNN()
    torch.manual_seed(2)
    simple = parallelize(SimpleCNN(), SIMPLE_CNN_TP_PLAN, dims)
    x = torch.randn(2, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (2,), generator=gen)
    a, b = simple_ref.loss(simple_ref(x), y), simple.loss(simple(x), y)
    a.backward()
    b.backward()
    assert rel_err(b.detach(), a.detach()) <= RTOL
    for name, g, expected in _grad_pairs(simple, simple_ref):
        assert rel_err(g, expected) <= RTOL, f"SimpleCNN {name} grad"
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_cnn_matches_single_device(dist_run, world_size):
    errors = dist_run(world_size, _cnn_case, timeout=300)[0]
    print(f"tp={world_size}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))


# -- single process ------------------------------------------------------------------------------
def test_simple_cnn_shapes_and_the_fixed_linear_layer():
    torch.manual_seed(0)
    model = SimpleCNN()
    assert model.fc.in_features == 32 * 14 * 14  # one 2x2 pool of 28x28 leaves 14x14, not 7x7
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    conv, fc = model.conv1, model.fc
    h = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 2)  # (3, 32, 14, 14)
    torch.testing.assert_close(model(x), F.linear(h.flatten(1), fc.weight, fc.bias))
    expect_error(ValueError, r"image_size=27 must be even", SimpleCNN, image_size=27)


def test_conv_relu_and_resnet_shapes():
    torch.manual_seed(0)
    conv = Conv2dReLU(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(conv(x), F.relu(nn.Conv2d.forward(conv, x)))
    expect_error(ValueError, r"groups=1", Conv2dReLU, 4, 4, 3, groups=2)
    model = ResNetCNN(CNNConfig(in_channels=3, num_classes=7, width=4, num_stages=3))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert len(model.pipeline_layers()) == 1 + 3 * 2 + 2 + 1  # stem, blocks, downsamples, head
    expect_error(ValueError, r"CNNConfig.width=0", CNNConfig, width=0)
    # a fused conv + ReLU cannot be row-parallel: the plan says so before anything runs
    expect_error(ValueError, r"fused conv \+ relu cannot be row-parallel",
                 parallelize, model, {"blocks.*.conv1": "rowwise_conv"}, None)  # fmt: skip


def test_seed_cnn_learns_digits():
    """``python -m triton_parallel_layers.models.cnn --train-digits``: over 90% test accuracy, on CPU, in seconds."""
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (dev extra)")
    result = train_digits(epochs=3, seed=0)
    print(f"digits: {result}")
    assert result["test_accuracy"] > 0.9, result
