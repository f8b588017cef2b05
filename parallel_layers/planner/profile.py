"""What the planner needs to know of a model: per pipeline layer, its FLOPs, parameters, bytes
moved, activations saved for backward, output sent to the next stage, and tensor-parallel traffic.

:func:`profile_model` measures these by running the model's ``pipeline_layers()`` once on a sample
microbatch, on the ``meta`` device when the model is there (no memory, no compute: a 1T-parameter
GPT profiles in seconds) or on real tensors otherwise, under three observers:

* ``torch.utils.flop_counter.FlopCounterMode``: the FLOPs of the matrix products (what runs on the
  tensor cores);
* a dispatch mode that adds up the bytes read and written by every other op (norms, activations,
  softmax, residual adds: the memory-bound work between the GEMMs), as eager execution moves them;
* saved-tensor hooks: the activation bytes autograd keeps for backward (parameters excluded; each
  set of elements once; the layer's input apart, since the layer before may hold it already; with
  ``loss=`` what the loss saves, as the last layer's), split into those saved inside modules the
  tensor-parallel plan shards (divided by ``tp``) and the rest (divided by ``tp`` only under
  sequence parallelism).

Forward hooks on the modules the plan names record the activations that cross tensor-parallel
collectives: the inputs of column-parallel modules and the outputs of row-parallel ones. Byte
counts are at the compute dtype (``dtype``), whatever dtype the profile ran in.

Backward is modeled as twice the forward's matmul FLOPs and bytes moved (the input- and
weight-gradient products), its weight-gradient half separable for zero-bubble schedules. With
``time_layers=True`` each layer's forward and forward+backward are also timed on this machine, at
the sample's rows and at a second row count (half of them; twice, for one row), and each time is
split by the straight line through the two into a fixed part (per-op overhead: kernel launches,
Python and autograd dispatch, paid per pass whatever the rows) and a part proportional to the
rows. The cost model uses those times, shrinking only the proportional part with tp and with
smaller microbatches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from triton_parallel_layers.parallel_layers.planner import _json

__all__ = ["DTYPE_BYTES", "LayerProfile", "ModelProfile", "profile_model"]

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Plan styles whose module's input crosses a collective (all-gather under SP, all-reduce of its
# gradient otherwise), and those whose output does (reduce-scatter under SP, all-reduce otherwise).
_INPUT_COLLECTIVE = {"colwise", "attention", "colwise_conv"}
_OUTPUT_COLLECTIVE = {"rowwise", "attention", "vocab", "rowwise_conv"}


@dataclass
class LayerProfile:
    """One pipeline layer, for one microbatch of the profile's ``batch`` (all sizes at tp = 1)."""

    name: str
    """The layer's class name and index (``"Block[3]"``)."""
    matmul_flops: float
    """Forward FLOPs in matrix products (tensor-core work)."""
    other_bytes: float
    """Forward bytes read + written by the non-matmul ops (memory-bound work)."""
    sharded_other_bytes: float
    """Of ``other_bytes``, those moved inside modules the TP plan shards."""
    params: int
    """Parameters the layer holds (shared ones included)."""
    sharded_params: int
    """Of ``params``, those the TP plan shards (the rest are replicated over tp)."""
    saved_bytes: float
    """Activation bytes saved for backward, parameters and the layer's input excluded (each set
    of elements once, as :class:`~triton_parallel_layers.parallel_layers.pipeline.
    ActivationMemoryTracker` counts them)."""
    sharded_saved_bytes: float
    """Of ``saved_bytes``, those saved inside modules the TP plan shards."""
    out_bytes: float
    """Bytes of the layer's output: what a stage boundary after it sends."""
    in_bytes: float = 0.0
    """Bytes of the layer's input."""
    input_saved_bytes: float = 0.0
    """Bytes of the layer's input that it saves for backward (0 if it saves none): held once
    with the previous layer's output (see ``saves_output``)."""
    saves_output: bool = False
    """Whether ``saved_bytes`` holds the layer's output (so a next layer saving its input adds
    nothing)."""
    tp_in_bytes: float = 0.0
    """Bytes of the inputs of column-parallel modules (one collective each, forward or backward)."""
    tp_out_bytes: float = 0.0
    """Bytes of the outputs of row-parallel modules (one collective each)."""
    tp_collectives: int = 0
    """How many TP collectives a forward of the layer runs (as many again in backward)."""
    seconds: float | None = None
    """Measured forward+backward time of the layer at the profile's batch, if asked for; the cost
    model then uses the measured times instead of the FLOP and byte counts (see :mod:`.cost`)."""
    forward_seconds: float | None = None
    """Of ``seconds``, the forward's (measured with it)."""
    weight_grad_seconds: float | None = None
    """Of ``seconds``, the weight-gradient pass's, where known (layers of declared cost); else the
    cost model splits the backward by its FLOPs and bytes."""
    fixed_seconds: float | None = None
    """Of ``seconds``, the part that does not grow with the rows (per-op overhead), from the
    layer timed at two row counts; ``None`` (profiles saved before it was measured) counts all of
    ``seconds`` as proportional to the rows."""
    fixed_forward_seconds: float | None = None
    """Of ``forward_seconds``, the part that does not grow with the rows."""


@dataclass
class ModelProfile:
    """The per-layer profile of a model at one microbatch size."""

    name: str
    """What was profiled (the model's class)."""
    layers: list[LayerProfile]
    """``pipeline_layers()`` in order."""
    batch: int
    """Samples in the profiled microbatch; costs scale linearly with the microbatch size."""
    tokens_per_sample: int
    """Tokens (sequence length) per sample, 1 for images: what throughput counts."""
    dtype: str
    """The compute dtype the byte counts are given in."""
    tp_divides: dict[str, int] = field(default_factory=dict)
    """Sizes the TP degree must divide (``{"blocks.0.attn heads": 12, ...}``), from the plan."""
    shared_params: list[tuple[list[int], int, bool]] = field(default_factory=list)
    """Parameters several layers use (tied embeddings): ``(layer indices, numel, sharded)``. Each
    layer's ``params`` counts them; a rank holding several of those layers holds them once."""
    model_flops_per_sample: float | None = None
    """FLOPs of one sample's forward+backward by the model's own count (for MFU); default
    ``3 x`` the matmul FLOPs."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def flops_per_sample(self) -> float:
        if self.model_flops_per_sample is not None:
            return self.model_flops_per_sample
        return 3 * sum(layer.matmul_flops for layer in self.layers) / self.batch

    def to_json(self, path: str | Path | None = None) -> str:
        return _json.dump(self, path)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelProfile:
        data = _json.load(text_or_path)
        data["layers"] = [LayerProfile(**layer) for layer in data["layers"]]
        return cls(**data)


class _BytesMoved(TorchDispatchMode):
    """Adds up the bytes of tensor inputs and outputs of every op that is not a matmul."""

    _MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "convolution",
                "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention"}  # fmt: skip
    # Views, shape queries and constructors move no data.
    _FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice",
             "select", "unsqueeze", "squeeze", "split", "chunk", "detach", "alias", "as_strided",
             "unbind", "split_with_sizes", "empty", "zeros", "ones", "full", "empty_like",
             "zeros_like", "ones_like", "lift_fresh", "_to_copy", "arange", "unflatten",
             "flatten", "contiguous"}  # fmt: skip

    def __init__(self, itemsize: int, inside: list[int]) -> None:
        super().__init__()
        self.itemsize = itemsize
        self.inside = inside  # any() while an op works on sharded data
        self.bytes = 0.0
        self.sharded_bytes = 0.0

    def _size(self, t: Any) -> float:
        if not isinstance(t, torch.Tensor):
            return 0.0
        item = self.itemsize if t.is_floating_point() else t.element_size()
        return float(t.numel() * item)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name not in self._MATMULS and name not in self._FREE:
            ins, _ = tree_flatten((args, kwargs))
            outs, _ = tree_flatten(out)
            moved = sum(map(self._size, ins)) + sum(map(self._size, outs))
            self.bytes += moved
            if any(self.inside):
                self.sharded_bytes += moved
        return out


def _shared(layers: Sequence[nn.Module], sharded: set[int]) -> list[tuple[list[int], int, bool]]:
    """``(layer indices, numel, sharded)`` of each parameter used by several layers."""
    used: dict[int, tuple[nn.Parameter, list[int]]] = {}
    for index, layer in enumerate(layers):
        for p in layer.parameters():
            used.setdefault(id(p), (p, []))[1].append(index)
    return [(idx, p.numel(), id(p) in sharded) for p, idx in used.values() if len(idx) > 1]


def _elements(t: torch.Tensor) -> tuple[int, int, int]:
    """Which elements ``t`` views: (its storage, offset, numel); on ``meta`` too."""
    return (t.untyped_storage()._cdata, t.storage_offset(), t.numel())


def _time_layer(layer: nn.Module, inputs: Sequence[tuple[torch.Tensor, Any]], repeats: int):
    """Per ``(x, loss)`` of ``inputs``: (forward seconds, forward+backward seconds, output) of
    ``layer`` on ``x`` (with ``loss`` ``(loss_fn, target)`` after it when not ``None``): the
    medians of ``repeats`` runs after one warm-up, the inputs taking turns (so a change of the
    machine's load hits them alike); the layer's ``.grad`` are cleared after."""
    forward = [[] for _ in inputs]
    total = [[] for _ in inputs]
    outs = [None] * len(inputs)
    for i in range(repeats + 1):
        for k, (x, loss) in enumerate(inputs):
            inp = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            y = layer(inp)
            out = y[0] if isinstance(y, tuple) else y
            root = loss[0](out, loss[1]) if loss is not None else out
            mid = time.perf_counter()
            if root.requires_grad:
                root.backward(torch.ones_like(root))
            end = time.perf_counter()
            if i:
                forward[k].append(mid - start)
                total[k].append(end - start)
            outs[k] = out.detach()
    layer.zero_grad(set_to_none=True)
    med = statistics.median
    return [(med(f), med(t), out) for f, t, out in zip(forward, total, outs)]


def _fixed_part(rows: tuple[int, int], seconds: tuple[float, float]) -> float:
    """The intercept at zero rows of the line through ``(rows[i], seconds[i])``: the part of a
    pass that does not grow with the rows, clamped to ``[0, the smaller time]`` (timing noise can
    put the line's intercept outside)."""
    (r1, r2), (t1, t2) = rows, seconds
    fixed = (r2 * t1 - r1 * t2) / (r2 - r1)
    return min(max(fixed, 0.0), t1, t2)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows (samples) of batch-first ``t``: its first ``n``, or it repeated."""
    return t[:n] if n <= t.shape[0] else t.repeat(-(-n // t.shape[0]), *[1] * (t.dim() - 1))[:n]


def _plan_styles(model: nn.Module, plan: Mapping[str, Any] | None) -> dict[str, str]:
    if not plan:
        return {}
    from triton_parallel_layers.parallel_layers.parallelize import match_plan

    matched = match_plan(model, plan)
    return {
        name: (value if isinstance(value, str) else value["style"])
        for name, value in ((n, plan[k]) for n, k in matched.items())
    }


def _tp_divides(model: nn.Module, styles: Mapping[str, str]) -> dict[str, int]:
    """Sizes the tensor-parallel degree must divide, from the modules the plan shards (the first
    module of each kind and size stands for the others: ``blocks.0.attn num_heads``)."""
    sizes: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name, style in styles.items():
        m = modules[name]
        if style in ("colwise", "rowwise") and isinstance(m, nn.Linear):
            sizes[f"{name} features"] = m.out_features if style == "colwise" else m.in_features
        elif style == "vocab" and isinstance(m, nn.Embedding):
            sizes[f"{name} rows"] = m.num_embeddings
        elif style == "attention":
            for attr in ("num_heads", "num_kv_heads"):
                if getattr(m, attr, None):
                    sizes[f"{name} {attr}"] = int(getattr(m, attr))
        elif style in ("colwise_conv", "rowwise_conv") and isinstance(m, nn.Conv2d):
            sizes[f"{name} channels"] = m.out_channels if style == "colwise_conv" else m.in_channels
    seen: set[tuple[str, int]] = set()
    unique = {}
    for key, value in sizes.items():
        kind = (key.split(" ", 1)[1], value)
        if kind not in seen:
            seen.add(kind)
            unique[key] = value
    return unique


def profile_model(
    model: nn.Module,
    sample_batch: torch.Tensor,
    *,
    plan: Mapping[str, Any] | None = None,
    dtype: str = "bf16",
    tokens_per_sample: int | None = None,
    time_layers: bool = False,
    repeats: int = 3,
    loss: tuple[Callable, torch.Tensor] | None = None,
    model_flops_per_sample: float | None = None,
) -> ModelProfile:
    """Profile ``model.pipeline_layers()`` on one microbatch.

    Args:
        model: a single-device model with ``pipeline_layers()`` (its layers, in order, compose
            the forward). On ``meta`` it is profiled without memory or compute.
        sample_batch: the first layer's input for one microbatch (token ids ``(b, S)`` or images
            ``(b, C, H, W)``); moved to the model's device.
        plan: the model's tensor-parallel plan (``GPT_TP_PLAN``): which activations cross TP
            collectives, which saved tensors and parameters are sharded, what tp must divide.
        dtype: the compute dtype the bytes are counted in (``bf16``, ``fp16``, ``fp32``).
        tokens_per_sample: tokens per sample for throughput; default the sequence length of 2-D
            integer input (``(b, S)`` ids), else 1.
        time_layers: also measure each layer's forward and forward+backward time (real
            tensors only; the medians of ``repeats`` runs each, one layer at a time, on its input
            from the layers before), as the cost model's compute times; and, from a second
            timing at half the rows (twice the rows for a one-row sample), the fixed part of each
            (``fixed_forward_seconds``, ``fixed_seconds``). Layers must take batch-first input.
        loss: ``(loss_fn, target)``: the loss the last layer's output feeds (``loss_fn(output,
            target)``, e.g. ``(model.loss, targets)``); what it saves for backward counts as
            the last layer's, and its time with the last layer's.
        model_flops_per_sample: the model's FLOPs per sample (forward+backward) if it has its
            own count (for MFU); default 3 x the matmul FLOPs of the forward.

    Raises:
        TypeError: the model has no ``pipeline_layers()``.
        ValueError: ``dtype`` is not one of ``bf16``, ``fp16``, ``fp32``.
    """
    if not callable(getattr(model, "pipeline_layers", None)):
        raise TypeError(
            f"profile_model: {type(model).__name__} has no pipeline_layers(): the planner splits a "
            "model into pipeline stages by layer; give the model a pipeline_layers() method "
            "returning its layers in order (see GPT.pipeline_layers)"
        )
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"profile_model: dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    itemsize = DTYPE_BYTES[dtype]
    layers: Sequence[nn.Module] = model.pipeline_layers()
    styles = _plan_styles(model, plan)
    modules = dict(model.named_modules())
    names_of = {id(m): n for n, m in modules.items()}
    param_ids = {id(p) for p in model.parameters()}
    sharded_param_ids = {
        id(p)
        for name, style in styles.items()
        if style != "sequence_parallel"
        for pname, p in modules[name].named_parameters()
        if not (style in ("rowwise", "rowwise_conv") and pname.endswith("bias"))
        and not (style == "attention" and pname.endswith("proj.bias"))
    }
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = sample_batch.to(device)
    batch = int(sample_batch.shape[0])
    if tokens_per_sample is None:
        is_ids = sample_batch.dim() == 2 and not sample_batch.is_floating_point()
        tokens_per_sample = int(sample_batch.shape[1]) if is_ids else 1

    # Track whether the current op works on sharded data (for the saved- and moved-bytes splits):
    # inside a module the plan shards, or between a column-parallel module's output and the next
    # row-parallel module's input (the GELU of an MLP). And record the activations crossing TP
    # collectives.
    inside: list[int] = [0, 0]  # [sharded modules running, in a column -> row region]
    tp_bytes = {"in": 0.0, "out": 0.0, "count": 0}

    def size(t: Any) -> float:
        if not isinstance(t, torch.Tensor):
            return 0.0
        return float(t.numel() * (itemsize if t.is_floating_point() else t.element_size()))

    def pre_hook(module, args):
        inside[0] += 1
        if styles[names_of[id(module)]] in ("rowwise", "rowwise_conv"):
            inside[1] = 0
        if styles[names_of[id(module)]] in _INPUT_COLLECTIVE:
            tp_bytes["in"] += size(args[0]) if args else 0.0
            tp_bytes["count"] += 1

    def post_hook(module, args, out):
        inside[0] -= 1
        if styles[names_of[id(module)]] in ("colwise", "colwise_conv"):
            inside[1] = 1
        if styles[names_of[id(module)]] in _OUTPUT_COLLECTIVE:
            first = out[0] if isinstance(out, tuple) else out
            tp_bytes["out"] += size(first)
            tp_bytes["count"] += 1

    handles = []
    for name in (n for n, style in styles.items() if style != "sequence_parallel"):
        handles.append(modules[name].register_forward_pre_hook(pre_hook))
        handles.append(modules[name].register_forward_hook(post_hook))

    profiles: list[LayerProfile] = []
    try:
        for index, layer in enumerate(layers):
            saved: dict[tuple, tuple[float, bool]] = {}

            def pack(t: torch.Tensor, saved: dict = saved) -> torch.Tensor:
                base = t._base if t._base is not None else t
                if id(t) in param_ids or id(base) in param_ids:
                    return t
                saved.setdefault(_elements(t), (size(t), any(inside)))
                return t

            tp_bytes.update({"in": 0.0, "out": 0.0, "count": 0})
            inside[:] = [0, 0]
            moved = _BytesMoved(itemsize, inside)
            flops = FlopCounterMode(display=False)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flops, moved:
                y = layer(x)
                out = y[0] if isinstance(y, tuple) else y
                if loss is not None and index == len(layers) - 1:
                    loss[0](out, loss[1].to(device))  # what the loss saves is the last layer's
            params = list({id(p): p for p in layer.parameters()}.values())
            own = {k: v for k, v in saved.items() if k != _elements(x)}
            profiles.append(
                LayerProfile(
                    name=f"{type(layer).__name__}[{index}]",
                    matmul_flops=float(flops.get_total_flops()),
                    other_bytes=moved.bytes,
                    sharded_other_bytes=moved.sharded_bytes,
                    params=sum(p.numel() for p in params),
                    sharded_params=sum(p.numel() for p in params if id(p) in sharded_param_ids),
                    saved_bytes=sum(b for b, _ in own.values()),
                    sharded_saved_bytes=sum(b for b, sh in own.values() if sh),
                    out_bytes=size(out),
                    in_bytes=size(x),
                    input_saved_bytes=size(x) if _elements(x) in saved else 0.0,
                    saves_output=_elements(out) in own,
                    tp_in_bytes=tp_bytes["in"],
                    tp_out_bytes=tp_bytes["out"],
                    tp_collectives=int(tp_bytes["count"]),
                )
            )
            x = out.detach()
    finally:
        for h in handles:
            h.remove()

    if time_layers:
        if device.type == "meta":
            raise ValueError("profile_model: time_layers=True needs a model on a real device")
        # the sample's rows and a second count: half of them, or two for one
        rows = (batch, batch // 2 if batch > 1 else 2)
        xs = [_rows(sample_batch.to(device), n) for n in rows]
        for index, (lp, layer) in enumerate(zip(profiles, layers)):
            last = index == len(layers) - 1 and loss is not None
            inputs = [(x, (loss[0], _rows(loss[1].to(device), n)) if last else None)
                      for x, n in zip(xs, rows)]  # fmt: skip
            (f1, t1, y1), (f2, t2, y2) = _time_layer(layer, inputs, repeats)
            lp.forward_seconds, lp.seconds = f1, t1
            lp.fixed_forward_seconds = _fixed_part(rows, (f1, f2))
            lp.fixed_seconds = _fixed_part(rows, (t1, t2))
            xs = [y1, y2]

    return ModelProfile(
        name=type(model).__name__,
        layers=profiles,
        batch=batch,
        tokens_per_sample=tokens_per_sample,
        dtype=dtype,
        tp_divides=_tp_divides(model, styles),
        shared_params=_shared(layers, sharded_param_ids),
        model_flops_per_sample=model_flops_per_sample,
    )
