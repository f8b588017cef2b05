"""Checkpoints of the trainer on gloo: bit-exact resume, resharding across (pp, tp), atomic saves.

A tiny GPT (2 blocks, E=64, 4 heads, sequences of 32 bytes of the standard library, batch 8) is
trained through :class:`triton_parallel_layers.training.trainer.Trainer` in the shared worker pools:

* a run stopped after step 4 (its last checkpoint: step 3) and resumed reaches the same losses
  at steps 4..6 as the uninterrupted run, bit for bit, at (dp, pp, tp) = (1, 2, 2);
* its checkpoint, saved at (1, 2, 2), loaded at (1, 1, 4) and at (1, 1, 1) gives the same
  validation loss, the same training loss at the next step and the same loss after that step (so
  the Adam moments were resharded too), as continuing at (1, 2, 2);
* a save that dies after DCP wrote its data but before it finished leaves ``latest`` at the
  previous checkpoint, which loads; the next save clears the leftovers.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_tensors
from triton_parallel_layers.parallel_layers.checkpoint import (
    CheckpointError,
    find_checkpoint,
    read_meta,
)
from triton_parallel_layers.training.config import OptimConfig, ParallelConfig, RunConfig
from triton_parallel_layers.training.tasks import GPTTask, GPTTaskConfig
from triton_parallel_layers.training.trainer import Trainer

TINY = dict(n_layers=2, embed_dim=64, n_heads=4, seq_len=32, data_bytes=200_000,
            eval_batches=1, sample_tokens=0)  # fmt: skip
RTOL = 1e-5


class _Killed(Exception):
    """Raised from the step hook: the run stops as if its processes were killed."""


def _trainer(out, layout, max_steps, *, resume=None, ckpt_interval=3, kill_after=None, seed=0,
             async_checkpoint=False):  # fmt: skip
    run = RunConfig(max_steps=max_steps, batch_size=8, eval_interval=0, ckpt_interval=ckpt_interval,
                    out=str(out), progress=False, plot=False, log_interval=0, seed=seed,
                    async_checkpoint=async_checkpoint)  # fmt: skip
    task = GPTTask(GPTTaskConfig(**TINY), run)
    dp, pp, tp = layout

    def hook(step, record):
        if kill_after is not None and step >= kill_after:
            raise _Killed

    trainer = Trainer(task, ParallelConfig(dp=dp, pp=pp, tp=tp), OptimConfig(warmup_steps=2), run,
                      resume=Path(resume) if resume else None, on_step=hook)  # fmt: skip
    trainer.setup()
    return trainer


def _train(out, layout, max_steps, **kwargs) -> dict:
    trainer = _trainer(out, layout, max_steps, **kwargs)
    start = trainer.step
    with contextlib.suppress(_Killed):
        trainer.fit()
    return {"start": start, "losses": {h["step"]: h["loss"] for h in trainer.history}}


def _saved(out, layout, max_steps, **kwargs) -> list[str]:
    """Train with checkpoints after every step; the checkpoint folders left (2 kept)."""
    _train(out, layout, max_steps, ckpt_interval=1, **kwargs)
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_async_checkpoints_equal_sync_ones(dist_run, tmp_path):
    """``--async-checkpoint`` at tp=2 writes, for every step, bitwise the checkpoint a blocking
    save writes (the state is copied before the next step changes it); ``latest`` and the
    pruning to the newest two work alike; nothing half-written is left."""
    folders = {}
    for mode in ("sync", "async"):
        kwargs = {"async_checkpoint": mode == "async"}
        folders[mode] = dist_run(2, _saved, tmp_path / mode, (1, 1, 2), 3, **kwargs)[0]
    assert folders["async"] == folders["sync"] == ["latest", "step_00000002", "step_00000003"]
    for step in (2, 3):
        name = f"step_{step:08d}"
        want = checkpoint_tensors(tmp_path / "sync" / "checkpoints" / name, tmp_path / "sync")
        got = checkpoint_tensors(tmp_path / "async" / "checkpoints" / name, tmp_path / "async")
        assert want.keys() == got.keys() and any(k.startswith("optim/") for k in got)
        for key, value in want.items():
            assert torch.equal(value, got[key]), (step, key)
        assert read_meta(tmp_path / "async" / "checkpoints" / name)["step"] == step
    assert find_checkpoint(tmp_path / "async" / "checkpoints").name == "step_00000003"


def _continue_one_step(ckpt, out, layout) -> dict:
    """Load ``ckpt`` at ``layout``; the validation loss, then one more step and its results."""
    step = read_meta(find_checkpoint(ckpt))["step"]
    trainer = _trainer(out, layout, step + 1, resume=ckpt, ckpt_interval=0)
    before = trainer.task.evaluate(trainer.engine)["val_loss"]
    trainer.fit()
    return {
        "val_before": before,
        "train_loss": trainer.history[-1]["loss"],
        "val_after": trainer.history[-1]["val_loss"],
        "rank": trainer.dims.rank,
    }


@pytest.fixture(scope="module")
def reference(dist_run, tmp_path_factory):
    """The uninterrupted run at (1, 2, 2): 6 steps, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("reference")
    result = dist_run(4, _train, out, (1, 2, 2), 6, timeout=180)[0]
    return out, result


def test_resume_is_bit_exact(dist_run, reference, tmp_path):
    ref_out, ref = reference
    assert sorted(ref["losses"]) == [1, 2, 3, 4, 5, 6]
    # killed after step 4: the step-4 work is lost, the step-3 checkpoint remains
    killed = dist_run(4, _train, tmp_path, (1, 2, 2), 6, kill_after=4, timeout=180)[0]
    assert sorted(killed["losses"]) == [1, 2, 3, 4]
    assert read_meta(find_checkpoint(tmp_path / "checkpoints"))["step"] == 3
    resumed = dist_run(4, _train, tmp_path, (1, 2, 2), 6, resume=tmp_path / "checkpoints",
                       timeout=180)[0]  # fmt: skip
    assert resumed["start"] == 3
    for step in (4, 5, 6):
        assert resumed["losses"][step] == ref["losses"][step], (step, resumed, ref)
    # the log of the resumed run continues the killed one's, without its lost step 4
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert ref["losses"][6] < ref["losses"][1]


def test_checkpoint_reshards_across_pp_and_tp(dist_run, reference, tmp_path):
    ref_out, _ = reference
    ckpt = ref_out / "checkpoints"  # saved at (dp, pp, tp) = (1, 2, 2), step 6
    results = {
        (1, 2, 2): dist_run(4, _continue_one_step, ckpt, tmp_path / "a", (1, 2, 2), timeout=180),
        (1, 1, 4): dist_run(4, _continue_one_step, ckpt, tmp_path / "b", (1, 1, 4), timeout=180),
        (1, 1, 1): dist_run(1, _continue_one_step, ckpt, tmp_path / "c", (1, 1, 1), timeout=180),
    }
    base = results[(1, 2, 2)][0]
    for layout, per_rank in results.items():
        for r in per_rank:  # every rank agrees, and agrees with the saving layout
            for key in ("val_before", "train_loss", "val_after"):
                assert r[key] == pytest.approx(base[key], rel=RTOL), (layout, key, r, base)


def _killed_save(out) -> dict:
    """Save at step 1, then a save at step 2 that dies after writing its data (before DCP
    finished: no .metadata); then load what ``latest`` points to."""
    import torch.distributed.checkpoint as dcp

    trainer = _trainer(out, (1, 1, 2), 2, ckpt_interval=1)
    original = dcp.FileSystemWriter.finish

    def dying_finish(self, metadata, results):
        raise RuntimeError("killed while saving")

    trainer.max_steps = 1
    trainer.fit()  # step 1, saved (the final save)
    saved = {p.name: p.param.detach().clone() for p in trainer.engine.params}
    trainer.max_steps = 2
    dcp.FileSystemWriter.finish = dying_finish
    error = None
    try:
        trainer.fit()  # step 2: its save fails midway
    except CheckpointError as e:
        error = str(e)
    finally:
        dcp.FileSystemWriter.finish = original
    root = Path(out) / "checkpoints"
    leftovers = sorted(p.name for p in root.iterdir())
    # a fresh process would now resume from latest
    fresh = _trainer(out, (1, 1, 2), 2, resume=root)
    loaded = {p.name: p.param.detach() for p in fresh.engine.params}
    same = all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh.save()  # a later save cleans the leftovers
    after = sorted(p.name for p in root.iterdir())
    return {
        "error": error,
        "leftovers": leftovers,
        "step": fresh.step,
        "same": same,
        "after": after,
    }


def test_killed_save_leaves_previous_checkpoint(dist_run, tmp_path):
    r = dist_run(2, _killed_save, tmp_path, timeout=120)[0]
    assert r["error"] is not None and "saving checkpoint" in r["error"]
    assert ".tmp-step_00000002" in r["leftovers"] and "step_00000002" not in r["leftovers"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert r["step"] == 1 and r["same"]
    assert not any(name.startswith(".tmp") for name in r["after"])


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        find_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoint(tmp_path)
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "step_00000005" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(tmp_path / "step_00000005")
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="points to"):
        find_checkpoint(tmp_path)
    (tmp_path / "step_00000005" / ".metadata").write_bytes(b"garbage")
    (tmp_path / "step_00000005" / "meta.json").write_text("{not json")
    (tmp_path / "latest").write_text("step_00000005\n")
    assert find_checkpoint(tmp_path) == tmp_path / "step_00000005"
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        read_meta(tmp_path / "step_00000005")


def _partly_missing_keys(out) -> str:
    """Rank 1 asks for a key the checkpoint lacks (as a stage of another model would): every rank
    raises the same error, and none waits inside the load for a partner that has left."""
    import torch.distributed as dist

    from triton_parallel_layers.parallel_layers.checkpoint import (
        CheckpointError,
        load_checkpoint,
        save_checkpoint,
    )

    rank = dist.get_rank()
    state = {"model/w": torch.full((4,), float(rank))}
    save_checkpoint(out, 1, state, {"kind": "test"})
    wanted = {"model/w": torch.zeros(4)}
    if rank == 1:
        wanted["model/other_stage.weight"] = torch.zeros(2)
    try:
        load_checkpoint(out, wanted)
    except CheckpointError as e:
        return str(e)
    raise AssertionError("load_checkpoint did not raise")


def test_keys_missing_on_one_rank_fail_on_every_rank(dist_run, tmp_path):
    messages = dist_run(2, _partly_missing_keys, str(tmp_path / "ckpt"), timeout=60)
    assert messages[0] == messages[1] and "other_stage.weight" in messages[0], messages


def test_resaving_a_step_killed_midway_stays_loadable(tmp_path, monkeypatch):
    """A step saved again (a run resumed from an older checkpoint) and cut short at either
    point of the folder swap leaves `latest` on a complete checkpoint with the new values."""
    import triton_parallel_layers.parallel_layers.checkpoint as ckpt

    root = tmp_path / "ckpt"
    ckpt.save_checkpoint(root, 3, {"model/w": torch.zeros(2)}, {"kind": "test"})

    def load_w() -> torch.Tensor:
        state = {"model/w": torch.empty(2)}
        ckpt.load_checkpoint(root, state)
        return state["model/w"]

    # Killed after the old folder is removed, before the new one is renamed into place.
    real_rmtree = ckpt.shutil.rmtree

    def killed_after_removing(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if Path(path).name == "step_00000003":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt.shutil, "rmtree", killed_after_removing)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(root, 3, {"model/w": torch.ones(2)}, {"kind": "test"})
    assert torch.equal(load_w(), torch.ones(2))
    # The next save does not sweep the folder `latest` names, and finishes normally.
    ckpt.save_checkpoint(root, 4, {"model/w": torch.full((2,), 4.0)}, {"kind": "test"})
    assert find_checkpoint(root).name == "step_00000004"

    # Killed after the rename, before `latest` names the step again.
    calls = []
    real_point = ckpt._point_latest

    def killed_second_pointer(root_, name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_point(root_, name)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_point_latest", killed_second_pointer)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(root, 4, {"model/w": torch.full((2,), 5.0)}, {"kind": "test"})
    assert find_checkpoint(root).name == "step_00000004"
    assert torch.equal(load_w(), torch.full((2,), 5.0))
