"""The machine a benchmark ran on, for its JSON: every result names where it was measured."""

from __future__ import annotations

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
