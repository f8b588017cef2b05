"""``python -m triton_parallel_layers.info``: what to paste into a bug report.

Prints the versions (this package, Python, torch, triton, CUDA and NCCL when present), the devices,
the kernel backend in force and the path each kernel takes for CPU and CUDA tensors, and whether
Triton's interpreter is on. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import torch

from triton_parallel_layers import __version__
from triton_parallel_layers.kernels._dispatch import (
    interpreter_enabled,
    interpreter_problem,
    kernel_backend,
)
from triton_parallel_layers.kernels._triton import HAS_TRITON, triton

KERNELS = ("flash_attention", "conv2d_bias_relu", "matmul", "all_gather_matmul",
           "matmul_reduce_scatter")  # fmt: skip


def _path_for(device: str) -> str:
    """The path a kernel called on ``device`` tensors takes now (see kernels._dispatch)."""
    backend = kernel_backend()
    if backend == "ref":
        return "torch reference (forced: ref)"
    if not HAS_TRITON:
        return "torch reference (Triton not installed)"
    if device == "cuda":
        return "Triton, compiled"
    if interpreter_enabled():
        if interpreter_problem() is not None:
            return "error: this Triton's interpreter cannot run with this NumPy (see kernels._dispatch)"
        return "Triton, interpreted (TRITON_INTERPRET=1)"
    if backend == "triton":
        return "error: the Triton backend is forced but CPU tensors need TRITON_INTERPRET=1"
    return "torch reference"


def collect() -> dict[str, Any]:
    """The report as a dict."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "triton_parallel_layers": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__ if HAS_TRITON else None,
        "cuda_runtime": torch.version.cuda,
        "nccl": None,
        "distributed_backends": [
            name
            for name, ok in (
                (
                    "gloo",
                    torch.distributed.is_available() and torch.distributed.is_gloo_available(),
                ),
                (
                    "nccl",
                    torch.distributed.is_available() and torch.distributed.is_nccl_available(),
                ),
            )
            if ok
        ],
        "cpu_threads": torch.get_num_threads(),
        "gpus": [],
        "TPL_KERNEL_BACKEND": os.environ.get("TPL_KERNEL_BACKEND"),
        "kernel_backend": kernel_backend(),
        "triton_interpreter": interpreter_enabled(),
        "kernel_path": {"cpu": _path_for("cpu"), "cuda": _path_for("cuda") if cuda else None},
    }
    if cuda:
        if torch.distributed.is_nccl_available():
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"sm_{p.major}{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return info


def format_report(info: dict[str, Any]) -> str:
    """The report as aligned ``key: value`` lines."""
    lines = []
    for key, value in info.items():
        if key == "gpus":
            value = (
                "; ".join(
                    f"{g['index']}: {g['name']} ({g['capability']}, {g['memory_gib']} GiB)"
                    for g in value
                )  # fmt: skip
                or "none"
            )
        elif key == "kernel_path":
            cuda = value["cuda"] or "(no CUDA device)"
            value = f"CPU tensors -> {value['cpu']}; CUDA tensors -> {cuda}"
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        lines.append(f"{key + ':':<24}{value if value is not None else '-'}")
    lines.append(f"{'kernels:':<24}{', '.join(KERNELS)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triton_parallel_layers.info",
        description="Versions, devices and kernel backends: paste the output into a bug report.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
