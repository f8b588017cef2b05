"""A time-chunked ("wavefront") pipeline for stacked recurrent layers.

Microbatch pipelining fills a pipeline by splitting the *batch*; a recurrent stack can also be
pipelined along *time*, because layer ``l`` at chunk ``j`` needs only layer ``l-1``'s output of
chunk ``j`` and its own state after chunk ``j-1``. With the sequence ``x (B, T, E)`` cut into
``n`` time chunks and the layers into ``p`` stages (one per rank), stage ``k`` runs chunk ``j``
while stage ``k+1`` runs chunk ``j-1``::

    time ->      0     1     2     3     4
    stage 0    F0    F1    F2    F3                 (forwards; the backwards mirror them,
    stage 1          F0    F1    F2    F3            last chunk first)

so a single long sequence (``B = 1``, where microbatches cannot help) fills the pipeline too.

**Bubble.** With ``p`` stages and ``n`` equal chunks, each pass takes ``n + p - 1`` chunk slots of
which ``n`` are busy: bubble fraction ``(p - 1) / (n + p - 1)``, GPipe's with ``n`` microbatches.
At the same activation memory (a stage keeps every chunk's activations until its backward, i.e.
the whole ``(B, T)`` batch, as GPipe keeps all its microbatches) microbatch pipelining reaches
``(p - 1) / (m + p - 1)`` with ``m <= B`` microbatches, the wavefront with ``n <= T`` chunks; the
two compose (chunks of microbatches). For ``B = 1``: ``(p - 1) / p`` (no overlap at all) against
``(p - 1) / (n + p - 1)``.

**Exact gradients.** Between chunks a stage's recurrent state ``(h, c)`` is cut from the autograd
graph and re-entered as a leaf, so each chunk's backward is a separate call: chunk ``j``'s
backward takes the gradient of its output (from the next stage) and of its final state (from this
stage's backward of chunk ``j+1``), and yields the gradient of its input (sent to the previous
stage) and of its initial state (kept for chunk ``j``). The result is full backpropagation
through the whole sequence, the same gradients as one device (``tests/test_wavefront.py``).

The schedule is all forwards, then all backwards (GPipe's order), over blocking point-to-point
sends and receives along the chain of stages (acyclic: no deadlock, and every receive's shape is
known from the stage's sizes, so nothing else is exchanged). Every send, and the loss broadcast at
the end, is counted by the active
:func:`~triton_parallel_layers.kernels.collectives.record_comm` ledgers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from triton_parallel_layers.kernels.collectives import broadcast_, record
from triton_parallel_layers.parallel_layers.utils import check_positive_int

__all__ = ["WavefrontPipeline", "wavefront_bubble_fraction"]

State = tuple[torch.Tensor, torch.Tensor]


def wavefront_bubble_fraction(num_stages: int, num_chunks: int) -> float:
    """``(p - 1) / (n + p - 1)``: the idle share of a wavefront pass with equal chunk costs."""
    check_positive_int("num_stages", num_stages)
    check_positive_int("num_chunks", num_chunks)
    return (num_stages - 1) / (num_chunks + num_stages - 1)


class WavefrontPipeline:
    """Run ``stage`` (this rank's recurrent layers) as one stage of a time-chunked pipeline.

    Args:
        stage: this rank's layers, called like a batch-first ``nn.LSTM``:
            ``stage(x (B, t, I), hx or None) -> (out (B, t, H), (h, c))`` (an ``nn.LSTM`` with
            ``batch_first=True``, or a :class:`~triton_parallel_layers.parallel_layers.ParallelLSTM`).
            It must have ``input_size`` and ``hidden_size`` attributes (the shapes received).
        pp_group: the pipeline group; its rank ``k`` runs stage ``k`` (the first takes the input,
            the last computes the loss).
        num_chunks: time chunks ``n`` (``torch.tensor_split`` of ``T``: sizes may differ by one).
        loss_fn: ``loss_fn(out_chunk (B, t, H), target_chunk) -> mean loss of the chunk``, used on
            the last stage; the step's loss is the token-weighted mean over the chunks.
    """

    def __init__(
        self,
        stage: nn.Module,
        pp_group: dist.ProcessGroup | None,
        num_chunks: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        check_positive_int("num_chunks", num_chunks)
        if not getattr(stage, "batch_first", True):
            raise ValueError("WavefrontPipeline: the stage must be batch-first (batch_first=True)")
        for attr in ("input_size", "hidden_size"):
            if not isinstance(getattr(stage, attr, None), int):
                raise TypeError(
                    f"WavefrontPipeline: the stage ({type(stage).__name__}) has no int {attr}; "
                    "pass an nn.LSTM-like module"
                )
        self.stage, self.group, self.num_chunks, self.loss_fn = stage, pp_group, num_chunks, loss_fn
        self.num_stages = dist.get_world_size(pp_group) if pp_group is not None else 1
        self.rank = dist.get_rank(pp_group) if pp_group is not None else 0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1

    def _send(self, t: torch.Tensor, peer: int) -> None:
        t = t.detach().contiguous()
        record("send", t)
        dist.send(t, group_dst=peer, group=self.group)

    def _recv(self, shape: tuple[int, ...], like: torch.Tensor, peer: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=like.dtype, device=like.device)
        dist.recv(t, group_src=peer, group=self.group)
        return t

    def step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of one batch; parameter gradients accumulate in ``stage``.

        Args:
            x: ``(B, T, E)``, passed on every rank (only the first stage reads its values; the
                others take the batch size, length, dtype and device from it). When it is a leaf
                that requires grad, the first stage accumulates its gradient into ``x.grad``.
            target: what ``loss_fn`` compares the last stage's output with, ``(B, T, ...)``; read
                on the last stage only.

        Returns:
            The mean loss over all chunks (0-dim fp32), on every rank.
        """
        if x.dim() != 3:
            raise ValueError(f"WavefrontPipeline: x of shape {tuple(x.shape)}: expected (B, T, E)")
        batch, length = x.shape[0], x.shape[1]
        if length < self.num_chunks:
            raise ValueError(
                f"WavefrontPipeline: sequence length {length} is shorter than num_chunks="
                f"{self.num_chunks}"
            )
        if self.is_first and x.shape[-1] != self.stage.input_size:
            raise ValueError(
                f"WavefrontPipeline: x of shape {tuple(x.shape)}: expected E="
                f"{self.stage.input_size}"
            )
        if self.is_last and target is None:
            raise ValueError("WavefrontPipeline: the last stage needs the target")
        lengths = [len(r) for r in torch.arange(length).tensor_split(self.num_chunks)]
        x_chunks = x.tensor_split(self.num_chunks, dim=1) if self.is_first else None
        t_chunks = target.tensor_split(self.num_chunks, dim=1) if self.is_last else None
        hidden = self.stage.hidden_size

        # ---- forwards, chunk by chunk (stage k on chunk j while stage k+1 is on chunk j-1)
        saved = []  # per chunk: (input leaf, its initial-state leaves, output, final state)
        state: State | None = None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for j, t in enumerate(lengths):
            if self.is_first:
                inp = x_chunks[j].detach().requires_grad_(x.requires_grad)
            else:
                shape = (batch, t, self.stage.input_size)
                inp = self._recv(shape, x, self.rank - 1).requires_grad_()
            state_in = None
            if state is not None:  # cut the graph between chunks: the state re-enters as a leaf
                state_in = tuple(s.detach().requires_grad_() for s in state)
            out, state = self.stage(inp, state_in)  # (B, t, H), ((L, B, H), (L, B, H))
            if self.is_last:
                loss = self.loss_fn(out, t_chunks[j]) * (t / length)  # token-weighted mean
                total += loss.detach().float()
                head = loss
            else:
                self._send(out, self.rank + 1)
                head = out
            saved.append((inp, state_in, head, state))

        # ---- backwards, last chunk first: the state gradient flows from chunk j+1 to chunk j
        grad_state: State | None = None
        x_grads = []  # first stage: the input's gradient, chunk by chunk (last first)
        for j in reversed(range(len(lengths))):
            inp, state_in, head, state_out = saved.pop()
            grad_head = None  # the last stage's head is the loss: d loss / d loss = 1
            if not self.is_last:
                grad_head = self._recv((batch, lengths[j], hidden), x, self.rank + 1)
            outputs, grads = [head], [grad_head]
            if grad_state is not None:
                outputs += list(state_out)
                grads += list(grad_state)
            torch.autograd.backward(outputs, grads)
            if state_in is not None:
                grad_state = tuple(
                    s.grad if s.grad is not None else torch.zeros_like(s) for s in state_in
                )
            if not self.is_first:
                self._send(inp.grad, self.rank - 1)
            elif inp.requires_grad:
                x_grads.append(inp.grad)
        if x_grads:  # x is a leaf that requires grad: accumulate into x.grad, as backward() does
            grad_x = torch.cat(x_grads[::-1], dim=1)
            x.grad = grad_x if x.grad is None else x.grad + grad_x
        if self.num_stages > 1:
            broadcast_(total, dist.get_global_rank(self.group, self.num_stages - 1), self.group)
        return total
