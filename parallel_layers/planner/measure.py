"""``profile_hardware``: measure this machine for the planner.

Run on every rank of the default process group (a collective). Measures, on the current device:

* the GEMM rate per dtype (square matmuls, median of a few);
* the memory bandwidth (a large copy);
* the optimizer's time per parameter (an AdamW step over 4 M parameters);
* for each collective (all-reduce, all-gather, reduce-scatter) and for point-to-point, at each
  group size (2, 4, ... up to the world), its time at two message sizes, fitted to
  ``alpha + bytes / beta`` (``bytes``: the full tensor);
* the device memory (or, on CPU, the machine's memory shared by the local ranks).

and returns a :class:`~.hardware.HardwareSpec` whose ``measured`` field holds the fits, which
:func:`~.cost.estimate` then uses instead of the ring model. ``spec.to_json(path)`` saves it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from triton_parallel_layers.kernels import collectives
from triton_parallel_layers.parallel_layers.planner.hardware import HardwareSpec, Link

__all__ = ["profile_hardware"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _fit(small: tuple[float, float], large: tuple[float, float]) -> dict[str, float]:
    """``alpha + n / beta`` through two ``(bytes, seconds)`` points (alpha >= 0)."""
    (n1, t1), (n2, t2) = small, large
    slope = max((t2 - t1) / (n2 - n1), 1e-15)
    alpha = max(t1 - slope * n1, 0.0)
    return {"alpha": alpha, "beta": 1.0 / slope}


def profile_hardware(
    *,
    name: str | None = None,
    dtypes: tuple[str, ...] | None = None,
    gemm_size: int | None = None,
    message_bytes: tuple[int, int] = (1 << 12, 1 << 22),
    repeats: int = 5,
) -> HardwareSpec:
    """Measure this machine (a collective over the default group when one exists).

    Args:
        name: the spec's name; default ``"<device>-<backend>"``.
        dtypes: GEMM dtypes to time; default ``fp32`` on CPU, ``bf16`` and ``fp32`` on CUDA.
        gemm_size: side of the square GEMMs; default 512 on CPU, 8192 on CUDA.
        message_bytes: the two message sizes the collectives are fitted through.
        repeats: timed repetitions per point (the median is kept).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtypes = dtypes or (("bf16", "fp32") if cuda else ("fp32",))
    n = gemm_size or (8192 if cuda else 512)
    peak = {}
    for dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=_DTYPES[dt])
        b = torch.randn(n, n, device=device, dtype=_DTYPES[dt])
        peak[dt] = 2 * n**3 / _median_time(lambda a=a, b=b: a @ b, device, repeats)
    src = torch.empty(1 << 24, device=device)  # 64 MiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), device, repeats)

    # AdamW's step (torch's default implementation for the device) per parameter: on a GPU
    # about the 28 bytes a parameter it streams; on a CPU several passes more
    params = [torch.nn.Parameter(torch.zeros(1 << 20, device=device)) for _ in range(4)]
    for p in params:
        p.grad = torch.ones_like(p)
    adam = torch.optim.AdamW(params, lr=1e-3)
    step_s = _median_time(adam.step, device, repeats) / sum(p.numel() for p in params)
    measured: dict = {"gemm_flops": dict(peak), "copy_bandwidth": bandwidth, "collectives": {},
                      "optimizer_s_per_param": step_s}  # fmt: skip
    world = dist.get_world_size() if dist.is_initialized() else 1
    backend = dist.get_backend() if dist.is_initialized() else "none"
    sizes = [s for s in (2, 4, 8, 16, 32, 64) if s <= world]
    if world > 1 and world not in sizes:
        sizes.append(world)
    for size in sizes:
        ranks = list(range(size))
        group = dist.new_group(ranks) if size < world else dist.group.WORLD
        if dist.get_rank() in ranks:
            fits = _measure_group(group, size, device, message_bytes, repeats)
            for kind, fit in fits.items():
                measured["collectives"].setdefault(kind, {})[str(size)] = fit
        if size < world:
            dist.barrier()
    if cuda:
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = pages / int(os.environ.get("LOCAL_WORLD_SIZE", world))
    measured["memory_bytes"] = float(memory)
    if world > 1:
        # Every rank takes rank 0's measurements, all of them: ranks that planned from their own
        # (noisy) figures could pick different layouts and then wait for each other forever.
        box = [measured]
        dist.broadcast_object_list(box, src=0)
        measured = box[0]
    p2p = measured["collectives"].get("p2p", {}).get("2", {"alpha": 5e-6, "beta": 1e10})
    link = Link(beta=p2p["beta"], alpha=p2p["alpha"])
    return HardwareSpec(
        name=name or f"{device.type}-{backend}",
        gpus_per_node=max(world, 1),
        peak_flops=dict(measured["gemm_flops"]),
        memory_bytes=measured["memory_bytes"],
        memory_bandwidth=measured["copy_bandwidth"],
        intra_node=link,
        inter_node=link,
        matmul_efficiency=1.0,
        memory_efficiency=1.0,
        source=(
            f"measured on {platform.node()} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, {device.type}, backend {backend}, "
            f"{world} rank(s)) by profile_hardware"
        ),
        measured=measured,
    )


def _measure_group(
    group, size: int, device: torch.device, message_bytes: tuple[int, int], repeats: int
) -> dict[str, dict[str, float]]:
    """Fits for each collective and for a point-to-point exchange within ``group``."""
    rank = dist.get_rank(group)
    points: dict[str, list[tuple[float, float]]] = {}
    for nbytes in message_bytes:
        numel = max(nbytes // 4 // size * size, size)
        full = torch.ones(numel, device=device)
        part = torch.ones(numel // size, device=device)

        def all_reduce(full=full):
            collectives.all_reduce(full, group)

        def all_gather(part=part):
            collectives.all_gather(part, group)

        def reduce_scatter(full=full):
            collectives.reduce_scatter(full, group)

        back = full.clone()

        def p2p(full=full, back=back):
            # pairs (0, 1), (2, 3), ...: each rank sends and receives one message
            peer = rank ^ 1 if (rank ^ 1) < size else rank
            collectives.wait_all(collectives.send_recv(full, peer, back, peer, group))

        for kind, fn in (("all_reduce", all_reduce), ("all_gather", all_gather),
                         ("reduce_scatter", reduce_scatter), ("p2p", p2p)):  # fmt: skip
            seconds = _median_time(fn, device, repeats)
            points.setdefault(kind, []).append((numel * 4, seconds))
    return {kind: _fit(*pts) for kind, pts in points.items()}
