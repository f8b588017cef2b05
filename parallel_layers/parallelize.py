"""``parallelize(model, plan, tp)``: make a single-device model tensor-parallel by a plan.

The model is written for one device with plain ``nn`` modules; a *plan* keyed by module name
says which of them become which parallel layer, and :func:`parallelize` swaps them in place
through the layers' ``from_*`` classmethods (torchtitan's ``parallelize_module`` does the same
with DTensor; here the result is plain modules holding plain tensors)::

    plan = {
        "embed.tok":        "vocab",              # nn.Embedding -> VocabParallelEmbedding
        "blocks.*.norm1":   "sequence_parallel",  # replicated, sees only local tokens under SP
        "blocks.*.attn":    "attention",          # ParallelSelfAttention (tp=1) -> head-sharded
        "blocks.*.mlp.fc1": "colwise",            # nn.Linear -> ColumnParallelLinear
        "blocks.*.mlp.fc2": "rowwise",            # nn.Linear -> RowParallelLinear
        "head.proj": {"style": "colwise", "gather_output": False},   # style + options
    }
    model = parallelize(model, plan, dims, sequence_parallel=True, overlap_comm=True)

**Keys** are qualified module names (``model.named_modules()``); ``*`` matches one name component
(no dots), ``?`` one character. Every key must match at least one module, no module may match
two keys, and a matched module may not contain another matched module. The root (``""``) cannot
be named.

**Values** are a style name, or a dict ``{"style": name, **options}``:

=====================  ==============================================  ===========================
style                  replaces                                        options
=====================  ==============================================  ===========================
``colwise``            ``nn.Linear`` -> :class:`ColumnParallelLinear`  ``gather_output``,
                                                                       ``sequence_parallel``,
                                                                       ``overlap_comm``
``rowwise``            ``nn.Linear`` -> :class:`RowParallelLinear`     ``input_is_parallel``,
                                                                       ``sequence_parallel``,
                                                                       ``overlap_comm``
``vocab``              ``nn.Embedding`` -> VocabParallelEmbedding      ``sequence_parallel``
``attention``          ``ParallelSelfAttention`` (tp=1) -> head-       ``sequence_parallel``,
                       sharded; ``nn.MultiheadAttention`` (batch-      ``overlap_comm``,
                       first self-attention) -> MHASelfAttention       ``causal`` (MHA only)
``colwise_conv``       ``nn.Conv2d`` -> :class:`ColumnParallelConv2d`  ``relu``, ``gather_output``
``rowwise_conv``       ``nn.Conv2d`` -> :class:`RowParallelConv2d`     ``input_is_parallel``
``lstm``               ``nn.LSTM`` (unidirectional, no projection)     (none)
                       -> :class:`ParallelLSTM` (hidden units sharded)
``sequence_parallel``  a replicated module between the parallel        (none)
                       layers (``nn.LayerNorm``, ``nn.RMSNorm``,
                       ``nn.Dropout``, or one without parameters)
=====================  ==============================================  ===========================

``sequence_parallel`` and ``overlap_comm`` given to :func:`parallelize` are the defaults of every
entry that takes them; an entry's own option overrides. With sequence parallelism the
activations between the parallel layers are ``(B, S/tp, E)``, so a module in that region sees only
this rank's tokens: the ``sequence_parallel`` style then replaces a norm by one whose weight and
bias pass through :func:`~triton_parallel_layers.parallel_layers.comm.copy_to_tp` (their gradients are summed over the
TP group in backward, as the row-parallel bias does), and a dropout by one that draws the mask of
the whole sequence and keeps its chunk (so it drops exactly what the single-device model drops).
Without sequence parallelism such entries change nothing: the activations are replicated and so
are the gradients.

An ``nn.Conv2d`` whose class sets ``activation = "relu"`` (``triton_parallel_layers.models.cnn.Conv2dReLU``) is a fused
conv + ReLU: ``colwise_conv`` keeps the ReLU fused (``relu=True``), ``rowwise_conv`` refuses it (the
ReLU must follow the sum over ranks).

**Errors.** Every problem with the plan (a key that matches nothing, a module of the wrong type, a
size the TP degree does not divide, an unknown style or option, tied parameters sharded two ways)
is collected first and raised as one ``ValueError`` listing every offending name. The checks read
only shapes and the group size, which every rank has alike, and nothing communicates: every rank
raises the same error and no rank is left waiting in a collective.

**Tied parameters.** A parameter shared by two matched modules (tied input and output
embeddings) is shared again after the swap, when both shard it the same way (a vocab-parallel
embedding's ``(V/p, E)`` weight is exactly a column-parallel head's weight shard).

**Meta device.** The ``from_*`` classmethods keep ``meta`` tensors ``meta``; so a model built under
``torch.device("meta")`` is parallelized without ever holding a full tensor, then
``model.to_empty(device=...)`` allocates only the local shards and :func:`init_by_name_` fills them
with exactly the values of the full build (see there). ``to_empty`` gives every module a tensor of
its own, which unties shared parameters: tie them again before initializing (``GPT.init_weights``
does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn

from triton_parallel_layers.kernels.collectives import group_size
from triton_parallel_layers.parallel_layers.attention import ParallelSelfAttention
from triton_parallel_layers.parallel_layers.conv import ColumnParallelConv2d, RowParallelConv2d
from triton_parallel_layers.parallel_layers.dims import ParallelDims
from triton_parallel_layers.parallel_layers.embedding import VocabParallelEmbedding
from triton_parallel_layers.parallel_layers.linear import ColumnParallelLinear, RowParallelLinear
from triton_parallel_layers.parallel_layers.lstm import ParallelLSTM
from triton_parallel_layers.parallel_layers.mha import MHASelfAttention
from triton_parallel_layers.parallel_layers.sequence_parallel import (
    SequenceParallelDropout,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
)

__all__ = ["STYLES", "match_plan", "parallelize"]

Group = dist.ProcessGroup | None
PlanValue = str | Mapping[str, Any]

# style -> (the option names it takes, with their defaults; None = parallelize()'s default)
STYLES: dict[str, dict[str, Any]] = {
    "colwise": {"gather_output": False, "sequence_parallel": None, "overlap_comm": None},
    "rowwise": {"input_is_parallel": True, "sequence_parallel": None, "overlap_comm": None},
    "vocab": {"sequence_parallel": None},
    "attention": {"sequence_parallel": None, "overlap_comm": None, "causal": True},
    "colwise_conv": {"relu": None, "gather_output": False},
    "rowwise_conv": {"input_is_parallel": True},
    "lstm": {},
    "sequence_parallel": {},
}


# ---------------------------------------------------------------------------------------------
# Plan matching and validation
# ---------------------------------------------------------------------------------------------
def _pattern(key: str) -> re.Pattern:
    """``*`` -> one dotted component, ``?`` -> one character; everything else literal."""
    parts = []
    for ch in key:
        parts.append({"*": r"[^.]*", "?": r"[^.]"}.get(ch, re.escape(ch)))
    return re.compile("".join(parts) + r"\Z")


def _match(model: nn.Module, plan: Mapping[str, PlanValue], problems: list[str]) -> dict[str, str]:
    names = [n for n, _ in model.named_modules() if n]
    matches: dict[str, str] = {}
    unmatched: list[str] = []
    for key in plan:
        if not isinstance(key, str) or not key:
            problems.append(
                f"plan key {key!r}: expected a non-empty module name (the root cannot be replaced)"
            )
            continue
        rx = _pattern(key)
        hits = [n for n in names if rx.match(n)]
        if not hits:
            unmatched.append(key)
        for n in hits:
            if n in matches:
                problems.append(f"{n}: matched by two plan keys, {matches[n]!r} and {key!r}")
            else:
                matches[n] = key
    if unmatched:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        problems.insert(
            0,
            f"plan keys that match no module of {type(model).__name__}: {unmatched} "
            f"(its module names: {shown})",
        )
    return matches


def match_plan(model: nn.Module, plan: Mapping[str, PlanValue]) -> dict[str, str]:
    """``{module name: plan key}`` for every module a key matches (styles are not checked).

    Raises a ``ValueError`` listing the keys that match no module and the modules matched by more
    than one key.
    """
    problems: list[str] = []
    matches = _match(model, plan, problems)
    if problems:
        raise ValueError("parallelize: bad plan:\n  " + "\n  ".join(problems))
    return matches


@dataclass
class _Entry:
    name: str
    key: str
    style: str
    options: dict = field(default_factory=dict)


def _parse_value(
    key: str, value: PlanValue, defaults: dict, problems: list[str]
) -> tuple[str, dict] | None:
    if isinstance(value, str):
        style, given = value, {}
    elif isinstance(value, Mapping) and isinstance(value.get("style"), str):
        given = dict(value)
        style = given.pop("style")
    else:
        problems.append(
            f"{key!r}: plan value {value!r} is neither a style name nor a dict with a 'style'"
        )
        return None
    if style not in STYLES:
        problems.append(f"{key!r}: unknown style {style!r}; expected one of {sorted(STYLES)}")
        return None
    unknown = sorted(set(given) - set(STYLES[style]))
    if unknown:
        problems.append(
            f"{key!r}: style {style!r} takes no option(s) {unknown}; it takes {sorted(STYLES[style])}"
        )
        return None
    options = dict(STYLES[style])
    options.update(given)
    for opt in ("sequence_parallel", "overlap_comm"):
        if opt in options and options[opt] is None:
            options[opt] = defaults[opt]
    if options.get("overlap_comm") and not options.get("sequence_parallel"):
        problems.append(f"{key!r}: overlap_comm=True needs sequence_parallel=True")
        return None
    return style, options


def _need_divisible(name: str, what: str, size: int, tp: int, problems: list[str]) -> None:
    if size % tp:
        problems.append(f"{name}: {what}={size} is not divisible by the tensor-parallel size {tp}")


def _check_module(entry: _Entry, module: nn.Module, tp: int, problems: list[str]) -> None:
    """Type and size checks of one matched module against its style (appends to ``problems``)."""
    name, style = entry.name, entry.style
    expect = {
        "colwise": nn.Linear,
        "rowwise": nn.Linear,
        "vocab": nn.Embedding,
        "attention": (ParallelSelfAttention, nn.MultiheadAttention),
        "colwise_conv": nn.Conv2d,
        "rowwise_conv": nn.Conv2d,
        "lstm": nn.LSTM,
    }.get(style)
    if expect is not None and not isinstance(module, expect):
        types = expect if isinstance(expect, tuple) else (expect,)
        want = " or ".join(
            f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__ for t in types
        )
        problems.append(f"{name}: style {style!r} needs {want}, found {type(module).__name__}")
        return
    if style == "colwise":
        _need_divisible(name, "out_features", module.out_features, tp, problems)
    elif style == "rowwise":
        _need_divisible(name, "in_features", module.in_features, tp, problems)
    elif style == "vocab":
        _need_divisible(name, "num_embeddings", module.num_embeddings, tp, problems)
    elif style == "attention":
        if isinstance(module, ParallelSelfAttention):
            if module.tp_size != 1:
                problems.append(f"{name}: already tensor-parallel (tp={module.tp_size})")
                return
            _need_divisible(name, "num_heads", module.num_heads, tp, problems)
            _need_divisible(name, "num_kv_heads", module.num_kv_heads, tp, problems)
        else:
            _need_divisible(name, "num_heads", module.num_heads, tp, problems)
    elif style == "colwise_conv":
        _need_divisible(name, "out_channels", module.out_channels, tp, problems)
    elif style == "rowwise_conv":
        if getattr(module, "activation", None) is not None:
            problems.append(
                f"{name}: a fused conv + {module.activation} cannot be row-parallel (the "
                "activation must follow the sum over ranks); make it colwise_conv"
            )
        _need_divisible(name, "in_channels", module.in_channels, tp, problems)
    elif style == "lstm":
        if module.bidirectional or module.proj_size:
            problems.append(
                f"{name}: style 'lstm' supports unidirectional nn.LSTMs without projection, found "
                f"bidirectional={module.bidirectional}, proj_size={module.proj_size}"
            )
        _need_divisible(name, "hidden_size", module.hidden_size, tp, problems)
    elif style == "sequence_parallel":
        supported = (nn.LayerNorm, nn.RMSNorm, nn.Dropout)
        if not isinstance(module, supported) and any(True for _ in module.parameters()):
            problems.append(
                f"{name}: style 'sequence_parallel' supports nn.LayerNorm, nn.RMSNorm, nn.Dropout "
                f"and modules without parameters, found {type(module).__name__} with parameters"
            )


# The same for the single-device module a style turns into that parallel module.
_STYLE_SHARD_DIMS: dict[str, dict[str, int | None]] = {
    "colwise": {"weight": 0, "bias": 0},
    "rowwise": {"weight": 1, "bias": None},
    "vocab": {"weight": 0},
    "colwise_conv": {"weight": 0, "bias": 0},
    "rowwise_conv": {"weight": 1, "bias": None},
}


# ---------------------------------------------------------------------------------------------
# parallelize
# ---------------------------------------------------------------------------------------------
def _tp_group(dims: ParallelDims | dist.ProcessGroup | None) -> Group:
    if dims is None or isinstance(dims, dist.ProcessGroup):
        return dims
    if isinstance(dims, ParallelDims):
        return dims.tp_group
    raise TypeError(
        f"parallelize: dims={dims!r}: expected a ParallelDims, a tensor-parallel ProcessGroup or None"
    )


def _build(entry: _Entry, module: nn.Module, group: Group) -> nn.Module:
    o, style = entry.options, entry.style
    if style == "colwise":
        return ColumnParallelLinear.from_linear(module, group, **o)
    if style == "rowwise":
        return RowParallelLinear.from_linear(module, group, **o)
    if style == "vocab":
        return VocabParallelEmbedding.from_embedding(module, group, **o)
    if style == "attention":
        sp, ov = o["sequence_parallel"], o["overlap_comm"]
        if isinstance(module, nn.MultiheadAttention):
            return MHASelfAttention.from_mha(
                module, group, causal=o["causal"], sequence_parallel=sp, overlap_comm=ov
            )
        return ParallelSelfAttention.from_attention(
            module, group, sequence_parallel=sp, overlap_comm=ov
        )
    if style == "colwise_conv":
        relu = o["relu"]
        if relu is None:
            relu = getattr(module, "activation", None) == "relu"
        return ColumnParallelConv2d.from_conv(
            module, group, relu=relu, gather_output=o["gather_output"]
        )
    if style == "rowwise_conv":
        return RowParallelConv2d.from_conv(module, group, **o)
    if style == "lstm":
        return ParallelLSTM.from_lstm(module, group)
    # sequence_parallel: only with sequence parallelism on, and only for what needs it
    if group_size(group) == 1 or not entry.options.get("_sp", False):
        return module
    if isinstance(module, nn.LayerNorm):
        return SequenceParallelLayerNorm.from_norm(module, group)
    if isinstance(module, nn.RMSNorm):
        return SequenceParallelRMSNorm.from_norm(module, group)
    if isinstance(module, nn.Dropout):
        return SequenceParallelDropout.from_dropout(module, group)
    return module  # no parameters, nothing random: runs on local tokens as is


def parallelize(
    model: nn.Module,
    plan: Mapping[str, PlanValue],
    dims: ParallelDims | dist.ProcessGroup | None,
    *,
    sequence_parallel: bool = False,
    overlap_comm: bool = False,
) -> nn.Module:
    """Swap ``model``'s modules named in ``plan`` for their tensor-parallel counterparts, in place.

    Args:
        model: a single-device model (any ``nn.Module``), on a real device or ``meta``.
        plan: ``{module name pattern: style or {"style": style, **options}}``; see the module
            docstring for the styles and options.
        dims: a :class:`ParallelDims` (its ``tp_group`` is used), the tensor-parallel
            ``ProcessGroup`` itself, or ``None`` (no parallelism: the model is returned as it is,
            after the plan has been checked against it).
        sequence_parallel: the default of every entry's ``sequence_parallel`` option: activations
            between the parallel layers are ``(B, S/tp, E)``.
        overlap_comm: the default of every entry's ``overlap_comm`` (needs sequence parallelism).

    Returns:
        ``model`` itself, with the matched submodules replaced (same names, so state-dict keys
        and :func:`init_by_name_` keep working).

    Raises:
        ValueError: the plan does not fit the model; the message lists every problem. Raised on
            every rank alike, before anything is changed or communicated.
        TypeError: ``dims`` is of the wrong type.
    """
    group = _tp_group(dims)
    tp = group_size(group)
    defaults = {"sequence_parallel": sequence_parallel, "overlap_comm": overlap_comm}
    problems: list[str] = []
    if overlap_comm and not sequence_parallel:
        problems.append("overlap_comm=True needs sequence_parallel=True")
    matches = _match(model, plan, problems)

    modules = dict(model.named_modules())
    entries: list[_Entry] = []
    for name, key in matches.items():
        parsed = _parse_value(key, plan[key], defaults, problems)
        if parsed is None:
            continue
        style, options = parsed
        entry = _Entry(name, key, style, options)
        if style == "sequence_parallel":
            entry.options = {"_sp": sequence_parallel}
        _check_module(entry, modules[name], tp, problems)
        entries.append(entry)
    matched = sorted(matches)
    for name in matched:
        inside = [m for m in matched if m != name and m.startswith(name + ".")]
        if inside:
            problems.append(f"{name}: contains other plan-matched module(s) {inside}")
    ties = _tied_groups(model, entries, problems)
    if problems:
        raise ValueError(
            f"parallelize: the plan does not fit {type(model).__name__} at tp={tp}:\n  "
            + "\n  ".join(dict.fromkeys(problems))  # each once, in order
        )
    if tp == 1:
        return model  # nothing to shard, nothing to communicate: the model as it is

    # Build every replacement before swapping any, so that an option only a builder rejects
    # (an MHA that is not batch-first, a grouped conv, ...) leaves the model untouched.
    built = {}
    for entry in entries:
        try:
            built[entry.name] = _build(entry, modules[entry.name], group)
        except (ValueError, TypeError) as e:
            problems.append(f"{entry.name}: {e}")
    if problems:
        raise ValueError(
            f"parallelize: the plan does not fit {type(model).__name__} at tp={tp}:\n  "
            + "\n  ".join(problems)
        )
    for name, replacement in built.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    for owners in ties:  # re-tie shared parameters to the first owner's new shard
        (m0, p0), *rest = owners
        shared = getattr(model.get_submodule(m0), p0)
        for m, p in rest:
            setattr(model.get_submodule(m), p, shared)
    return model


def _tied_groups(
    model: nn.Module, entries: list[_Entry], problems: list[str]
) -> list[list[tuple[str, str]]]:
    """Parameters shared between modules, as lists of ``(module name, param name)``; a problem is
    recorded when the owners would shard a shared parameter differently."""
    style_of = {e.name: e.style for e in entries}
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            pair = (mname, pname)
            if pair not in owners.setdefault(id(param), []):
                owners[id(param)].append(pair)
    groups = []
    for pairs in owners.values():
        if len(pairs) < 2:
            continue
        layouts = set()
        for m, p in pairs:
            style = style_of.get(m)
            layouts.add(_STYLE_SHARD_DIMS.get(style, {}).get(p) if style else None)
        if len(layouts) > 1:
            names = [f"{m}.{p}" for m, p in pairs]
            problems.append(
                f"tied parameter {names} would be sharded in different ways "
                f"(shard dims {sorted(layouts, key=str)}): give its owners styles that shard it alike"
            )
        groups.append(pairs)
    return groups
