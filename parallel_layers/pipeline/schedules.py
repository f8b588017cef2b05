"""Pipeline schedules over :class:`~.stage.PipelineStage` s: GPipe, 1F1B, interleaved 1F1B, ZB-H1.

Each schedule is a class whose only difference is the per-rank action list it builds
(:mod:`.actions`); one executor, :meth:`PipelineSchedule.step`, runs any list::

    stages = build_stages(model.pipeline_layers(), partition, dims.pp_group, dp_group=dims.dp_group)
    schedule = Schedule1F1B(stages, n_microbatches=8, loss_fn=model.loss)
    loss = schedule.step(x, target)     # every rank: the mean loss over the batch
    optimizer.step(); optimizer.zero_grad()

One step, on each rank:

1. Checks that every rank computes alike (the batch divides into ``n_microbatches``; the schedule
   fits ``pp``, the chunks and ``n_microbatches``), raising ``ValueError`` before any message.
2. The batch is cut into ``m`` microbatches along dim 0 (the first stage uses the inputs, the
   last the targets; every rank passes what it has, or ``batch_size=``, so the check in 1 runs on
   every rank).
3. The rank's actions run in order. ``F(i, c)``: receive the input (or take microbatch ``i``),
   run chunk ``c``, send the output (or, on the last stage, compute ``loss_fn(output, target_i)``).
   ``B(i, c)``: receive the output gradient (or start from ``loss_i / m``), backpropagate, send
   the input gradient. ``W(i, c)``: the deferred weight gradients (zero-bubble only). Before each
   action the rank posts one group of sends and receives (one ``batch_isend_irecv``), the one
   :func:`~.actions.p2p_plan` assigns to it: the output of the action before, with the receives
   whose turn has come in one global order of all messages, each posted (at least) one action
   ahead of the action needing it, so it arrives while the action before computes. That order
   cannot deadlock under NCCL's rule and is the same on every backend (checked on CPU by
   :mod:`.p2p_check`). A group's
   sends are waited for one action later, before the next group is posted (as
   ``torch.distributed.pipelining`` waits for its sends one step late): the compute of that action
   overlaps them, the wait cannot deadlock (it waits only for messages ahead of every one this
   rank has not posted yet in the plan's global order), and then each send buffer, and with
   ``free_outputs`` the output it carried, is freed, so no rank holds more than a group's sends.
4. Outstanding sends are waited for; parameters shared by stages on several ranks (tied
   embeddings) get their gradients summed over the pipeline; data-parallel stages synchronize
   their gradients once (:meth:`~.stage.PipelineStage.sync_gradients`); the loss is broadcast
   from the last stage.

Loss and gradient scaling: ``loss_fn`` returns the mean loss of one microbatch; each microbatch's
backward starts from ``loss_i / m`` and the gradients accumulate over the microbatches, so they are
the gradients of the batch's mean loss (as one device on the whole batch, when ``loss_fn`` is a
mean over equally many items per microbatch). The returned loss is ``sum_i loss_i / m`` on every
rank of the pipeline; DDP averages gradients over ``dp`` (average the returned loss over ``dp`` for
the global batch's loss). Gradients accumulate into ``.grad`` (zero them between steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels.collectives import broadcast_, group_rank
from triton_parallel_layers.parallel_layers.pipeline.actions import (
    Action,
    Message,
    check_interleaved,
    forward_actions,
    gpipe_actions,
    interleaved_actions,
    one_f_one_b_actions,
    p2p_plan,
    simulate,
    zb_h1_actions,
)
from triton_parallel_layers.parallel_layers.pipeline.p2p import PendingRecv, StageTransport
from triton_parallel_layers.parallel_layers.pipeline.stage import PipelineStage
from triton_parallel_layers.parallel_layers.pipeline.timeline import (
    ActivationMemoryTracker,
    Timeline,
    render_ascii,
)
from triton_parallel_layers.parallel_layers.sequence_parallel import (
    allreduce_sequence_parallel_grads,
)
from triton_parallel_layers.parallel_layers.utils import check_positive_int
from triton_parallel_layers.parallel_layers.weight_grad import WeightGradStore, split_weight_grad

__all__ = [
    "SCHEDULES",
    "PipelineSchedule",
    "Schedule1F1B",
    "ScheduleGPipe",
    "ScheduleForwardOnly",
    "ScheduleInterleaved1F1B",
    "ScheduleZBH1",
    "get_schedule",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PipelineSchedule:
    """Runs this rank's action list over its stages; subclasses choose the list.

    Args:
        stages: this rank's stages (one per chunk; :func:`~.stage.build_stages`), or one stage.
        n_microbatches: ``m``; the batch must divide into ``m`` equal microbatches.
        loss_fn: ``loss_fn(logits, target) -> scalar`` mean loss of a microbatch (run on the last
            stage; e.g. ``functools.partial(model.loss, tp_group=dims.tp_group)``).
        record_timeline: time every action and wait (a pipeline barrier starts each step);
            the last step's events are in :attr:`timeline`.
        track_memory: measure the activation bytes held for backward (what autograd saved, the
            stage outputs kept as roots of their backward, send buffers in flight, the buffers
            of receives posted ahead of the action needing them; each storage once); the last
            step's peak is in :attr:`peak_activation_bytes` (and the most send buffers held at
            once in :attr:`peak_pending_sends`).
        free_outputs: once an output sent to the next stage has arrived, free its storage,
            keeping only what the backward needs (Megatron-LM's ``deallocate_pipeline_outputs``):
            the output tensor stays the root of the stage's backward, with a one-element
            placeholder for data, and the backward runs through autograd's engine directly
            (autograd's saved tensors keep whatever the graph needs).

    Raises:
        TypeError, ValueError: stages that do not form this rank's share of one pipeline, or a
            schedule that cannot run with these ``pp``, chunks and ``n_microbatches`` (on every
            rank alike, before any communication).
    """

    name: ClassVar[str] = "base"
    forward_only: ClassVar[bool] = False
    """Whether the schedule runs forwards only (:class:`ScheduleForwardOnly`)."""
    split_backward: ClassVar[bool] = False
    """Whether ``B`` computes only input gradients, leaving weight gradients to ``W``."""

    def __init__(
        self,
        stages: PipelineStage | Sequence[PipelineStage],
        n_microbatches: int,
        loss_fn: LossFn,
        *,
        record_timeline: bool = False,
        track_memory: bool = False,
        free_outputs: bool = True,
    ) -> None:
        stages = [stages] if isinstance(stages, PipelineStage) else list(stages)
        if not stages or not all(isinstance(s, PipelineStage) for s in stages):
            raise TypeError(f"stages={stages!r}: expected PipelineStage(s) (see build_stages)")
        check_positive_int("n_microbatches", n_microbatches)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r}: expected a callable (logits, target) -> loss")
        stages = sorted(stages, key=lambda s: s.stage_index)
        self.pp_group = stages[0].pp_group
        self.pp, self.pp_rank = stages[0].pp, group_rank(self.pp_group)
        self.num_chunks = len(stages)
        self.num_stages = stages[0].num_stages
        expected = [c * self.pp + self.pp_rank for c in range(self.num_chunks)]
        if [s.stage_index for s in stages] != expected or any(
            s.num_stages != self.pp * self.num_chunks or s.pp_group is not self.pp_group
            for s in stages
        ):
            raise ValueError(
                f"stages {[s.stage_index for s in stages]} of {self.num_stages}: expected this "
                f"rank's {self.num_chunks} chunk(s) {expected} of one pipeline of "
                f"pp={self.pp} x {self.num_chunks} stages over one pp group"
            )
        self.check(self.pp, n_microbatches, self.num_chunks)
        if self.split_backward and any(s.fsdp for s in stages):
            raise ValueError(
                f"the {self.name} schedule cannot run FSDP-sharded stages: its deferred "
                "weight-gradient passes (W) compute a layer's weight gradient after the layer's "
                "backward has returned, when FSDP2 has already freed the gathered parameters and "
                "reduce-scattered the gradients; shard the stages with DDP (build_stages' "
                "dp_group) or use gpipe, 1f1b or interleaved"
            )
        self.stages = stages
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.actions_by_rank = self.build_actions(self.pp, n_microbatches, self.num_chunks)
        self.actions: list[Action] = self.actions_by_rank[self.pp_rank]
        if len({s.device for s in stages}) > 1:
            raise ValueError(
                f"this rank's stages are on several devices: {[s.device for s in stages]}"
            )
        self.device = stages[0].device
        """Where every tensor of the step lives (the stages' device, from the mesh)."""
        self.transport = StageTransport(self.pp_group, self.num_chunks, self.device)
        self.plan = p2p_plan(self.actions_by_rank, self.num_chunks)[self.pp_rank]
        """``plan[k]``: the sends and receives posted as one group before action ``k``
        (``k = len(actions)``: after the last one)."""
        self.free_outputs = free_outputs
        self.timeline: Timeline | None = Timeline(self.pp_rank) if record_timeline else None
        self.memory: ActivationMemoryTracker | None = None
        self.set_track_memory(track_memory)
        self.peak_activation_bytes = 0
        self.peak_pending_sends = 0

    def set_track_memory(self, enabled: bool) -> None:
        """Measure activation memory from the next step on (or stop): the constructor's
        ``track_memory``, switchable (a trainer measures its first step only)."""
        params = [p for s in self.stages for p in s.parameters()]
        self.memory = ActivationMemoryTracker(params) if enabled else None

    # -- what subclasses define -----------------------------------------------------------------
    @classmethod
    def check(cls, pp: int, m: int, v: int) -> None:
        """Raise ``ValueError`` if the schedule cannot run with these sizes (default: one chunk)."""
        if v != 1:
            raise ValueError(
                f"{cls.__name__} runs one chunk per rank, got {v}: use ScheduleInterleaved1F1B "
                "for several chunks per rank"
            )

    @classmethod
    def build_actions(cls, pp: int, m: int, v: int) -> list[list[Action]]:
        """Every rank's action list for ``pp`` ranks, ``m`` microbatches, ``v`` chunks."""
        raise NotImplementedError

    @classmethod
    def render(cls, pp: int, m: int, v: int = 1, costs: dict | None = None) -> str:
        """The schedule as ASCII, simulated with unit costs (``F=1, B=2`` or ``F=B=W=1``)."""
        cls.check(pp, m, v)
        sim = simulate(cls.build_actions(pp, m, v), v=v, costs=costs)
        return render_ascii(sim, unit=1.0, title=f"{cls.__name__}: pp={pp}, m={m}, v={v}")

    # -- running ------------------------------------------------------------------------------
    def _batch_size(self, inputs, target, batch_size) -> int:
        sizes = {}
        for name, t in (("inputs", inputs), ("target", target)):
            if t is not None:
                if not isinstance(t, torch.Tensor) or t.dim() == 0:
                    raise TypeError(f"{name}: expected a tensor with a batch dim, got {t!r}")
                sizes[name] = t.shape[0]
        if batch_size is not None:
            sizes["batch_size"] = batch_size
        if not sizes:
            raise ValueError(
                "step() needs the batch size on every rank to check it before any send: pass "
                "inputs and/or target (or batch_size=) on every pipeline rank"
            )
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the batch sizes disagree: {sizes}")
        return next(iter(sizes.values()))

    def step(
        self,
        inputs: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """One training step's forwards and backwards over the batch (no optimizer step).

        Args:
            inputs: ``(B, ...)`` model input; needed where the first stage is.
            target: ``(B, ...)`` targets for ``loss_fn``; needed where the last stage is.
            batch_size: ``B``, for a rank that passes neither.

        Returns:
            The batch's mean loss, a 0-dim fp32 tensor, on every rank of the pipeline.
        """
        m = self.n_microbatches
        batch = self._batch_size(inputs, target, batch_size)
        if batch % m:
            raise ValueError(
                f"batch size {batch} is not divisible by n_microbatches={m}: every microbatch "
                "must have the same size (pick a batch size that is a multiple of it)"
            )
        first, last = self.stages[0].is_first, self.stages[-1].is_last
        if first and inputs is None:
            raise ValueError("this rank holds the first stage: step() needs inputs")
        if last and target is None:
            raise ValueError("this rank holds the last stage: step() needs target")
        device = self.device
        run = _StepState(
            inputs.to(device).tensor_split(m) if first else None,
            target.to(device).tensor_split(m) if last else None,
        )

        if self.timeline is not None:
            if self.pp > 1:
                dist.barrier(group=self.pp_group)
            self.timeline.begin()
        if self.memory is not None:
            self.memory.reset()
            self.peak_pending_sends = 0
        with contextlib.ExitStack() as no_sync:
            for stage in self.stages:
                no_sync.enter_context(stage.no_sync())
            for idx, action in enumerate(self.actions):
                self._post(idx, run)
                if action.kind == "F":
                    self._forward(action, run)
                elif action.kind == "B":
                    self._backward(action, run)
                else:
                    self._weight(action, run)
                if self.memory is not None:
                    self._sample_memory(run)
            self._post(len(self.actions), run)
            for msg in run.in_flight:
                self._release(msg, run)
        self.transport.finish()
        if self.memory is not None:
            self.peak_activation_bytes = self.memory.peak
        for stage in self.stages:
            stage.sync_gradients()
        # tied parameters held on several ranks: after the dp sync, when FSDP's gradients are
        # in their shards (a sum over pp commutes with the mean over dp)
        self.stages[0].shared.sync_grads()
        # the sequence-parallel norms' and biases' partial gradients: one all-reduce over tp
        allreduce_sequence_parallel_grads([stage.layers for stage in self.stages])
        return self._reduce_loss(run.losses)

    def _release(self, msg: Message, run: _StepState) -> None:
        """Wait for the send of ``msg`` and free its buffer and, for an activation (which its
        stage keeps only as the root of its backward), the output's storage."""
        sender = msg.stage - 1 if msg.stream == "act" else msg.stage + 1
        self.transport.release(msg.stream, sender, msg.microbatch)
        if msg.stream == "act" and self.free_outputs:
            held = run.held.get((msg.microbatch, sender // self.pp))
            if held is not None:
                _free_output(held[1])

    # -- communication ----------------------------------------------------------------------
    def _post(self, idx: int, run: _StepState) -> None:
        """Post the group the plan puts before action ``idx``. A gradient of an output that needs
        none is skipped on both sides (the receiver knows from its output; the sender from the
        activation's metadata: its input does not require grad, so it has no gradient to send)."""
        # the sends of the group before (posted one action ago) complete now: a wait that costs
        # little (the receiver posted its receive about when they were sent, in the plan's
        # order), and frees their buffers and the outputs they carried
        for msg in run.in_flight:
            self._release(msg, run)
        run.in_flight = []
        ops = []
        for kind, msg in self.plan[idx]:
            if kind == "send":
                tensor = run.outbox.pop(msg, None)
                if tensor is None:  # an input gradient nobody needs
                    continue
                ops.append((kind, msg, tensor))
                run.in_flight.append(msg)
            else:
                if msg.stream == "grad":
                    _, output = run.held[(msg.microbatch, msg.stage // self.pp)]
                    if not output.requires_grad:
                        continue
                ops.append((kind, msg, None))
        if not ops:
            return
        start = self._now()
        run.recvs.update(self.transport.post(ops))
        if self.memory is not None:
            pending = self.transport.pending_sends
            self.peak_pending_sends = max(self.peak_pending_sends, pending)
            self._sample_memory(run)
        chunk = ops[0][1].stage // self.pp
        self._event("send", ops[0][1].microbatch, chunk, start)

    def _sample_memory(self, run: _StepState) -> None:
        """Activation bytes now: autograd's saved tensors, the deferred weight-gradient passes',
        the inputs and outputs kept for their backward (freed outputs: a placeholder), the send
        buffers and the buffers of the receives posted ahead of the actions needing them."""
        held = [t for pair in run.held.values() for t in pair if t.dim() > 0]
        posted = [r.buffer for r in run.recvs.values() if r.buffer is not None]
        self.memory.sample(
            sum(s.held_bytes for s in run.stores.values()),
            [*held, *self.transport.send_buffers(), *posted],
        )

    def _wait(self, msg: Message, run: _StepState) -> torch.Tensor:
        pending = run.recvs.pop(msg, None)
        if pending is None:  # the plan posts every receive before the action needing it
            raise RuntimeError(f"rank {self.pp_rank}: {msg} was never posted")
        start = self._now()
        value = pending.wait()
        self._event("recv", msg.microbatch, msg.stage // self.pp, start)
        return value

    # -- the three kinds of action --------------------------------------------------------------
    def _forward(self, a: Action, run: _StepState) -> None:
        stage = self.stages[a.chunk]
        i = a.microbatch
        if stage.is_first:
            x = run.inputs[i]
        else:
            x = self._wait(Message("act", stage.stage_index, i), run)
        start = self._now()
        if self.forward_only:
            y = stage.inner(x)  # no DDP: nothing to synchronize without a backward
            self._event("F", i, a.chunk, start)
            if stage.is_last:
                run.outputs[i] = y
            else:
                run.outbox[Message("act", stage.stage_index + 1, i)] = y
            return
        with contextlib.ExitStack() as ctx:
            if self.split_backward:
                ctx.enter_context(split_weight_grad())
            if self.memory is not None:
                ctx.enter_context(self.memory.hooks())
            y = stage(x)
            if stage.is_last:
                loss = self.loss_fn(y, run.targets[i])
                if loss.dim() != 0:
                    raise ValueError(
                        f"loss_fn returned shape {tuple(loss.shape)}: expected a scalar"
                    )
                run.losses.append(loss.detach().float())
                root = loss / self.n_microbatches
        self._event("F", i, a.chunk, start)
        if stage.is_last:
            run.held[(i, a.chunk)] = (x, root)
        else:
            run.held[(i, a.chunk)] = (x, y)
            run.outbox[Message("act", stage.stage_index + 1, i)] = y

    def _backward(self, a: Action, run: _StepState) -> None:
        stage = self.stages[a.chunk]
        i = a.microbatch
        x, root = run.held.pop((i, a.chunk))
        grad = None
        if not stage.is_last and root.requires_grad:
            grad = self._wait(Message("grad", stage.stage_index, i), run)
        store = WeightGradStore() if self.split_backward else None
        start = self._now()
        with store.capture() if store is not None else contextlib.nullcontext():
            if root.requires_grad:
                _backward_from(root, grad)
        self._event("B", i, a.chunk, start)
        if store is not None:
            run.stores[(i, a.chunk)] = store
        del root, grad
        if not stage.is_first and x.requires_grad:
            dx = x.grad if x.grad is not None else torch.zeros_like(x)
            run.outbox[Message("grad", stage.stage_index - 1, i)] = dx

    def _weight(self, a: Action, run: _StepState) -> None:
        store = run.stores.pop((a.microbatch, a.chunk))
        start = self._now()
        store.flush()
        self._event("W", a.microbatch, a.chunk, start)

    def _reduce_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        device = self.device
        if self.stages[-1].is_last:
            total = torch.stack(losses).sum().to(device) / self.n_microbatches
        else:
            total = torch.zeros((), dtype=torch.float32, device=device)
        if self.pp > 1:
            src = dist.get_global_rank(self.pp_group, self.pp - 1)
            broadcast_(total, src, self.pp_group)
        return total

    # -- instrumentation ----------------------------------------------------------------------
    def _now(self) -> float:
        return self.timeline.now() if self.timeline is not None else 0.0

    def _event(self, kind: str, microbatch: int, chunk: int, start: float) -> None:
        if self.timeline is not None:
            self.timeline.add(kind, microbatch, chunk, start, self.timeline.now())

    def reset_shapes(self) -> None:
        """Re-exchange activation shapes at the next step (call on every rank after the
        microbatch shape changes)."""
        self.transport.reset_shapes()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pp={self.pp}, chunks={self.num_chunks}, "
            f"n_microbatches={self.n_microbatches}, rank {self.pp_rank}: "
            f"{' '.join(map(str, self.actions))})"
        )


def _free_output(y: torch.Tensor) -> None:
    """Replace ``y``'s data by a one-element placeholder (its storage is freed unless autograd
    saved it), keeping ``y`` as the root of its graph (Megatron-LM's ``deallocate_output_tensor``).
    A view is left alone (its storage is its base's)."""
    if y._base is None and y.numel() > 1:
        y.data = torch.empty((1,), dtype=y.dtype, device=y.device)


def _backward_from(root: torch.Tensor, grad: torch.Tensor | None) -> None:
    """``torch.autograd.backward(root, grad)`` without the check that ``grad`` has ``root``'s
    shape, which a freed output (:func:`_free_output`) no longer has."""
    if grad is None:
        torch.autograd.backward(root)
        return
    torch.autograd.Variable._execution_engine.run_backward(
        (root,), (grad,), False, False, (), True, True
    )


class _StepState:
    """What one step keeps between actions."""

    def __init__(self, inputs, targets) -> None:
        self.inputs, self.targets = inputs, targets
        self.held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.recvs: dict[Message, PendingRecv] = {}
        self.outbox: dict[Message, torch.Tensor] = {}  # produced, sent with the next group
        self.in_flight: list[Message] = []  # sent with the group posted last
        self.stores: dict[tuple[int, int], WeightGradStore] = {}
        self.losses: list[torch.Tensor] = []
        self.outputs: dict[int, torch.Tensor] = {}  # forward only: the last stage's outputs


class ScheduleGPipe(PipelineSchedule):
    """GPipe: all ``m`` forwards, then all ``m`` backwards. Activations of all ``m`` microbatches
    are alive at once; bubble ``(p - 1) / (m + p - 1)``.

    Example (``ScheduleGPipe.render(2, 4)``)::

        rank 0 | F0 F1 F2 F3 .  .  .  B0 -  B1 -  B2 -  B3 -
        rank 1 | .  F0 F1 F2 F3 B0 -  B1 -  B2 -  B3 -  .  .
    """

    name = "gpipe"

    @classmethod
    def build_actions(cls, pp: int, m: int, v: int) -> list[list[Action]]:
        return gpipe_actions(pp, m)


class Schedule1F1B(PipelineSchedule):
    """1F1B: ``p - r - 1`` warm-up forwards on rank ``r``, then one forward / one backward, then
    the cool-down backwards. At most ``p - r`` microbatches in flight; bubble as GPipe's.

    Example (``Schedule1F1B.render(2, 4)``)::

        rank 0 | F0 F1 .  .  B0 -  F2 B1 -  F3 B2 -  .  B3 -
        rank 1 | .  F0 B0 -  F1 B1 -  F2 B2 -  F3 B3 -  .  .
    """

    name = "1f1b"

    @classmethod
    def build_actions(cls, pp: int, m: int, v: int) -> list[list[Action]]:
        return one_f_one_b_actions(pp, m)


class ScheduleInterleaved1F1B(PipelineSchedule):
    """Interleaved 1F1B (Megatron's virtual pipeline): ``v`` chunks per rank, virtual stage
    ``c * p + r`` on rank ``r``. Bubble about ``1/v`` of 1F1B's, for ``v`` times the messages.
    Needs ``n_microbatches`` a multiple of ``pp``."""

    name = "interleaved"

    @classmethod
    def check(cls, pp: int, m: int, v: int) -> None:
        check_interleaved(pp, m, v)

    @classmethod
    def build_actions(cls, pp: int, m: int, v: int) -> list[list[Action]]:
        return interleaved_actions(pp, m, v)


class ScheduleZBH1(PipelineSchedule):
    """ZB-H1 zero-bubble schedule: 1F1B with each backward split into ``B`` (input gradient) and
    ``W`` (weight gradient, deferred to fill the bubble); peak memory as 1F1B. The weight
    gradients of the parallel linear layers (and anything using
    :func:`~.weight_grad.deferrable_linear`) are deferred; other parameters' are computed in
    ``B``.

    Example (``ScheduleZBH1.render(2, 4)``, ``F = B = W``; 1F1B takes 15 units, ZB-H1 13)::

        rank 0 | F0 F1 .  B0 W0 F2 B1 W1 F3 B2 W2 B3 W3
        rank 1 | .  F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3
    """

    name = "zb-h1"
    split_backward = True

    @classmethod
    def build_actions(cls, pp: int, m: int, v: int) -> list[list[Action]]:
        return zb_h1_actions(pp, m)


class ScheduleForwardOnly(PipelineSchedule):
    """Forward only, for evaluation and sampling: each microbatch through every stage, no
    backward, no gradients, no loss; the last stage's outputs come back from :meth:`run`.

    The same executor, transport and posting order as the training schedules (the plan of
    :func:`~.actions.forward_actions`, so the traffic completes under NCCL's rule), with its own
    :class:`~.p2p.StageTransport` so that its shapes never disturb the training schedule's. With
    ``dynamic_shapes`` (the default) the shapes are exchanged at every call, so the batch or
    sequence length may change from call to call (sampling grows the sequence by one token per
    call); without it, call :meth:`reset_shapes` on every rank when they change.

    Example (every rank of the pipeline)::

        infer = ScheduleForwardOnly(stages, n_microbatches=2)
        logits = infer.run(tokens)          # the last stage's (B, ...) output, None elsewhere
    """

    name = "forward-only"
    forward_only = True

    def __init__(
        self,
        stages: PipelineStage | Sequence[PipelineStage],
        n_microbatches: int = 1,
        *,
        dynamic_shapes: bool = True,
        record_timeline: bool = False,
    ) -> None:
        super().__init__(stages, n_microbatches, _no_loss, record_timeline=record_timeline)
        self.dynamic_shapes = dynamic_shapes

    @classmethod
    def check(cls, pp: int, m: int, v: int) -> None:
        forward_actions(pp, m, v)  # any positive sizes

    @classmethod
    def build_actions(cls, pp: int, m: int, v: int) -> list[list[Action]]:
        return forward_actions(pp, m, v)

    def step(self, *args, **kwargs):
        raise TypeError("ScheduleForwardOnly runs no backward: call run(inputs) instead of step()")

    @torch.no_grad()
    def run(
        self, inputs: torch.Tensor | None = None, *, batch_size: int | None = None
    ) -> torch.Tensor | None:
        """The model's output for ``inputs`` ``(B, ...)``, in ``n_microbatches`` microbatches.

        Args:
            inputs: needed where the first stage is (other ranks may pass it too).
            batch_size: ``B``, for a rank that passes no inputs.

        Returns:
            On the rank holding the last stage, its outputs concatenated along dim 0; elsewhere
            ``None``.
        """
        m = self.n_microbatches
        batch = self._batch_size(inputs, None, batch_size)
        if batch % m:
            raise ValueError(
                f"batch size {batch} is not divisible by n_microbatches={m}: every microbatch "
                "must have the same size"
            )
        if self.stages[0].is_first and inputs is None:
            raise ValueError("this rank holds the first stage: run() needs inputs")
        if self.dynamic_shapes:
            self.transport.reset_shapes()
        first = self.stages[0].is_first
        run = _StepState(inputs.to(self.device).tensor_split(m) if first else None, None)
        if self.timeline is not None:
            if self.pp > 1:
                dist.barrier(group=self.pp_group)
            self.timeline.begin()
        for idx, action in enumerate(self.actions):
            self._post(idx, run)
            self._forward(action, run)
        self._post(len(self.actions), run)
        self.transport.finish()
        if not self.stages[-1].is_last:
            return None
        return torch.cat([run.outputs[i] for i in range(m)])


def _no_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    raise AssertionError("a forward-only schedule computes no loss")


SCHEDULES: dict[str, type[PipelineSchedule]] = {
    cls.name: cls for cls in (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBH1)
}


def get_schedule(name: str) -> type[PipelineSchedule]:
    """The schedule class called ``name``: ``"gpipe"``, ``"1f1b"``, ``"interleaved"``, ``"zb-h1"``."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"schedule {name!r}: expected one of {sorted(SCHEDULES)}") from None
