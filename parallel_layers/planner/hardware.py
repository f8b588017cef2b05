"""Hardware descriptions for the planner: compute peaks, memory, and the links between GPUs.

A :class:`HardwareSpec` is what the cost model needs of a machine: the dense matmul peak per dtype
and the share of it large GEMMs reach, the memory bandwidth (for the memory-bound operations
between the GEMMs), the memory per device, and two alpha-beta links: the one inside a node
(NVLink) and the one between nodes (the network, per GPU). Communication time of ``n`` bytes over a
link is ``alpha + n / beta`` per message step.

Built-in nodes (:data:`HARDWARE`), from the vendors' published specifications, for planning
machines you do not have:

============  ======================  =====================================  ==========================
name          peak dense bf16/fp32    memory, bandwidth                       links (per GPU, one way)
============  ======================  =====================================  ==========================
``a100``      312 / 19.5 TFLOP/s      80 GB HBM2e, 2.0 TB/s                  NVLink3 300 GB/s; HDR IB 25 GB/s
``h100``      989 / 67 TFLOP/s        80 GB HBM3, 3.35 TB/s                  NVLink4 450 GB/s; NDR IB 50 GB/s
``h200``      989 / 67 TFLOP/s        141 GB HBM3e, 4.8 TB/s                 NVLink4 450 GB/s; NDR IB 50 GB/s
============  ======================  =====================================  ==========================

(8 GPUs a node; NVLink's bandwidth is half the "bidirectional" figure vendors quote; one 200/400
Gb/s network adapter per GPU.) The achievable shares (``matmul_efficiency``,
``memory_efficiency``) are not vendor figures: they are the usual fractions large bf16 GEMMs and
streaming kernels reach on these parts, and the first thing to replace with a measurement
(:func:`~triton_parallel_layers.parallel_layers.planner.profile_hardware`) when you have the
machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from triton_parallel_layers.parallel_layers.planner import _json

__all__ = ["HARDWARE", "HardwareSpec", "Link", "get_hardware"]

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class Link:
    """An alpha-beta link: a message step of ``n`` bytes costs ``alpha + n / beta`` seconds."""

    beta: float
    """Bandwidth, bytes per second, per GPU, one direction."""
    alpha: float = 5e-6
    """Latency per message step, seconds."""

    def time(self, nbytes: float, steps: int = 1) -> float:
        """Seconds for ``steps`` message steps moving ``nbytes`` in all."""
        return steps * self.alpha + nbytes / self.beta


@dataclass(frozen=True)
class HardwareSpec:
    """One kind of machine: devices, their compute and memory, and the links between them."""

    name: str
    """A short name (``"a100"``, ``"cpu-gloo"``, ...)."""
    gpus_per_node: int
    """Devices that share the fast intra-node link."""
    peak_flops: dict[str, float]
    """Dense matmul peak per dtype (``"bf16"``, ``"fp16"``, ``"fp32"``), FLOP/s per device."""
    memory_bytes: float
    """Memory per device, bytes."""
    memory_bandwidth: float
    """Device memory bandwidth, bytes per second."""
    intra_node: Link
    """The link between devices of one node."""
    inter_node: Link
    """The link between nodes, per device."""
    matmul_efficiency: float = 0.8
    """Share of ``peak_flops`` large GEMMs reach."""
    memory_efficiency: float = 0.8
    """Share of ``memory_bandwidth`` streaming (element-wise, norm, softmax) kernels reach."""
    source: str = "published specifications"
    """Where the figures come from: specifications, or a measurement (with the machine named)."""
    measured: dict = field(default_factory=dict)
    """Raw measurements behind a measured spec (GEMM rates, per-collective alpha-beta fits)."""

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node={self.gpus_per_node}: expected >= 1")
        for what in ("matmul_efficiency", "memory_efficiency"):
            value = getattr(self, what)
            if not 0 < value <= 1:
                raise ValueError(f"{what}={value}: expected a share in (0, 1]")
        if not self.peak_flops:
            raise ValueError("peak_flops is empty: give at least one dtype's matmul peak")

    def flops(self, dtype: str) -> float:
        """The FLOP/s large GEMMs reach in ``dtype``."""
        if dtype not in self.peak_flops:
            raise ValueError(
                f"{self.name}: no matmul peak for dtype {dtype!r}; known: {sorted(self.peak_flops)}"
            )
        return self.peak_flops[dtype] * self.matmul_efficiency

    def link(self, span: int) -> Link:
        """The link a group uses whose ranks lie within ``span`` consecutive global ranks: the
        intra-node link when that fits in one node, else the network."""
        return self.intra_node if span <= self.gpus_per_node else self.inter_node

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        return _json.dump(self, path)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> HardwareSpec:
        data = _json.load(text_or_path)
        data["intra_node"] = Link(**data["intra_node"])
        data["inter_node"] = Link(**data["inter_node"])
        return cls(**data)

    def with_nodes(self, **changes) -> HardwareSpec:
        """A copy with fields replaced (``spec.with_nodes(inter_node=Link(100 * GB))``)."""
        return replace(self, **changes)


_NVLINK3 = Link(beta=300 * GB, alpha=5e-6)
_NVLINK4 = Link(beta=450 * GB, alpha=5e-6)
_HDR_IB = Link(beta=25 * GB, alpha=10e-6)
_NDR_IB = Link(beta=50 * GB, alpha=10e-6)

HARDWARE: dict[str, HardwareSpec] = {
    "a100": HardwareSpec(
        name="a100",
        gpus_per_node=8,
        peak_flops={"bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "fp32": 19.5 * TFLOPS},
        memory_bytes=80 * GB,
        memory_bandwidth=2.039e12,
        intra_node=_NVLINK3,
        inter_node=_HDR_IB,
        source="NVIDIA A100 80GB SXM datasheet; DGX A100 (8 GPUs, NVLink3, 8x HDR 200 Gb/s)",
    ),
    "h100": HardwareSpec(
        name="h100",
        gpus_per_node=8,
        peak_flops={"bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS, "fp32": 67 * TFLOPS},
        memory_bytes=80 * GB,
        memory_bandwidth=3.35e12,
        intra_node=_NVLINK4,
        inter_node=_NDR_IB,
        source="NVIDIA H100 SXM datasheet; DGX H100 (8 GPUs, NVLink4, 8x NDR 400 Gb/s)",
    ),
    "h200": HardwareSpec(
        name="h200",
        gpus_per_node=8,
        peak_flops={"bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS, "fp32": 67 * TFLOPS},
        memory_bytes=141 * GB,
        memory_bandwidth=4.8e12,
        intra_node=_NVLINK4,
        inter_node=_NDR_IB,
        source="NVIDIA H200 SXM datasheet; HGX H200 (8 GPUs, NVLink4, 8x NDR 400 Gb/s)",
    ),
}


def get_hardware(name_or_path: str | HardwareSpec) -> HardwareSpec:
    """A built-in spec by name (``a100``, ``h100``, ``h200``), or one saved as JSON."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    key = str(name_or_path).lower()
    if key in HARDWARE:
        return HARDWARE[key]
    if Path(key).is_file() or Path(str(name_or_path)).is_file():
        return HardwareSpec.from_json(Path(str(name_or_path)))
    raise ValueError(
        f"hardware {name_or_path!r}: expected one of {sorted(HARDWARE)} or a JSON file saved by "
        "profile_hardware()"
    )
