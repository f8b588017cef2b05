"""Fault tolerance of the trainer (``training/fault.py``), with faults injected by the test hook
``TPL_INJECT_FAULT`` (``kind@rank:step``).

* A NaN loss on one tensor-parallel rank (its peer's loss is finite) skips the optimizer step on
  both ranks: the weights after the skipped step are bitwise those before it, the step is logged
  as skipped and counted in the summary, and training goes on.
* More skipped steps in a row than ``--max-skipped-steps`` stop the run: status 1 on every rank,
  one error line.
* Under ``torchrun``: a rank that raises on its own (its peer waits in a collective), and a rank
  that hangs (its peer's collective times out after ``--timeout``) end every rank with status 1,
  no signal, and one error line naming the rank and what failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_training import GPT_TINY, ROOT, _main, _metrics

from helpers import checkpoint_tensors
from triton_parallel_layers.training.fault import INJECT_ENV, FaultPlan

TP_OFF = [*GPT_TINY, "--optimizer", "adamw"]  # the layout flags follow
TP2 = [*TP_OFF, "--tp", "2"]


def _main_with_faults(spec: str, kind: str, argv: list[str]) -> dict:
    """``_main`` on this worker rank with ``INJECT_ENV=spec`` set for the run."""
    os.environ[INJECT_ENV] = spec
    try:
        return _main(kind, argv)
    finally:
        del os.environ[INJECT_ENV]


def test_fault_plan_parses_the_hook():
    assert FaultPlan(1, "nan@1:3, nan@0:4,nan@1:5").faults == {("nan", 3), ("nan", 5)}
    assert FaultPlan(0, "").faults == set()
    # the n-th kill (every rank's, in the order written) is for attempt n; other faults always
    spec = "kill-forward@1:2,kill-tp@0:3,nan@1:4"
    assert FaultPlan(1, spec, attempt=0).faults == {("kill-forward", 2), ("nan", 4)}
    assert FaultPlan(1, spec, attempt=1).faults == {("nan", 4)}
    assert FaultPlan(0, spec, attempt=1).faults == {("kill-tp", 3)}
    # a kill point the layout lacks is an error on every rank, the killed one's peers too
    one_rank = SimpleNamespace(dims=SimpleNamespace(dp=1, pp=1, tp=1))
    with pytest.raises(ValueError, match="kill-send needs a layout with pp > 1"):
        FaultPlan(0, "kill-send@1:2").install(one_rank, None)
    with pytest.raises(ValueError, match="expected kind@rank:step"):
        FaultPlan(0, "nan@1")
    with pytest.raises(ValueError, match="fault 'boom'"):
        FaultPlan(0, "boom@0:1")


def test_nan_loss_on_one_rank_skips_the_step_everywhere(dist_run, tmp_path):
    out = tmp_path / "run"
    args = [*TP2, "--max-steps", "4", "--ckpt-interval", "1", "--keep-checkpoints", "0"]
    results = dist_run(2, _main_with_faults, "nan@1:3", "gpt", [*args, "--out", str(out)])
    assert [r["code"] for r in results] == [0, 0], results[0]["err"]
    records = [r for r in _metrics(out) if "loss" in r or "skipped" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["skipped"] is True and "loss" not in records[2]
    assert all("loss" in r for r in records[:2] + records[3:])  # and training went on
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    assert "skipped: non-finite loss or gradient norm (1 in a row)" in results[0]["out"]
    # step 3 changed nothing on either rank (the NaN was on rank 1 only): the weights and the
    # optimizer state saved after it are bitwise those saved after step 2; step 4 moved on
    ckpts = out / "checkpoints"
    after2, after3, after4 = (
        checkpoint_tensors(ckpts / f"step_0000000{s}", tmp_path) for s in (2, 3, 4)
    )
    assert after2.keys() == after3.keys() and any(k.startswith("optim/") for k in after2)
    for key, value in after2.items():
        assert torch.equal(value, after3[key]), key
    assert not torch.equal(
        after3["model/blocks.0.mlp.fc1.weight"], after4["model/blocks.0.mlp.fc1.weight"]
    )


def test_nan_losses_in_a_row_stop_the_run(dist_run, tmp_path):
    args = [*TP2, "--max-steps", "5", "--max-skipped-steps", "1", "--out", str(tmp_path / "r")]
    results = dist_run(2, _main_with_faults, "nan@1:2,nan@1:3", "gpt", args)
    assert [r["code"] for r in results] == [1, 1], results
    lines = results[0]["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), results[0]["err"]
    assert "not finite in 2 consecutive steps (up to step 3; --max-skipped-steps 1)" in lines[0]
    assert results[1]["err"] == ""


def _torchrun(spec: str, args: list[str], cwd: Path, *launcher: str, base: list[str] = TP2,
              timeout: float = 400):  # fmt: skip
    """A 2-rank ``torchrun`` of the GPT (``base``: tensor-parallel) with ``spec`` injected."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", INJECT_ENV: spec}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *launcher, str(ROOT / "scripts" / "train_gpt.py"), *base, *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun_with_fault(spec: str, args: list[str], cwd: Path) -> str:
    """The error line of a 2-rank run of 3 steps with ``spec`` injected (checked: it failed,
    every rank with status 1, one error line)."""
    done = _torchrun(spec, ["--max-steps", "3", *args], cwd)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    # every rank failed with status 1: none stopped by a signal, none hanging
    assert text.count("exitcode  : 1 ") == 2 and "Signal" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


def test_torchrun_a_rank_that_raises_ends_every_rank(tmp_path):
    line = _torchrun_with_fault("raise@1:2", ["--out", str(tmp_path / "r")], tmp_path)
    assert (
        line == "error: rank 1: OSError: injected fault (TPL_INJECT_FAULT) on rank 1 before step 2"
    )


def test_torchrun_a_hung_rank_times_out_every_rank(tmp_path):
    args = ["--timeout", "20", "--out", str(tmp_path / "r")]
    line = _torchrun_with_fault("hang@1:2", args, tmp_path)
    assert line.startswith(
        "error: rank 0: communication failed in step 2: forward and backward: Timed out waiting "
        "20000ms"
    ), line
    assert "; not there: rank 1 in 'step 2: data' for " in line, line


# One torchrun job per layout, each killed at several points in turn (the n-th kill in attempt n,
# checkpoints after every step): every restart resumes by itself from the latest complete
# checkpoint, and the final state is bitwise that of an uninterrupted run at the same layout.
KILL_RUNS = {  # layout flags, kills, the steps the restarts resume at (None: not known)
    "tp2": (["--tp", "2"], "kill-forward@1:2,kill-tp@0:3,kill-save@1:4", [1, 2, 3]),
    "pp2": (["--pp", "2"], "kill-send@0:2,kill-backward@1:3", [1, 2]),
    # checkpoints written in the background: a kill may strike while one is in flight (then
    # the restart resumes from the one before, or starts afresh); the last kill strikes inside
    # the save after step 4, which is in flight on every rank, so the restart resumes at step 3
    "dp2": (["--dp", "2", "--async-checkpoint"], "kill-dp@1:2,kill-optim@0:3,kill-save@0:4",
            [None, None, 3]),
}  # fmt: skip
KILL_STEPS = 5


def _restart_times(text: str, out: Path) -> dict[int, float]:
    """``{attempt: seconds}`` from each injected SIGKILL to the restarted job's resume (its
    checkpoint loaded), for the restarts whose resume the final metrics log still holds."""
    killed = [float(t) for t in re.findall(r"^fault injection: .*, time ([\d.]+)$", text, re.M)]
    resumed = {r["attempt"]: r["time"] for r in _metrics(out) if "resumed_from" in r}
    return {a: t - killed[a - 1] for a, t in sorted(resumed.items())}


@pytest.mark.slow
@pytest.mark.parametrize("layout", KILL_RUNS)
def test_torchrun_restarts_killed_ranks_bit_exactly(dist_run, tmp_path, layout):
    """Ranks SIGKILLed in the forward, the backward, a tensor-parallel collective, a pipeline
    send, the data-parallel all-reduce, the optimizer step and inside a checkpoint save (sync,
    and async while in flight): ``torchrun --max-restarts`` restarts the
    job after each, it resumes from the latest complete checkpoint by itself, and the final
    model and optimizer state are bitwise those of the uninterrupted run."""
    flags, spec, resumed_at = KILL_RUNS[layout]
    steps = ["--max-steps", str(KILL_STEPS)]
    whole = tmp_path / "whole"
    results = dist_run(2, _main, "gpt", [*TP_OFF, *flags, *steps, "--out", str(whole)],
                       timeout=180)  # fmt: skip
    assert [r["code"] for r in results] == [0, 0], results[0]["err"]
    out = tmp_path / "run"
    args = [*flags, *steps, "--ckpt-interval", "1", "--out", str(out)]
    launcher = f"--max-restarts={len(resumed_at)}"  # each restart costs a process start-up
    done = _torchrun(spec, args, tmp_path, launcher, base=TP_OFF, timeout=300 * len(resumed_at))
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    kills = len(resumed_at)
    assert text.count("fault injection: ") == kills and text.count("exitcode: -9") == kills, text
    resumes = [int(s) for s in re.findall(r"^resumed from .* at step (\d+) ", text, re.M)]
    known = [s for s in resumed_at if s is not None]
    assert resumes[len(resumes) - len(known) :] == known, text
    final = f"step_{KILL_STEPS:08d}"
    want = checkpoint_tensors(whole / "checkpoints" / final, tmp_path)
    got = checkpoint_tensors(out / "checkpoints" / final, tmp_path)
    assert want.keys() == got.keys() and any(k.startswith("optim/") for k in got)
    for key, value in want.items():
        assert torch.equal(value, got[key]), key
    times = ", ".join(f"attempt {a}: {t:.1f}" for a, t in _restart_times(text, out).items())
    print(f"\n{layout} ({spec}): seconds from the kill to the resume: {times}")
