"""Real data every machine has without a download, addressed by step so that a resumed (or
resharded) run sees exactly the batches the uninterrupted one would.

* :class:`ByteCorpus`: the Python standard library's own source files as bytes (vocabulary 256).
  Test folders are left out; about one file in twenty (chosen by a hash of its path) is held out
  for validation.
* :class:`DigitsData`: scikit-learn's bundled handwritten digits, upsampled to 28x28
  (:func:`triton_parallel_layers.models.data.load_digits_28`), epochs of shuffled batches.

**Data position.** A batch is a pure function of ``(seed, step)``: the GPT's batch ``k`` is
``batch_size`` windows at offsets drawn from a generator seeded by ``(seed, k)``; the CNN's is slice
``k mod steps_per_epoch`` of epoch ``k // steps_per_epoch``'s permutation, seeded by
``(seed, epoch)``. The global batch is the same at every layout; data-parallel rank ``r`` of ``dp``
takes rows ``[r * b / dp, (r + 1) * b / dp)`` of it. So the data position a checkpoint needs is the
step alone.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from triton_parallel_layers.parallel_layers.init import name_seed

__all__ = ["ByteCorpus", "DigitsData", "dp_slice", "load_stdlib_corpus"]

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def dp_slice(batch: torch.Tensor, dp_rank: int, dp: int) -> torch.Tensor:
    """Rows ``[r * B / dp, (r + 1) * B / dp)`` of a global batch ``(B, ...)``."""
    per = batch.shape[0] // dp
    return batch[dp_rank * per : (dp_rank + 1) * per]


def _generator(seed: int, what: str) -> torch.Generator:
    return torch.Generator().manual_seed(name_seed(seed, what))


@dataclass
class ByteCorpus:
    """A byte-level text corpus split into train and validation bytes (uint8 tensors)."""

    train: torch.Tensor
    """``(N_train,)`` uint8."""
    val: torch.Tensor
    """``(N_val,)`` uint8."""
    name: str
    files: int
    fingerprint: str
    """SHA-256 prefix of the bytes, to tell whether a resumed run reads the same corpus."""

    vocab_size = 256

    def batch(
        self, step: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global training batch ``step``: ``(ids, target)``, each ``(batch_size, seq_len)``
        int64, ``target`` being ``ids`` shifted by one byte."""
        return self._windows(self.train, batch_size, seq_len, _generator(seed, f"train/{step}"))

    def eval_batch(
        self, index: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch ``index`` (the same ones at every evaluation)."""
        return self._windows(self.val, batch_size, seq_len, _generator(seed, f"val/{index}"))

    @staticmethod
    def _windows(data: torch.Tensor, b: int, s: int, gen: torch.Generator):
        if data.numel() < s + 2:
            raise ValueError(f"the corpus has {data.numel()} bytes, too few for seq_len={s}")
        offsets = torch.randint(0, data.numel() - s - 1, (b,), generator=gen)
        idx = offsets[:, None] + torch.arange(s + 1)  # (B, S + 1)
        window = data[idx].long()
        return window[:, :-1], window[:, 1:]


def load_stdlib_corpus(max_bytes: int | None = None, *, val_every: int = 20) -> ByteCorpus:
    """The ``.py`` files of this Python's standard library (test folders left out), sorted by path
    and joined by blank lines; a file is held out for validation when the hash of its relative
    path is divisible by ``val_every``. ``max_bytes`` caps the training bytes (the first files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no Python sources found under {root} (the standard library's folder)")
    train, val = [], []
    n_train = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        held_out = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % val_every == 0
        if not held_out and max_bytes is not None and n_train >= max_bytes:
            continue
        try:
            data = path.read_bytes() + b"\n\n"
        except OSError:
            continue
        if held_out:
            val.append(data)
        else:
            train.append(data)
            n_train += len(data)
    train_bytes = b"".join(train)[:max_bytes]
    val_bytes = b"".join(val)
    digest = hashlib.sha256(train_bytes)
    digest.update(val_bytes)
    return ByteCorpus(
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8),
        name=f"python{sysconfig.get_python_version()}-stdlib",
        files=len(files),
        fingerprint=digest.hexdigest()[:16],
    )


class DigitsData:
    """scikit-learn's digits at 28x28: ``(x_train, y_train, x_test, y_test)`` and step-addressed
    shuffled batches (the last incomplete batch of an epoch is dropped)."""

    def __init__(self, batch_size: int, *, seed: int = 0) -> None:
        from triton_parallel_layers.models.data import load_digits_28

        self.x_train, self.y_train, self.x_test, self.y_test = load_digits_28(seed=0)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(self.y_train) // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"--batch-size={batch_size} is larger than the {len(self.y_train)} training images"
            )
        self._perm: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global training batch ``step``: images ``(B, 1, 28, 28)``, labels ``(B,)``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = _generator(self.seed, f"epoch/{epoch}")
            self._perm = (epoch, torch.randperm(len(self.y_train), generator=gen))
        idx = self._perm[1][i * self.batch_size : (i + 1) * self.batch_size]
        return self.x_train[idx], self.y_train[idx]
