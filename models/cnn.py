"""CNNs written for one device, with their tensor-parallel plans.

* :class:`SimpleCNN`: the seed article's example network (conv 1->32 3x3 padding 1, ReLU, 2x2
  max-pool, fully connected to 10 classes), made correct for 28x28 inputs. It trains to over 90%
  test accuracy on scikit-learn's bundled digits in seconds on a CPU::

      python -m triton_parallel_layers.models.cnn --train-digits

* :class:`ResNetCNN`: a deeper, ResNet-style network (configurable width, stages and blocks per
  stage) whose residual blocks are ``relu(x + conv2(relu(conv1(x))))``. Under tensor parallelism
  (:data:`CNN_TP_PLAN`) ``conv1`` becomes a :class:`~triton_parallel_layers.parallel_layers.ColumnParallelConv2d`
  (output channels sharded, bias and ReLU fused in the kernel's epilogue) and ``conv2`` a
  :class:`~triton_parallel_layers.parallel_layers.RowParallelConv2d` (input channels sharded, partial sums all-reduced):
  one all-reduce per block forward and one backward, the activation between the two convs never
  leaves its rank. It has no batch norm (a channel-sharded batch norm would need its own
  collectives); at the depths it is meant for it trains without one.

Every conv followed by a ReLU is a :class:`Conv2dReLU`: an ``nn.Conv2d`` (so ``from_conv`` takes it)
whose forward is :func:`triton_parallel_layers.kernels.conv2d_bias_relu`, one fused kernel.

Shapes: images NCHW ``(N, C, H, W)``, contiguous or channels_last; logits ``(N, num_classes)``,
replicated over the TP group.

**Initialization** is ``nn.Conv2d``/``nn.Linear``'s (Kaiming-uniform weights, uniform biases), drawn
from ``(seed, parameter name)`` alone (:meth:`ResNetCNN.init_weights`), so a model built at any TP
size or on ``meta`` holds the shards of the single-device model with the same seed.

**For pipeline parallelism** each model has ``pipeline_layers()`` (``[stem, blocks..., head]`` for
:class:`ResNetCNN`: applied in order to the images they give the logits, on the parallelized model
too) and ``loss(logits, target, tp_group=None)`` (cross-entropy; the logits are replicated, so the
group is not needed).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from triton_parallel_layers.kernels import conv2d_bias_relu
from triton_parallel_layers.parallel_layers.init import draw_seed, init_by_name_

__all__ = [
    "CNN_TP_PLAN",
    "CNNConfig",
    "Conv2dReLU",
    "ResNetCNN",
    "ResidualBlock",
    "SIMPLE_CNN_TP_PLAN",
    "SimpleCNN",
    "train_digits",
]


class Conv2dReLU(nn.Conv2d):
    """``relu(conv2d(x, weight) + bias)`` in one kernel (:func:`triton_parallel_layers.kernels.conv2d_bias_relu`).

    An ``nn.Conv2d`` (same parameters, same initialization) with ``groups=1``, zero padding given
    as ints. ``activation = "relu"`` tells :func:`triton_parallel_layers.parallel_layers.parallelize` to keep the ReLU
    fused when the conv becomes column-parallel.
    """

    activation = "relu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(
                "Conv2dReLU needs groups=1, padding_mode='zeros' and int padding; got "
                f"groups={self.groups}, padding_mode={self.padding_mode!r}, padding={self.padding!r}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, K, H', W'), the memory format of x kept
        return conv2d_bias_relu(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _init_param(
    name: str, module: nn.Module, shape: torch.Size, gen: torch.Generator
) -> torch.Tensor:
    """``nn.Linear``/``nn.Conv2d``'s default initialization of the full tensor, from ``gen``."""
    if name.endswith("weight"):
        w = torch.empty(shape)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)  # bound sqrt(1 / fan_in)
        return w
    # bias: U(+-1/sqrt(fan_in)), fan_in of the whole (unsharded) layer
    if hasattr(module, "in_channels"):
        fan_in = module.in_channels * math.prod(module.kernel_size)
    else:
        fan_in = module.in_features
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class _SeededModel(nn.Module):
    """``seed``, ``init_weights`` and ``loss`` shared by the CNNs."""

    seed: int

    def init_weights(self, seed: int | None = None, *, skip_meta: bool = False) -> None:
        """(Re)initialize every parameter from ``(seed, its name)``, keeping local shards
        (:func:`triton_parallel_layers.parallel_layers.init.init_by_name_`); ``seed`` defaults to ``self.seed``;
        ``skip_meta``: leave parameters still on ``meta`` alone (a pipeline rank's model)."""
        init_by_name_(self, self.seed if seed is None else seed, _init_param, skip_meta=skip_meta)

    def _maybe_init(self) -> None:
        if not next(self.parameters()).is_meta:
            self.init_weights()

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        tp_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of logits ``(N, classes)`` against ``target`` ``(N,)``. The logits
        are whole on every rank, so ``tp_group`` is accepted (for a uniform interface) and unused."""
        return F.cross_entropy(logits, target)


class SimpleCNN(_SeededModel):
    """The seed article's network, for ``(N, 1, 28, 28)`` images -> logits ``(N, 10)``.

    ``conv1`` (1 -> 32, 3x3, padding 1) + ReLU -> ``(N, 32, 28, 28)``; 2x2 max-pool ->
    ``(N, 32, 14, 14)``; flatten -> ``(N, 6272)``; ``fc`` -> ``(N, 10)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: int = 32,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % 2:
            raise ValueError(f"SimpleCNN: image_size={image_size} must be even (one 2x2 pool)")
        self.seed = draw_seed(seed)
        self.conv1 = Conv2dReLU(in_channels, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        # The fix: the article feeds 32*7*7 features into the linear layer, which is what *two*
        # 2x2 pools of a 28x28 image leave (28 -> 14 -> 7). With its single pool the map is
        # 14x14, so the layer takes 32*14*14 = 6272 features (in general
        # channels * (image_size/2)^2). We keep the article's one conv + one pool and size the
        # linear layer to what they produce.
        side = image_size // 2
        self.fc = nn.Linear(channels * side * side, num_classes)
        self._maybe_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))  # (N, 32, 14, 14)
        return self.fc(self.flatten(x))  # (N, 10)

    def pipeline_layers(self) -> list[nn.Module]:
        """``[conv1, pool, flatten, fc]``: their composition is ``forward``."""
        return [self.conv1, self.pool, self.flatten, self.fc]


# conv1's output channels sharded: after the pool and the (channel-major) flatten each rank holds
# a contiguous chunk of fc's input features, exactly what a row-parallel fc takes.
SIMPLE_CNN_TP_PLAN: dict[str, str] = {"conv1": "colwise_conv", "fc": "rowwise"}


@dataclass
class CNNConfig:
    """Shape of a :class:`ResNetCNN`; checked in ``__post_init__``."""

    in_channels: int = 1
    """Image channels ``C``."""
    num_classes: int = 10
    """Classes (logit width)."""
    width: int = 32
    """Channels of the first stage; each later stage doubles them (divisible by ``tp``)."""
    num_stages: int = 2
    """Stages; every stage after the first starts with a stride-2 conv + ReLU (halving H, W)."""
    blocks_per_stage: int = 2
    """Residual blocks per stage (depth)."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "width", "num_stages", "blocks_per_stage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CNNConfig.{name}={value!r}: expected a positive int")


class ResidualBlock(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))``, 3x3 convs, ``(N, C, H, W) -> (N, C, H, W)``.

    Under TP, ``conv1`` is column-parallel with the ReLU fused (``(N, C/p, H, W)`` between the
    convs) and ``conv2`` row-parallel (all-reduce, bias once); the residual sum is replicated.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = Conv2dReLU(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class CNNHead(nn.Module):
    """Global average pool + linear: ``(N, C, H, W) -> (N, C) -> (N, classes)``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNetCNN(_SeededModel):
    """ResNet-style CNN: stem conv + ReLU, stages of residual blocks, pool + linear head.

    ``stem``: ``(N, C, H, W) -> (N, width, H, W)``; ``blocks``: for each stage after the first a
    stride-2 :class:`Conv2dReLU` doubling the channels, then ``blocks_per_stage``
    :class:`ResidualBlock`; ``head``: ``(N, width * 2^(stages-1), H', W') -> (N, classes)``.

    Args:
        config: the shape.
        seed: initialization seed; ``None`` draws one from the default CPU generator.
    """

    def __init__(self, config: CNNConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.seed = draw_seed(seed)
        c = config.width
        self.stem = Conv2dReLU(config.in_channels, c, 3, padding=1)
        blocks: list[nn.Module] = []
        for stage in range(config.num_stages):
            if stage:
                blocks.append(Conv2dReLU(c, 2 * c, 3, stride=2, padding=1))
                c *= 2
            blocks.extend(ResidualBlock(c) for _ in range(config.blocks_per_stage))
        self.blocks = nn.ModuleList(blocks)
        self.head = CNNHead(c, config.num_classes)
        self._maybe_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images ``(N, C, H, W)`` -> logits ``(N, classes)``."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def pipeline_layers(self) -> list[nn.Module]:
        """``[stem, *blocks, head]``: applied in order to the images they give the logits."""
        return [self.stem, *self.blocks, self.head]


# Residual blocks: conv1 column-parallel (ReLU fused), conv2 row-parallel. Stem, stride-2 convs
# and head stay replicated (small, and their inputs are whole on every rank anyway).
CNN_TP_PLAN: dict[str, str] = {
    "blocks.*.conv1": "colwise_conv",
    "blocks.*.conv2": "rowwise_conv",
}


# ---------------------------------------------------------------------------------------------
# Training the seed CNN on real digits
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Fraction of ``x`` ``(N, C, H, W)`` that ``model`` classifies as ``y`` ``(N,)``."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    model.train(was_training)
    return correct / len(y)


def train_digits(
    *, epochs: int = 4, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log: bool = False
) -> dict:
    """Train :class:`SimpleCNN` on scikit-learn's digits upsampled to 28x28 (no download).

    Adam with the learning rate decayed linearly to 0, cross-entropy, the 80/20 split of :func:`triton_parallel_layers.models.data.load_digits_28`. Returns
    ``{"test_accuracy", "train_accuracy", "seconds", "epochs"}``.
    """
    from triton_parallel_layers.models.data import load_digits_28

    start = time.perf_counter()
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_28(seed=seed)
    model = SimpleCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y_train) + batch_size - 1) // batch_size)
    # linear decay to zero: the last epochs settle instead of bouncing around the optimum
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = model.loss(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log:
            acc = accuracy(model, x_test, y_test)
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {acc:.4f}", flush=True)
    return {
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "seconds": time.perf_counter() - start,
        "epochs": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="triton_parallel_layers.models.cnn: train the seed CNN on digits"
    )
    parser.add_argument("--train-digits", action="store_true", help="train SimpleCNN on digits")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.train_digits:
        parser.print_help()
        return
    result = train_digits(epochs=args.epochs, seed=args.seed, log=True)
    print(
        f"SimpleCNN on sklearn digits (28x28): test accuracy {result['test_accuracy']:.4f}, "
        f"train accuracy {result['train_accuracy']:.4f}, {result['seconds']:.1f} s "
        f"({args.epochs} epochs, CPU, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
