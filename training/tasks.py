"""What the trainer trains: a task is a model, its presets, its data and its evaluation.

* :class:`GPTTask`: :class:`triton_parallel_layers.models.gpt.GPT` as a byte-level language model on the Python standard
  library's sources (:func:`triton_parallel_layers.training.data.load_stdlib_corpus`); evaluation is the validation loss
  (nats per byte); at the end a text sample.
* :class:`LSTMTask`: :class:`triton_parallel_layers.models.lstm.LSTMLM`, a stacked LSTM, on the same
  bytes with the same evaluation and sample as the GPT.
* :class:`CNNTask`: :class:`triton_parallel_layers.models.cnn.ResNetCNN` on scikit-learn's digits at 28x28; evaluation is
  the test accuracy.

Each task checks its layout against the model before anything distributed is built
(:meth:`validate`): every size the layout must divide, so a bad layout fails on every rank with
one line instead of deep inside a collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from triton_parallel_layers.training.config import ParallelConfig, RunConfig
from triton_parallel_layers.training.data import (
    ByteCorpus,
    DigitsData,
    dp_slice,
    load_stdlib_corpus,
)

__all__ = [
    "CNN_PRESETS",
    "CNNTask",
    "CNNTaskConfig",
    "GPT_PRESETS",
    "GPTTask",
    "GPTTaskConfig",
    "LSTM_PRESETS",
    "LSTMTask",
    "LSTMTaskConfig",
]


def _divides(problems: list[str], what: str, size: int, parts: int, flag: str) -> None:
    if size % parts:
        problems.append(f"{what}={size} is not divisible by {flag}")


def _check_layout(parallel: ParallelConfig, world_size: int, problems: list[str]) -> None:
    if parallel.world_size != world_size:
        problems.insert(
            0,
            f"--dp {parallel.dp} --pp {parallel.pp} --tp {parallel.tp} needs "
            f"{parallel.world_size} processes, but {world_size} were launched (torchrun "
            f"--nproc-per-node and --nnodes)",
        )


# ---------------------------------------------------------------------------------------------
# GPT on the standard library's sources
# ---------------------------------------------------------------------------------------------
GPT_PRESETS: dict[str, dict] = {
    # 0.82M parameters: about 2 minutes at (dp, pp, tp) = (1, 2, 2) on 4 processes of 2 CPU cores
    "tiny": dict(n_layers=4, embed_dim=128, n_heads=4, seq_len=128, batch_size=16, lr=3e-3,
                 max_steps=400),
    # 126M parameters (12 L E^2 with L=10, E=1024)
    "125m": dict(n_layers=10, embed_dim=1024, n_heads=16, seq_len=1024, batch_size=32, lr=6e-4,
                 max_steps=5000),
    # 1.21B parameters (L=24, E=2048)
    "1b": dict(n_layers=24, embed_dim=2048, n_heads=16, seq_len=2048, batch_size=32, lr=3e-4,
               max_steps=5000),
}  # fmt: skip


@dataclass
class GPTTaskConfig:
    """The GPT, its data and its evaluation."""

    model: str = "tiny"
    """Model size preset: tiny (CPU), 125m or 1b (GPUs)."""
    n_layers: int | None = None
    """Transformer blocks; default: the preset's."""
    embed_dim: int | None = None
    """Residual width; default: the preset's."""
    n_heads: int | None = None
    """Attention heads; default: the preset's."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); default: n_heads."""
    seq_len: int | None = None
    """Tokens (bytes) per sequence; default: the preset's."""
    dropout: float = 0.0
    """Dropout on the embedding and the residual branches."""
    data_bytes: int | None = None
    """Cap on the training bytes read from the standard library (default: all, ~14 MB)."""
    eval_batches: int = 4
    """Validation batches (of --batch-size sequences) per evaluation."""
    sample_tokens: int = 120
    """Bytes to sample from the model at the end (0: none)."""
    prompt: str = "def "
    """Prompt of the final sample."""

    def __post_init__(self) -> None:
        if self.model not in GPT_PRESETS:
            raise ValueError(f"--model={self.model!r}: expected one of {list(GPT_PRESETS)}")


class GPTTask:
    """Byte-level language modelling of Python sources with :class:`triton_parallel_layers.models.gpt.GPT`."""

    kind = "gpt"
    unit = "tok"

    def __init__(self, cfg: GPTTaskConfig, run: RunConfig) -> None:
        from triton_parallel_layers.models.gpt import GPT_TP_PLAN, GPTConfig

        preset = GPT_PRESETS[cfg.model]
        self._set_run(cfg, run, preset)
        self.plan = GPT_TP_PLAN
        self.config = GPTConfig(
            vocab_size=ByteCorpus.vocab_size,
            n_layers=cfg.n_layers or preset["n_layers"],
            n_heads=cfg.n_heads or preset["n_heads"],
            n_kv_heads=cfg.n_kv_heads,
            embed_dim=cfg.embed_dim or preset["embed_dim"],
            max_seq_len=self.seq_len,
            dropout=cfg.dropout,
            vocab_pad_multiple=ByteCorpus.vocab_size,
        )
        self.name = f"gpt-{cfg.model}"

    def _set_run(self, cfg, run: RunConfig, preset: dict) -> None:
        """What the byte-level tasks share: the sequence length, batch size, learning rate and
        step count (the command line's, else the preset's), the seed; the corpus loads later."""
        self.cfg = cfg
        self.seq_len = cfg.seq_len or preset["seq_len"]
        self.batch_size = run.batch_size or preset["batch_size"]
        self.default_lr = preset["lr"]
        self.default_steps = preset["max_steps"]
        self.seed = run.seed
        self.corpus: ByteCorpus | None = None

    # -- what the checkpoint must agree on ----------------------------------------------------
    def model_meta(self) -> dict:
        return {"kind": self.kind, "config": dataclasses.asdict(self.config)}

    def validate(self, parallel: ParallelConfig, world_size: int) -> None:
        """Raise ``ValueError`` (one line) if the layout does not fit the model or the world."""
        c, tp = self.config, parallel.tp
        problems: list[str] = []
        _check_layout(parallel, world_size, problems)
        _divides(problems, "n_heads", c.n_heads, tp, f"--tp {tp}")
        if c.n_kv_heads != c.n_heads:
            _divides(problems, "n_kv_heads", c.n_kv_heads, tp, f"--tp {tp}")
        _divides(problems, "the MLP width", c.mlp_hidden, tp, f"--tp {tp}")
        _divides(problems, "the padded vocabulary", c.padded_vocab_size, tp, f"--tp {tp}")
        if parallel.sequence_parallel:
            _divides(problems, "--seq-len", self.seq_len, tp, f"--tp {tp} (sequence parallel)")
        _check_batch(problems, self.batch_size, parallel)
        layers = c.n_layers + 2  # embed, blocks, head
        stages = parallel.pp * parallel.chunks
        if layers < stages:
            problems.append(
                f"{c.n_layers} blocks + embedding + head = {layers} layers cannot fill "
                f"{stages} pipeline stages (--pp {parallel.pp} x {parallel.chunks} chunks)"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def build_model(self):
        from triton_parallel_layers.models.gpt import GPT

        return GPT(self.config, seed=self.seed)

    def sample_input(self, batch: int) -> torch.Tensor:
        """A microbatch of model input of ``batch`` samples (for profiling): ids ``(b, S)``."""
        return torch.zeros(batch, self.seq_len, dtype=torch.long)

    # -- data ---------------------------------------------------------------------------------
    def load_data(self) -> dict:
        self.corpus = load_stdlib_corpus(self.cfg.data_bytes)
        return {
            "corpus": self.corpus.name,
            "train_bytes": int(self.corpus.train.numel()),
            "val_bytes": int(self.corpus.val.numel()),
            "fingerprint": self.corpus.fingerprint,
        }

    def describe_data(self) -> str:
        c = self.corpus
        return (
            f"{c.name}: {c.files} files, {c.train.numel() / 1e6:.1f} MB train / "
            f"{c.val.numel() / 1e6:.2f} MB validation bytes"
        )

    @property
    def items_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def train_batch(self, step: int, dp_rank: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, target = self.corpus.batch(step, self.batch_size, self.seq_len, self.seed)
        return dp_slice(ids, dp_rank, dp), dp_slice(target, dp_rank, dp)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, engine) -> dict:
        """``{"val_loss": mean loss over the validation batches}`` (nats per byte), all ranks."""
        dims = engine.dims
        total = torch.zeros((), dtype=torch.float32, device=engine.device)
        for i in range(self.cfg.eval_batches):
            ids, target = self.corpus.eval_batch(i, self.batch_size, self.seq_len, self.seed)
            ids, target = (
                dp_slice(ids, dims.dp_rank, dims.dp),
                dp_slice(target, dims.dp_rank, dims.dp),
            )
            total += engine.eval_loss(ids.to(engine.device), target.to(engine.device))
        if dims.dp > 1:
            dist.all_reduce(total, group=dims.dp_group)
        return {"val_loss": float(total) / (self.cfg.eval_batches * dims.dp)}

    def flops_per_item(self, num_params: int) -> float:
        """Training FLOPs per token: ``6 N + 6 L S E`` (matmuls with weights, and attention's
        ``QK^T`` and ``PV`` with the causal half skipped), forward and backward."""
        c = self.config
        return 6.0 * num_params + 6.0 * c.n_layers * self.seq_len * c.embed_dim

    def final_report(self, engine) -> dict:
        """A text sample from the prompt (printed by rank 0)."""
        n = self.cfg.sample_tokens
        if n <= 0:
            return {}
        text = sample_text(engine, self.config, self.cfg.prompt, n, seed=self.seed)
        return {"sample": text}


def sample_text(
    engine,
    config,
    prompt: str,
    num_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """Sample ``num_tokens`` bytes after ``prompt`` from a byte-level GPT at any layout (every rank
    calls it; the whole sequence is recomputed per token, no KV cache). Returns the text on every
    rank."""
    device = engine.device
    ids = torch.tensor([list(prompt.encode("utf-8")) or [10]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    tp = engine.dims.tp
    for _ in range(num_tokens):
        window = ids[:, -config.max_seq_len :]
        pad = 0
        if engine.parallel.sequence_parallel and window.shape[1] % tp:
            pad = tp - window.shape[1] % tp  # sequence parallel needs S divisible by tp
            window = torch.cat([window.new_full((1, pad), 10), window], dim=1)
        logits = engine.forward(window)
        nxt = torch.zeros(1, 1, dtype=torch.long, device=device)
        if logits is not None:
            last = engine.gather_vocab(logits[:, -1].float())[:, : config.vocab_size]  # (1, V)
            if temperature <= 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if 0 < top_k < last.shape[-1]:
                    kth = last.topk(top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(last.softmax(-1), 1, generator=gen)
        engine.broadcast_from_last(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return bytes(ids[0].tolist()).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Stacked LSTM on the standard library's sources
# ---------------------------------------------------------------------------------------------
LSTM_PRESETS: dict[str, dict] = {
    # 0.82M parameters, as the GPT's tiny preset (2 layers: 4H(E+H) + 4H(2H) with E=128, H=224)
    "tiny": dict(n_layers=2, embed_dim=128, hidden_size=224, seq_len=128, batch_size=16, lr=3e-3,
                 max_steps=400),
    # 25M parameters (4 layers, H=1280)
    "large": dict(n_layers=4, embed_dim=512, hidden_size=1280, seq_len=256, batch_size=32,
                  lr=1e-3, max_steps=5000),
}  # fmt: skip


@dataclass
class LSTMTaskConfig:
    """The stacked LSTM, its data and its evaluation (the GPT's)."""

    model: str = "tiny"
    """Model size preset: tiny (CPU) or large (GPUs)."""
    n_layers: int | None = None
    """Stacked LSTM layers; default: the preset's."""
    embed_dim: int | None = None
    """Token embedding width; default: the preset's."""
    hidden_size: int | None = None
    """Hidden units per layer (divisible by --tp); default: the preset's."""
    seq_len: int | None = None
    """Bytes per sequence (the truncated-BPTT window); default: the preset's."""
    dropout: float = 0.0
    """Dropout on the embedding and after every LSTM layer."""
    data_bytes: int | None = None
    """Cap on the training bytes read from the standard library (default: all, ~14 MB)."""
    eval_batches: int = 4
    """Validation batches (of --batch-size sequences) per evaluation."""
    sample_tokens: int = 120
    """Bytes to sample from the model at the end (0: none)."""
    prompt: str = "def "
    """Prompt of the final sample."""

    def __post_init__(self) -> None:
        if self.model not in LSTM_PRESETS:
            raise ValueError(f"--model={self.model!r}: expected one of {list(LSTM_PRESETS)}")


class LSTMTask(GPTTask):
    """Byte-level language modelling of Python sources with
    :class:`triton_parallel_layers.models.lstm.LSTMLM`: the GPT task's data, validation loss (nats
    per byte) and final sample, another model."""

    kind = "lstm"

    def __init__(self, cfg: LSTMTaskConfig, run: RunConfig) -> None:
        from triton_parallel_layers.models.lstm import LSTM_TP_PLAN, LSTMConfig

        preset = LSTM_PRESETS[cfg.model]
        self._set_run(cfg, run, preset)
        self.plan = LSTM_TP_PLAN
        self.config = LSTMConfig(
            vocab_size=ByteCorpus.vocab_size,
            n_layers=cfg.n_layers or preset["n_layers"],
            embed_dim=cfg.embed_dim or preset["embed_dim"],
            hidden_size=cfg.hidden_size or preset["hidden_size"],
            max_seq_len=self.seq_len,
            dropout=cfg.dropout,
            vocab_pad_multiple=ByteCorpus.vocab_size,
        )
        self.name = f"lstm-{cfg.model}"

    def validate(self, parallel: ParallelConfig, world_size: int) -> None:
        """Raise ``ValueError`` (one line) if the layout does not fit the model or the world."""
        c, tp = self.config, parallel.tp
        problems: list[str] = []
        _check_layout(parallel, world_size, problems)
        _divides(problems, "--hidden-size", c.hidden_size, tp, f"--tp {tp}")
        _divides(problems, "the padded vocabulary", c.padded_vocab_size, tp, f"--tp {tp}")
        if parallel.sequence_parallel:
            problems.append(
                "--sequence-parallel does not apply to the LSTM (its recurrence needs the whole "
                "sequence on every rank)"
            )
        _check_batch(problems, self.batch_size, parallel)
        layers = c.n_layers + 2  # embed, LSTM layers, head
        stages = parallel.pp * parallel.chunks
        if layers < stages:
            problems.append(
                f"{c.n_layers} LSTM layers + embedding + head = {layers} layers cannot fill "
                f"{stages} pipeline stages (--pp {parallel.pp} x {parallel.chunks} chunks)"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def build_model(self):
        from triton_parallel_layers.models.lstm import LSTMLM

        return LSTMLM(self.config, seed=self.seed)

    def flops_per_item(self, num_params: int) -> float:
        """Training FLOPs per token: ``6 N`` (every weight in one multiply-add per token, forward
        and backward; the embedding's lookups are counted too, a slight overestimate)."""
        return 6.0 * num_params


# ---------------------------------------------------------------------------------------------
# ResNet-style CNN on the digits
# ---------------------------------------------------------------------------------------------
CNN_PRESETS: dict[str, dict] = {
    # no batch norm (see triton_parallel_layers.models.cnn): a high Adam learning rate gets it going
    "tiny": dict(width=16, num_stages=2, blocks_per_stage=1, batch_size=64, lr=3e-2, epochs=20),
    "resnet": dict(width=32, num_stages=3, blocks_per_stage=2, batch_size=64, lr=2e-2, epochs=20),
}


@dataclass
class CNNTaskConfig:
    """The CNN and its data."""

    model: str = "tiny"
    """Model preset: tiny or resnet."""
    width: int | None = None
    """Channels of the first stage (doubled per stage); default: the preset's."""
    num_stages: int | None = None
    """Stages (each after the first halves H and W); default: the preset's."""
    blocks_per_stage: int | None = None
    """Residual blocks per stage; default: the preset's."""
    epochs: int | None = None
    """Epochs over the training images, when --max-steps is not given; default: the preset's."""

    def __post_init__(self) -> None:
        if self.model not in CNN_PRESETS:
            raise ValueError(f"--model={self.model!r}: expected one of {list(CNN_PRESETS)}")


class CNNTask:
    """Digit classification with :class:`triton_parallel_layers.models.cnn.ResNetCNN`."""

    kind = "cnn"
    unit = "img"

    def __init__(self, cfg: CNNTaskConfig, run: RunConfig) -> None:
        from triton_parallel_layers.models.cnn import CNN_TP_PLAN, CNNConfig

        preset = CNN_PRESETS[cfg.model]
        self.cfg = cfg
        self.batch_size = run.batch_size or preset["batch_size"]
        self.default_lr = preset["lr"]
        self.epochs = cfg.epochs or preset["epochs"]
        self.plan = CNN_TP_PLAN
        self.seed = run.seed
        self.config = CNNConfig(
            width=cfg.width or preset["width"],
            num_stages=cfg.num_stages or preset["num_stages"],
            blocks_per_stage=cfg.blocks_per_stage or preset["blocks_per_stage"],
        )
        self.name = f"cnn-{cfg.model}"
        self.data: DigitsData | None = None
        self.default_steps = self.epochs * (1437 // self.batch_size)  # digits: 1437 train images

    def model_meta(self) -> dict:
        return {"kind": self.kind, "config": dataclasses.asdict(self.config)}

    def validate(self, parallel: ParallelConfig, world_size: int) -> None:
        c, tp = self.config, parallel.tp
        problems: list[str] = []
        _check_layout(parallel, world_size, problems)
        _divides(problems, "--width", c.width, tp, f"--tp {tp}")
        if parallel.sequence_parallel:
            problems.append("--sequence-parallel applies to the GPT only")
        _check_batch(problems, self.batch_size, parallel)
        layers = 1 + c.num_stages * c.blocks_per_stage + (c.num_stages - 1) + 1
        stages = parallel.pp * parallel.chunks
        if layers < stages:
            problems.append(
                f"the CNN has {layers} layers (stem, blocks, downsamplings, head), too few for "
                f"{stages} pipeline stages"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def build_model(self):
        from triton_parallel_layers.models.cnn import ResNetCNN

        return ResNetCNN(self.config, seed=self.seed)

    def sample_input(self, batch: int) -> torch.Tensor:
        """A microbatch of model input of ``batch`` samples (for profiling): images ``(b, C, 28, 28)``."""
        return torch.zeros(batch, self.config.in_channels, 28, 28)

    def load_data(self) -> dict:
        self.data = DigitsData(self.batch_size, seed=self.seed)
        self.default_steps = self.epochs * self.data.steps_per_epoch
        return {"dataset": "sklearn-digits-28", "train_images": len(self.data.y_train)}

    def describe_data(self) -> str:
        d = self.data
        return (
            f"scikit-learn digits at 28x28: {len(d.y_train)} train / {len(d.y_test)} test "
            f"images, {d.steps_per_epoch} steps per epoch"
        )

    @property
    def items_per_step(self) -> int:
        return self.batch_size

    def train_batch(self, step: int, dp_rank: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.batch(step)
        return dp_slice(x, dp_rank, dp), dp_slice(y, dp_rank, dp)

    def evaluate(self, engine) -> dict:
        """``{"test_accuracy", "test_loss"}`` over the whole test split (split over dp)."""
        dims = engine.dims
        x, y = self.data.x_test, self.data.y_test
        idx = torch.arange(dims.dp_rank, len(y), dims.dp)
        x, y = x[idx].to(engine.device), y[idx].to(engine.device)
        logits = engine.forward(x)
        stats = torch.zeros(2, dtype=torch.float32, device=engine.device)
        if logits is not None:
            logits = logits.float()
            stats[0] = (logits.argmax(-1) == y).sum()
            stats[1] = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        engine.broadcast_from_last(stats)
        if dims.dp > 1:
            dist.all_reduce(stats, group=dims.dp_group)
        n = len(self.data.y_test)
        return {"test_accuracy": float(stats[0]) / n, "test_loss": float(stats[1]) / n}

    def flops_per_item(self, num_params: int) -> float | None:
        return None  # conv FLOPs depend on the spatial sizes; no MFU estimate for the CNN

    def final_report(self, engine) -> dict:
        return {}


def _check_batch(problems: list[str], batch: int, parallel: ParallelConfig) -> None:
    per_dp, rem = divmod(batch, parallel.dp)
    if rem:
        problems.append(f"--batch-size={batch} is not divisible by --dp {parallel.dp}")
    elif per_dp % parallel.microbatches:
        problems.append(
            f"the per-replica batch {per_dp} (--batch-size / --dp) is not divisible by "
            f"--microbatches {parallel.microbatches}"
        )
