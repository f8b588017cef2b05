"""The report of ``bench/gpu_check.sh``: one JSON and one Markdown file, rewritten after each part.

``gpu_check.sh`` calls it once at the start and once after every part, so a run cut short (a
part's timeout, a lost machine) still leaves a report of everything that finished::

    python3 bench/gpu_check_report.py start OUT_DIR --mode gpu --parts tests attention ...
    python3 bench/gpu_check_report.py part OUT_DIR attention RC SECONDS LOG [ARTIFACT ...]

``OUT_DIR/gpu_check.json``: the machine and versions, then per part its status (``pending``,
``ok``, ``failed`` with the exit code, ``timeout``), seconds, log file and the result files it
wrote. ``OUT_DIR/gpu_check.md``: the same as a table, plus the training step's tokens/s and MFU
and the training command's losses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
from pathlib import Path

REPORT_JSON, REPORT_MD = "gpu_check.json", "gpu_check.md"
TIMEOUT_CODES = (124, 137)  # timeout(1): the limit hit; 137: killed after it


def _versions() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
        versions["cuda"] = torch.version.cuda
        try:
            versions["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            versions["driver"] = None
    return versions


def status_of(rc: int) -> str:
    if rc == 0:
        return "ok"
    return "timeout" if rc in TIMEOUT_CODES else "failed"


def _train_summary(report: dict, out_dir: Path) -> list[str]:
    """Markdown lines for the training step's JSON, if the part wrote one."""
    part = report["parts"].get("train_step", {})
    for artifact in part.get("artifacts", []):
        path = out_dir / artifact
        if path.suffix != ".json" or not path.is_file():
            continue
        data = json.loads(path.read_text())
        lines = [
            "",
            f"### Training step: GPT {data['model']}, batch {data['batch']} x seq "
            f"{data['shape']['seq_len']}, {data['dtype']}",
            "",
            "| mode | tokens/s | ms/step | TFLOP/s | MFU | warm-up s | first loss |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in data["results"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(
                f"| {r['mode']} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_s_median']:.1f} | "
                f"{r['tflops']:.1f} | {mfu} | {r['warmup_s']:.1f} | {r['first_loss']:.4f} |"
            )
        return lines
    return []


def _cli_summary(report: dict, out_dir: Path) -> list[str]:
    """Markdown lines for the training command's summary.json, if the part wrote one."""
    part = report["parts"].get("train_cli", {})
    path = out_dir / "train_cli" / "summary.json"
    if "train_cli/summary.json" not in part.get("artifacts", []) or not path.is_file():
        return []
    s = json.loads(path.read_text())
    mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a"
    val = s.get("eval", {}).get("val_loss")
    peak = max(s["peak_memory_bytes"])  # one figure per rank
    return [
        "",
        f"### Training command: {s['model']}, {s['layout']}, {s['device']} over {s['backend']}, "
        f"{s['dtype']}",
        "",
        "| steps | first loss | last loss | val loss | tokens/s | MFU | peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {s['steps_run']} | {s['first_loss']:.4f} | {s['last_loss']:.4f} | "
        + (f"{val:.4f}" if val is not None else "n/a")
        + f" | {s['items_per_s']:,.0f} | {mfu} | {peak / 2**30:.2f} GiB |",
    ]


def write(report: dict, out_dir: Path) -> None:
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    v = report["versions"]
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"{report['started']}; {v.get('gpu') or 'no GPU'}; torch {v['torch']}, "
        f"triton {v['triton']}, python {v['python']}"
        + (f", CUDA {v['cuda']}, driver {v['driver']}" if v.get("gpu") else ""),
        "",
        "| part | status | seconds | log | results |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, part in report["parts"].items():
        status = part["status"] + (f" (exit {part['rc']})" if part["status"] == "failed" else "")
        seconds = f"{part['seconds']:.0f}" if part.get("seconds") is not None else ""
        artifacts = ", ".join(part.get("artifacts", []))
        lines.append(f"| {name} | {status} | {seconds} | {part.get('log', '')} | {artifacts} |")
    lines += _train_summary(report, out_dir)
    lines += _cli_summary(report, out_dir)
    (out_dir / REPORT_MD).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="a new report with every part pending")
    start.add_argument("out_dir", type=Path)
    start.add_argument("--mode", required=True, help="gpu or cpu-smoke")
    start.add_argument("--parts", nargs="+", required=True)
    part = sub.add_parser("part", help="record one finished part")
    part.add_argument("out_dir", type=Path)
    part.add_argument("name")
    part.add_argument("rc", type=int)
    part.add_argument("seconds", type=float)
    part.add_argument("log")
    part.add_argument("artifacts", nargs="*", help="result files, relative to out_dir")
    args = p.parse_args(argv)

    if args.command == "start":
        report = {
            "mode": args.mode,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "parts": {name: {"status": "pending"} for name in args.parts},
        }
    else:
        report = json.loads((args.out_dir / REPORT_JSON).read_text())
        existing = [a for a in args.artifacts if (args.out_dir / a).is_file()]
        report["parts"][args.name] = {
            "status": status_of(args.rc),
            "rc": args.rc,
            "seconds": args.seconds,
            "log": args.log,
            "artifacts": existing,
        }
    write(report, args.out_dir)


if __name__ == "__main__":
    main()
