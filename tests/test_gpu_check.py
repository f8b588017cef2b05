"""``bench/gpu_check.sh`` in its CPU smoke mode: every part runs and the report is written.

The GPU mode itself needs a GPU; this checks the script (its parts, limits, report after each
part) with every part at smoke size on the CPU, where the GPU tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["tests", "attention", "conv", "matmul", "lstm", "train_step", "train_cli"]


def test_gpu_check_smoke_writes_the_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke"
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == dict.fromkeys(PARTS, "ok"), (
        statuses,
        proc.stdout[-3000:],
        proc.stderr[-3000:],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, part in report["parts"].items():
        assert (tmp_path / part["log"]).is_file(), name
        assert all((tmp_path / a).is_file() for a in part["artifacts"]), name
    assert report["parts"]["train_step"]["artifacts"] == ["train_step_cpu_smoke.json"]
    train = json.loads((tmp_path / "train_step_cpu_smoke.json").read_text())
    eager, compiled = train["results"]
    assert (eager["mode"], compiled["mode"]) == ("eager", "compiled")
    assert abs(eager["first_loss"] - compiled["first_loss"]) <= 1e-5 * abs(eager["first_loss"])
    cli = json.loads((tmp_path / "train_cli" / "summary.json").read_text())
    assert (cli["steps_run"], cli["layout"], cli["backend"]) == (3, "dp=1 pp=1 tp=1", "gloo")
    assert not (tmp_path / "train_cli" / "checkpoints").exists()  # deleted: 1.5 GB at 125m
    markdown = (tmp_path / "gpu_check.md").read_text()
    for name in PARTS:
        assert f"| {name} | ok |" in markdown
    assert "| compiled |" in markdown
    assert "### Training command: gpt-tiny, dp=1 pp=1 tp=1, cpu over gloo, fp32" in markdown
