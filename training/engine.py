"""This rank's share of a model, and one training step on it, at any (dp, pp, tp).

:func:`build_engine` turns a single-device model (built on ``meta``) into what this rank runs:

1. :func:`triton_parallel_layers.parallel_layers.parallelize` by the model's TP plan (still on ``meta``);
2. the layer sequence (``model.pipeline_layers()``) cut into ``pp * chunks`` stages by parameter
   count (:func:`triton_parallel_layers.parallel_layers.pipeline.partition_layers`); this rank keeps its stages;
3. the model is materialized and initialized from ``(seed, parameter name)``
   (``model.init_weights()``), so every layout starts from the shards of the same single-device
   model; at ``pp > 1`` only this rank's layers are (the others stay on ``meta``, and
   ``init_weights(skip_meta=True)`` skips them), so a rank's parameter memory is its stages',
   about ``1/pp`` of the model, also while building;
4. the step: **pp = 1** a plain step (DDP over ``dp`` when ``dp > 1``; ``microbatches`` is gradient
   accumulation under ``no_sync``); **pp > 1** the pipeline schedule
   (:mod:`triton_parallel_layers.parallel_layers.pipeline`) over :func:`~triton_parallel_layers.parallel_layers.pipeline.build_stages`' stages,
   which wrap each stage in DDP over ``dp``. With ``parallel.dp_shard == "fsdp"`` FSDP2 shards
   over ``dp`` instead (:mod:`triton_parallel_layers.parallel_layers.data_parallel`): at pp = 1 each
   pipeline layer is a unit and the model the root; at pp > 1 each stage is one unit. The
   parameters in :attr:`Engine.params` are then ``DTensor`` shards (1/dp of each TP shard), and
   so are their gradients and optimizer state.

Both steps are behind one seam, :meth:`Engine.train_step` (forward + backward of the global
batch's share of this dp replica; the optimizer is the trainer's), and :meth:`Engine.forward`
(inference: logits on the last stage; at pp > 1 the pipeline package's forward-only schedule,
:class:`~triton_parallel_layers.parallel_layers.pipeline.ScheduleForwardOnly`, with the same
transport and NCCL-safe posting order as training, in the training microbatch count when it
divides the batch and one microbatch otherwise, e.g. for sampling).

**Tied embeddings across stages.** A GPT with ``tie_embeddings`` uses ``embed.tok.weight`` in the
first stage and as ``head.proj.weight`` in the last one. With ``pp > 1`` each rank keeps its own
copy (same values), and the pipeline schedule sums the copies' gradients over the ``pp`` group
after each backward (:class:`triton_parallel_layers.parallel_layers.pipeline.stage.SharedParameters`), so both take the
same optimizer step and stay equal. Checkpoints save (and load) every copy under the first name,
``embed.tok.weight``; the gradient norm counts it once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from triton_parallel_layers.kernels.collectives import all_gather, all_reduce_, broadcast_
from triton_parallel_layers.parallel_layers import (
    ParallelDims,
    allreduce_sequence_parallel_grads,
    parallelize,
)
from triton_parallel_layers.parallel_layers.checkpoint import ShardedParam, sharded_params
from triton_parallel_layers.parallel_layers.data_parallel import (
    gradient_sync,
    local_tensor,
    shard_data_parallel,
)
from triton_parallel_layers.parallel_layers.grad_reduce import register_grad_reduce_hook
from triton_parallel_layers.parallel_layers.pipeline import (
    ActivationMemoryTracker,
    ScheduleForwardOnly,
    build_stages,
    get_schedule,
    partition_layers,
)
from triton_parallel_layers.training.config import ParallelConfig

__all__ = ["Engine", "build_engine", "canonical_names"]


def canonical_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """``{(module name, param name): name to save under}``: a parameter owned by several modules
    (tied) gets its first qualified name everywhere."""
    first: dict[int, str] = {}
    out = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            qualified = f"{mname}.{pname}" if mname else pname
            out[(mname, pname)] = first.setdefault(id(p), qualified)
    return out


def _materialize_(model: nn.Module, modules: list[nn.Module], device: torch.device) -> None:
    """``to_empty`` for the parameters and buffers of ``modules`` (sub-modules of ``model``) only:
    each ``meta`` parameter they use gets one uninitialized tensor on ``device``, put in place of
    the ``meta`` one in every module of ``model`` that owns it (so ties survive); everything else
    stays on ``meta``."""
    new: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.is_meta and id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
        for sub in module.modules():
            for bname, b in list(sub.named_buffers(recurse=False)):
                if b.is_meta:
                    setattr(sub, bname, torch.empty_like(b, device=device))
    for sub in model.modules():
        for pname, p in list(sub.named_parameters(recurse=False)):
            if id(p) in new:
                setattr(sub, pname, new[id(p)])


@dataclass
class Engine:
    """What this rank runs. Build it with :func:`build_engine`."""

    model: nn.Module
    """The (parallelized) single-device model; on ``pp > 1`` other stages' layers are ``meta``."""
    dims: ParallelDims
    parallel: ParallelConfig
    params: list[ShardedParam]
    """This rank's parameters, by their single-device names (for the optimizer and checkpoints)."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast_dtype: torch.dtype | None = None
    ddp: DistributedDataParallel | None = None
    fsdp: bool = False
    """Data parallelism by FSDP2: parameters, gradients and optimizer state are dp shards."""
    stages: list | None = None
    schedule: object | None = None
    tied_copies: frozenset[str] = frozenset()
    """Parameters this rank shares with an earlier pipeline rank (tied embeddings): counted there,
    not here, in the gradient norm and the parameter count."""
    peak_saved_bytes: int | None = None
    """Peak bytes held for backward in the last ``train_step(..., track_memory=True)``."""
    _infer: dict[int, ScheduleForwardOnly] = field(default_factory=dict, repr=False)
    """Forward-only schedules (evaluation, sampling) by microbatch count."""

    # -- small helpers ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.dims.device

    @property
    def is_last_stage(self) -> bool:
        return self.dims.is_last_stage

    @property
    def is_first_stage(self) -> bool:
        return self.dims.is_first_stage

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when asked (fp32 master weights and optimizer), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device_type, dtype=self.autocast_dtype)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(p.name, p.param) for p in self.params]

    def num_parameters(self) -> int:
        """Parameters of the whole single-device model (summed over the layout, tied once)."""
        local = sum(
            p.param.numel()
            for p in self.params
            if (p.dim is not None or self.dims.tp_rank == 0) and p.name not in self.tied_copies
        )
        total = torch.tensor(float(local), dtype=torch.float64)
        if self.dims.world_size > 1:
            total = total.to(self.device)
            dist.all_reduce(total)
        return int(round(total.item() / self.dims.dp))

    # -- training -----------------------------------------------------------------------------
    def train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, track_memory: bool = False
    ) -> torch.Tensor:
        """Forward and backward of this dp replica's share of the batch; the gradients are the
        mean loss's, averaged over ``dp`` and complete on every rank (tied copies summed).

        Args:
            inputs: ``(b, ...)``, this replica's rows of the global batch (every rank passes them;
                only the first stage reads them).
            targets: ``(b, ...)``; only the last stage reads them.
            track_memory: measure the peak bytes held for backward into
                :attr:`peak_saved_bytes`: what autograd saves (saved-tensor hooks, each storage
                once, parameters excluded), and at ``pp > 1`` also the stage inputs and outputs
                the pipeline keeps, its send buffers and the buffers of receives posted ahead
                (:class:`~triton_parallel_layers.parallel_layers.pipeline.ActivationMemoryTracker`).
                Python hooks on every saved tensor: for a step that is measured, not for every
                step.

        Returns:
            This replica's mean loss (a 0-dim fp32 tensor), on every rank of its pipeline.
        """
        m = self.parallel.microbatches
        if self.schedule is not None:
            self.schedule.set_track_memory(track_memory)
            try:
                with self.autocast():
                    loss = self.schedule.step(
                        inputs if self.is_first_stage else None,
                        targets if self.is_last_stage else None,
                        batch_size=inputs.shape[0],
                    )
            finally:
                self.schedule.set_track_memory(False)
            if track_memory:
                self.peak_saved_bytes = self.schedule.peak_activation_bytes
            # the schedule summed shared parameters' gradients over pp, the sequence-parallel
            # ones over tp, then DDP over dp
            return loss
        module = self.ddp if self.ddp is not None else self.model
        memory = ActivationMemoryTracker(self.model.parameters()) if track_memory else None
        losses = []
        pairs = list(zip(inputs.tensor_split(m), targets.tensor_split(m)))
        for i, (x, y) in enumerate(pairs):
            sync = i == m - 1
            if self.ddp is not None and not sync:
                no_sync = self.ddp.no_sync()
            else:
                no_sync = gradient_sync(self.model, sync)  # FSDP; nothing otherwise
            with no_sync:
                with self.autocast(), memory.hooks() if memory else contextlib.nullcontext():
                    loss = self.loss_fn(module(x), y)
                if memory is not None:
                    memory.sample()  # a microbatch's saved tensors all live until its backward
                (loss / m).backward()
            losses.append(loss.detach().float())
        if memory is not None:
            self.peak_saved_bytes = memory.peak
        allreduce_sequence_parallel_grads(self.model)  # once per step, not per microbatch
        return torch.stack(losses).mean()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        """The global gradient norm (each parameter counted once over tp, pp and dp) as a 0-dim
        fp32 tensor, and the gradients scaled down to ``max_norm`` when it is exceeded
        (``max_norm = 0``: no clipping). No host-device sync: the scale stays on the device.

        ``loss`` (this rank's loss, 0-dim) rides along in the same all-reduce: the norm is NaN on
        every rank when any rank's loss or gradient is not finite (``0 * loss`` adds exactly 0
        to the sum of squares otherwise), so one look at the norm decides a step alike on every
        rank, with no collective of its own.
        """
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self.params:
            g = p.param.grad
            counted = (
                p.dim is not None or self.dims.tp_rank == 0
            ) and p.name not in self.tied_copies
            if g is not None and counted:
                sq += local_tensor(g).float().pow(2).sum()  # FSDP: this rank's dp shard
        if loss is not None:
            sq += 0.0 * loss.detach().float()  # 0 * (inf or nan) = nan
        if self.dims.world_size > 1:
            all_reduce_(sq, dist.group.WORLD)
        # DDP replicas hold the same gradients: divide them out; FSDP's shards add up
        norm = (sq / (1 if self.fsdp else self.dims.dp)).sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [local_tensor(p.param.grad) for p in self.params if p.param.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef)
        return norm

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The model's output for ``inputs`` ``(b, ...)`` (eval mode, no gradients): on the last
        pipeline stage the logits (GPT: vocabulary-sharded ``(b, S, V/tp)``), elsewhere ``None``.
        Every rank of the pipeline calls it."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.stages is None:
                with self.autocast():
                    return self.model(inputs)
            schedule = self._forward_schedule(inputs.shape[0])
            with self.autocast():
                return schedule.run(
                    inputs if self.is_first_stage else None, batch_size=inputs.shape[0]
                )
        finally:
            self.model.train(was_training)

    def _forward_schedule(self, batch: int) -> ScheduleForwardOnly:
        """The forward-only pipeline schedule for a batch of ``batch`` rows: in the training
        microbatch count when it divides the batch, else one microbatch (sampling). Made on first
        use, by every rank of the pipeline at the same call."""
        m = self.parallel.microbatches
        m = m if batch % m == 0 else 1
        if m not in self._infer:
            self._infer[m] = ScheduleForwardOnly(self.stages, m)
        return self._infer[m]

    def broadcast_from_last(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the last pipeline stage holds it, on every rank of the pipeline (same shape
        and dtype on every rank; the other ranks' values are ignored)."""
        return broadcast_(t, self.dims.pp_peer(self.dims.pp - 1), self.dims.pp_group)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (no gradients), on every rank of the pipeline (0-dim fp32)."""
        logits = self.forward(inputs)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if logits is not None:
            loss = self.loss_fn(logits, targets).float().reshape(())
        return self.broadcast_from_last(loss)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocabulary-sharded logits ``(..., V/tp)`` -> whole ``(..., V)`` on every TP rank."""
        return all_gather(logits.contiguous(), self.dims.tp_group, dim=-1)


def build_engine(
    model_fn: Callable[[], nn.Module],
    plan: dict,
    dims: ParallelDims,
    parallel: ParallelConfig,
    *,
    autocast_dtype: torch.dtype | None = None,
    tp_plan_kwargs: dict | None = None,
) -> Engine:
    """Build this rank's part of ``model_fn()`` at ``dims``' layout (see the module docstring).

    Args:
        model_fn: builds the single-device model; called under ``torch.device("meta")``. It must
            fix the model's seed (``GPT(config, seed=...)``) and provide ``pipeline_layers()``,
            ``init_weights(skip_meta=False)`` and ``loss(logits, target)``.
        plan: the model's tensor-parallel plan.
        dims: the layout.
        parallel: schedule, microbatches, chunks, sequence parallel, overlap.
        autocast_dtype: ``torch.bfloat16`` to run forwards under autocast, or ``None``.
    """
    fsdp = parallel.dp_shard == "fsdp"
    with torch.device("meta"):
        model = model_fn()
    kwargs = dict(sequence_parallel=parallel.sequence_parallel, overlap_comm=parallel.overlap)
    kwargs.update(tp_plan_kwargs or {})
    model = parallelize(model, plan, dims, **kwargs)
    canonical = canonical_names(model)
    names_of = {id(m): n for n, m in model.named_modules()}
    if dims.pp == 1:
        model.to_empty(device=dims.device)
        model.init_weights()  # re-ties tied parameters, then fills every shard from (seed, name)
        if fsdp:  # before listing the parameters: FSDP2 replaces them with DTensor shards
            shard_data_parallel(model, dims.dp_mesh, units=model.pipeline_layers())
        params = sharded_params(model.named_modules(), canonical)
        engine = Engine(model, dims, parallel, params, model.loss, autocast_dtype, fsdp=fsdp)
        if dims.dp > 1 and not fsdp:
            kw = {"device_ids": [dims.device.index]} if dims.device.type == "cuda" else {}
            engine.ddp = DistributedDataParallel(model, process_group=dims.dp_group, **kw)
            register_grad_reduce_hook(engine.ddp, parallel.grad_reduce_dtype)
        return engine

    # pp > 1: cut the layer sequence while still on meta, then materialize and initialize only
    # this rank's layers, so a rank's parameter memory is its stages', never the whole model's
    layers = model.pipeline_layers()
    num_stages = dims.pp * parallel.chunks
    partition = partition_layers(layers, num_stages, "params")
    mine = [s for s in range(num_stages) if s % dims.pp == dims.pp_rank]
    local = {j for s in mine for j in range(*partition.bounds[s])}

    # parameters used by layers on several ranks (tied embeddings): each rank that holds one of
    # those layers materializes its own copy (tied between its owners, so it is one object
    # there); the pipeline sums the copies' gradients after each backward (SharedParameters)
    in_layers = {id(q) for layer in layers for q in layer.parameters()}
    keep = [layers[j] for j in sorted(local)]
    keep += [m for m in model.modules() if any(id(q) not in in_layers for q in m.parameters(False))]
    _materialize_(model, keep, dims.device)
    model.init_weights(skip_meta=True)  # this rank's parameters only, each from (seed, name)
    used_on: dict[int, set[int]] = {}
    for j, layer in enumerate(layers):
        for q in layer.parameters():
            used_on.setdefault(id(q), set()).add(partition.stage_of(j) % dims.pp)

    modules = [
        (f"{names_of[id(layers[j])]}.{n}" if n else names_of[id(layers[j])], m)
        for j in sorted(local)
        for n, m in layers[j].named_modules()
    ]
    # a shared parameter counts (in the gradient norm, the parameter count) on its first rank;
    # found by identity before FSDP2 replaces the parameters
    first_rank = {pid: min(ranks) for pid, ranks in used_on.items()}
    copies = frozenset(
        p.name
        for p in sharded_params(modules, canonical)
        if first_rank.get(id(p.param), dims.pp_rank) != dims.pp_rank
    )
    dp = {"dp_mesh": dims.dp_mesh} if fsdp else {"dp_group": dims.dp_group}
    stages = build_stages(layers, partition, dims.pp_group, device=dims.device, **dp)
    for stage in stages:
        if stage.ddp is not None:
            register_grad_reduce_hook(stage.ddp, parallel.grad_reduce_dtype)
    params = sharded_params(modules, canonical)  # after build_stages: FSDP2's shards
    schedule = get_schedule(parallel.schedule)(stages, parallel.microbatches, model.loss)
    return Engine(
        model,
        dims,
        parallel,
        params,
        model.loss,
        autocast_dtype,
        stages=stages,
        schedule=schedule,
        tied_copies=copies,
        fsdp=fsdp,
    )
