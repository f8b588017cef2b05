"""The training scripts: the same losses at every layout, the CNN across layouts, bad input.

* A tiny GPT trained 2 steps at (dp, pp, tp) = (1, 1, 1), at (2, 1, 2) with sequence parallelism
  and 2 microbatches, and at (1, 2, 2) with the interleaved and ZB-H1 schedules gives the same
  losses (fp32, rtol 1e-5): the global batch, the initialization, the gradient (tied embeddings
  summed across stages) and the clipping do not depend on the layout.
* The CNN trained at (2, 1, 2) and evaluated from its checkpoint at (1, 2, 1) gives the same test
  loss and accuracy.
* Bad input ends with one line on rank 0 (``error: ...``), nothing on the other ranks, status 1:
  a layout that does not fit the world or the model, a missing, foreign or corrupt checkpoint.
* One real ``torchrun`` run of ``scripts/train_gpt.py`` at (1, 2, 2) writes its outputs; resumed
  from a corrupted checkpoint every rank exits with status 1 (no signal) and the job prints one
  error line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triton_parallel_layers.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
GPT_TINY = ["--n-layers", "2", "--embed-dim", "64", "--n-heads", "4", "--seq-len", "32",
            "--data-bytes", "200000", "--batch-size", "8", "--eval-batches", "1",
            "--sample-tokens", "0", "--no-progress", "--no-plot", "--log-interval", "0",
            "--eval-interval", "0", "--ckpt-interval", "0", "--warmup-steps", "1"]  # fmt: skip
RTOL = 1e-5


def _main(kind: str, argv: list[str]) -> dict:
    """``main(kind, argv)`` on this rank, with its exit status and what it printed."""
    import torch.distributed as dist

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(kind, argv)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "rank": dist.get_rank()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


ZB_SP = ["--microbatches", "4", "--sequence-parallel"]  # deferred weight grads + SP re-gathers
LAYOUTS = [
    (1, ["--dp", "1"]),
    (4, ["--dp", "2", "--tp", "2", "--sequence-parallel", "--microbatches", "2"]),
    (4, ["--pp", "2", "--tp", "2", "--schedule", "interleaved", "--microbatches", "2"]),
    (4, ["--pp", "2", "--tp", "2", "--schedule", "zb-h1", *ZB_SP]),
    (4, ["--dp", "2", "--pp", "2", "--microbatches", "2", "--dp-shard", "fsdp"]),
]


def test_layouts_give_the_same_losses(dist_run, tmp_path):
    losses = []
    for i, (world, flags) in enumerate(LAYOUTS):
        out = tmp_path / str(i)
        args = [*GPT_TINY, *flags, "--max-steps", "2", "--out", str(out)]
        results = dist_run(world, _main, "gpt", args, timeout=180)
        assert [r["code"] for r in results] == [0] * world, results[0]["err"]
        losses.append([r["loss"] for r in _metrics(out) if "loss" in r])
    for flags, got in zip(LAYOUTS[1:], losses[1:]):
        assert got == pytest.approx(losses[0], rel=RTOL), (flags, got, losses[0])
    assert len(losses[0]) == 2 and losses[0][1] < losses[0][0]


LSTM_TINY = ["--n-layers", "2", "--embed-dim", "16", "--hidden-size", "16", "--seq-len", "16",
             "--data-bytes", "200000", "--batch-size", "8", "--eval-batches", "1",
             "--sample-tokens", "0", "--no-progress", "--no-plot", "--log-interval", "0",
             "--eval-interval", "0", "--ckpt-interval", "0", "--warmup-steps", "1"]  # fmt: skip


def test_lstm_layouts_and_checkpoint(dist_run, tmp_path):
    """The stacked LSTM trained 2 steps at (1, 1, 1) and at (1, 2, 2) (1F1B, ParallelLSTM over
    tp) gives the same losses; its checkpoint (gate-blocked LSTM weights saved as (4, H, *))
    evaluated at (1, 1, 4) and (1, 1, 1) gives the same validation loss."""
    runs = {}
    for name, world, flags in (("one", 1, []), ("pp2tp2", 4, ["--pp", "2", "--tp", "2"])):
        out = tmp_path / name
        args = [*LSTM_TINY, *flags, "--max-steps", "2", "--out", str(out)]
        results = dist_run(world, _main, "lstm", args, timeout=180)
        assert [r["code"] for r in results] == [0] * world, results[0]["err"]
        runs[name] = [r["loss"] for r in _metrics(out) if "loss" in r]
    assert len(runs["one"]) == 2 and runs["one"][1] < runs["one"][0]
    assert runs["pp2tp2"] == pytest.approx(runs["one"], rel=RTOL)
    saved = json.loads((tmp_path / "pp2tp2" / "summary.json").read_text())["eval"]["val_loss"]
    ckpt = str(tmp_path / "pp2tp2" / "checkpoints")
    for world, flags in ((4, ["--tp", "4"]), (1, [])):
        out = tmp_path / f"eval{world}"
        args = [*LSTM_TINY, *flags, "--resume", ckpt, "--eval-only", "--out", str(out)]
        results = dist_run(world, _main, "lstm", args, timeout=180)
        assert results[0]["code"] == 0, results[0]["err"]
        again = json.loads((out / "summary.json").read_text())["eval"]["val_loss"]
        assert again == pytest.approx(saved, rel=RTOL), (flags, again, saved)


CNN_TINY = ["--width", "8", "--num-stages", "2", "--blocks-per-stage", "1", "--batch-size", "32",
            "--no-progress", "--no-plot", "--log-interval", "0", "--eval-interval", "0",
            "--ckpt-interval", "0"]  # fmt: skip


def test_cnn_checkpoint_across_layouts(dist_run, tmp_path):
    train = dist_run(4, _main, "cnn", [*CNN_TINY, "--dp", "2", "--tp", "2", "--max-steps", "6",
                                       "--out", str(tmp_path / "a")], timeout=180)  # fmt: skip
    assert train[0]["code"] == 0, train[0]["err"]
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())["eval"]
    ckpt = str(tmp_path / "a" / "checkpoints")
    evals = dist_run(2, _main, "cnn", [*CNN_TINY, "--pp", "2", "--resume", ckpt, "--eval-only",
                                       "--out", str(tmp_path / "b")], timeout=180)  # fmt: skip
    assert evals[0]["code"] == 0, evals[0]["err"]
    again = json.loads((tmp_path / "b" / "summary.json").read_text())["eval"]
    assert again["test_accuracy"] == saved["test_accuracy"]
    assert again["test_loss"] == pytest.approx(saved["test_loss"], rel=RTOL)


def _errors(cases: list[tuple[str, list[str]]]) -> list[dict]:
    return [_main(kind, argv) for kind, argv in cases]


def test_bad_input_one_line_on_rank_0(dist_run, tmp_path):
    good = tmp_path / "good"
    made = dist_run(
        2, _main, "gpt", [*GPT_TINY, "--tp", "2", "--max-steps", "1", "--out", str(good)]
    )
    assert made[0]["code"] == 0, made[0]["err"]
    ckpt = good / "checkpoints" / "step_00000001"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    for f in corrupt.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated data files
    garbled = tmp_path / "garbled"
    shutil.copytree(ckpt, garbled)
    (garbled / ".metadata").write_bytes(b"not a pickle")
    cases = {
        "layout vs world": ("gpt", [*GPT_TINY, "--tp", "4"]),
        "layout vs model": ("gpt", [*GPT_TINY, "--tp", "2", "--n-heads", "3", "--embed-dim", "96"]),
        "pipeline too deep": (
            "gpt",
            [
                *GPT_TINY,
                "--pp",
                "2",
                "--chunks",
                "3",
                "--schedule",
                "interleaved",
                "--microbatches",
                "2",
            ],
        ),  # fmt: skip
        "bad schedule": ("gpt", [*GPT_TINY, "--pp", "2", "--schedule", "zigzag"]),
        "missing checkpoint": ("gpt", [*GPT_TINY, "--tp", "2", "--resume", str(tmp_path / "no")]),
        "nothing to resume": ("gpt", [*GPT_TINY, "--tp", "2", "--resume", "--out", str(tmp_path)]),
        "other model": ("gpt", [*GPT_TINY, "--tp", "2", "--n-layers", "3", "--resume", str(ckpt)]),
        "other task": ("cnn", [*CNN_TINY, "--tp", "2", "--resume", str(ckpt)]),
        "corrupt data": (
            "gpt",
            [*GPT_TINY, "--tp", "2", "--resume", str(corrupt), "--out", str(tmp_path / "c")],
        ),  # fmt: skip
        "corrupt metadata": (
            "gpt",
            [*GPT_TINY, "--tp", "2", "--resume", str(garbled), "--out", str(tmp_path / "d")],
        ),  # fmt: skip
    }
    expected = {
        "layout vs world": "needs 4 processes, but 2 were launched",
        "layout vs model": "n_heads=3 is not divisible by --tp 2",
        "pipeline too deep": "cannot fill 6 pipeline stages",
        "bad schedule": "--schedule='zigzag'",
        "missing checkpoint": "no checkpoint at",
        "nothing to resume": "nothing to resume",
        "other model": "n_layers=2 (here 3)",
        "other task": "holds a gpt model, this run trains a cnn",
        "corrupt data": "corrupt checkpoint",
        "corrupt metadata": "cannot read .metadata",
    }
    results = dist_run(2, _errors, list(cases.values()), timeout=120)
    for i, name in enumerate(cases):
        r0, r1 = results[0][i], results[1][i]
        assert r0["code"] == 1 and r1["code"] == 1, (name, r0, r1)
        lines = r0["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, r0["err"])
        assert expected[name] in lines[0], (name, lines[0])
        assert r1["err"] == "", (name, r1["err"])


def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "scripts" / "train_gpt.py"), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_torchrun_train_then_corrupt_resume(tmp_path):
    out = tmp_path / "run"
    args = [a for a in GPT_TINY if a != "--no-plot"]
    done = _torchrun(4, [*args, "--pp", "2", "--tp", "2", "--max-steps", "4", "--out", str(out)],
                     tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: 4 steps" in done.stdout and "layout dp=1 pp=2 tp=2" in done.stdout
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and len(summary["peak_memory_bytes"]) == 4
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    for f in (out / "checkpoints" / "step_00000004").glob("*.distcp"):
        f.write_bytes(b"")  # the data is gone
    failed = _torchrun(2, [*args, "--tp", "2", "--resume", "--out", str(out)], tmp_path)
    assert failed.returncode != 0
    text = failed.stdout + failed.stderr
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "corrupt checkpoint" in errors[0], text
    # the only traceback is torchrun's own report of the failed ranks, none from the script
    assert 'train_gpt.py", line' not in text and "training/" not in text, text
    # every rank failed with status 1 (none stopped by the launcher's SIGTERM, none aborted)
    assert text.count("exitcode  : 1 ") == 2 and "Signal" not in text, text


# ---------------------------------------------------------------------------------------------
# A pipeline rank materializes only its own stages
# ---------------------------------------------------------------------------------------------
_GPT_SMALL = dict(vocab_size=256, n_layers=4, n_heads=2, embed_dim=32, max_seq_len=16)


def _build_small_gpt():
    from triton_parallel_layers.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**_GPT_SMALL), seed=3)


def _engine_params(pp: int) -> dict:
    import torch

    from triton_parallel_layers.models.gpt import GPT_TP_PLAN
    from triton_parallel_layers.parallel_layers import ParallelDims
    from triton_parallel_layers.training.config import ParallelConfig
    from triton_parallel_layers.training.engine import build_engine

    engine = build_engine(_build_small_gpt, GPT_TP_PLAN, ParallelDims(pp=pp), ParallelConfig(pp=pp))
    local = {id(p) for s in engine.stages for p in s.parameters()}
    materialized = {id(p): p for p in engine.model.parameters() if not p.is_meta}
    ref = _build_small_gpt()  # the single-device model, initialized on the CPU
    ref_params = dict(ref.named_parameters())
    return {
        "only_local": set(materialized) == local,
        "bytes": sum(p.numel() * p.element_size() for p in materialized.values()),
        "total_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
        "equal": all(torch.equal(p.param, ref_params[p.name]) for p in engine.params),
        "names": sorted(p.name for p in engine.params),
    }


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_rank_materializes_only_its_stages(dist_run, pp):
    """build_engine at pp = 2 and 4: each rank's non-meta parameters are exactly its stages'
    (a tied embedding on both ends once per holder, none on the middle ranks), their values
    are the single-device model's, and together the ranks hold every parameter."""
    results = dist_run(pp, _engine_params, pp)
    total = results[0]["total_bytes"]
    for r in results:
        assert r["only_local"] and r["equal"]
        assert r["bytes"] < total / pp * 1.7  # ~1/pp: no rank holds the whole model
    names = set().union(*(r["names"] for r in results))
    ref_names = set(dict(_build_small_gpt().named_parameters()))
    assert names == ref_names
    print(f"\nparameter bytes per rank at pp={pp}: {[r['bytes'] for r in results]} of {total}")
