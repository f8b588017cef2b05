"""The machine a benchmark ran on, for its JSON: every result names where it was measured; and
:func:`write_results`, which writes a benchmark's JSON and Markdown results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_name() -> str:
    """``"<cpu model> (<n> cores)"``."""
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def machine_name() -> str:
    """``"<n> x <GPU name>"`` where CUDA is available, else :func:`cpu_name`."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return cpu_name()


def write_results(out: Path, stem: str, data: object, markdown: str | None = None) -> None:
    """Write ``data`` to ``<out>/<stem>.json`` (indented, one value per line) and, when given,
    ``markdown`` to ``<out>/<stem>.md``, creating ``out`` if needed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    if markdown is not None:
        (out / f"{stem}.md").write_text(markdown)
