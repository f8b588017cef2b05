"""``ParallelDims``: the (dp, pp, tp) layout, its DeviceMesh and the groups layers need.

The mesh is ``init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))``:
TP innermost, so the ranks of a TP group are neighbours (on one node, over NVLink), DP next, PP
outermost. For 8 ranks at (dp, pp, tp) = (2, 2, 2)::

    pp=0: dp=0 -> ranks [0, 1]   dp=1 -> ranks [2, 3]
    pp=1: dp=0 -> ranks [4, 5]   dp=1 -> ranks [6, 7]

One object per process, built once and passed to whatever needs a group: no module-level process
group state anywhere in the package.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from triton_parallel_layers.parallel_layers.utils import check_positive_int

__all__ = ["ParallelDims", "env_world_size", "free_port", "init_distributed"]


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str | None = None, timeout: float | None = None) -> bool:
    """Join torchrun's default process group, the one place the package initializes it.

    Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/
    ``MASTER_PORT``); run without torchrun it makes a world of one on a free local port. On CUDA
    (``device_type`` ``"cuda"``, or ``None`` with a GPU present) the backend is nccl, this process
    takes GPU ``LOCAL_RANK``, and the group is bound to that device (``device_id``: eager NCCL
    communicator set-up, and no guessing which GPU a rank uses); on CPU it is gloo. ``timeout``
    (seconds) bounds every collective; ``None`` keeps PyTorch's default. Under ``torchrun`` each
    restart attempt gets keys of its own in the launcher's store (see :func:`_attempt_store`).

    Returns ``True`` if this call created the group (the caller then destroys it), ``False`` if
    one existed already (tests, or a user who initialized it).
    """
    if dist.is_initialized():
        return False
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:  # plain `python script.py`: a world of one
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        )  # fmt: skip
    kwargs: dict = {}
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        kwargs.update(_attempt_store(kwargs.get("timeout")))
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    return True


def _attempt_store(timeout: datetime.timedelta | None) -> dict:
    """``init_process_group`` arguments that join torchrun's agent store under a prefix of its
    own per attempt (``TORCHELASTIC_RESTART_COUNT``).

    The agent keeps one store across the restarts of ``--max-restarts``; without the prefix a
    restarted rank can read the address a rank of the failed attempt published, and gloo's
    connectFullMesh fails with "Connection refused" (or waits out its timeout).
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or datetime.timedelta(minutes=10),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {
        "store": dist.PrefixStore(f"tpl/attempt{attempt}/", store),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def env_world_size() -> int:
    """The number of processes: the default group's size, else torchrun's ``WORLD_SIZE`` (1
    without torchrun). Read locally, with no communication."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ParallelDims:
    """The parallel layout of a job, validated against the world size, with its mesh built.

    Under ``torchrun`` it reads the usual environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) and initializes the default process group if nobody has:
    nccl for CUDA (one GPU per local rank), gloo for CPU. In a process where the default group
    already exists (tests), it uses that group.

    Example::

        dims = ParallelDims(dp=1, pp=2, tp=2)          # 4 processes
        layer = ColumnParallelLinear(512, 2048, tp_group=dims.tp_group)
    """

    dp: int = 1
    """Data-parallel degree: model replicas (or FSDP shards) each fed its own batches."""
    pp: int = 1
    """Pipeline-parallel degree: stages the layer sequence is split into."""
    tp: int = 1
    """Tensor-parallel degree: ranks each layer's weights are sharded over (innermost axis)."""
    device_type: str | None = None
    """``"cuda"`` or ``"cpu"``; ``None`` picks cuda when it is available."""
    mesh: DeviceMesh = field(init=False, repr=False)
    """The ``("pp", "dp", "tp")`` DeviceMesh over all ranks."""

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp"):
            check_positive_int(name, getattr(self, name))
        if self.device_type is None:
            self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type={self.device_type!r}: expected 'cuda' or 'cpu'")
        world_size = env_world_size()
        if self.dp * self.pp * self.tp != world_size:
            raise ValueError(
                f"dp*pp*tp = {self.dp}*{self.pp}*{self.tp} = {self.dp * self.pp * self.tp} does "
                f"not match the world size {world_size}: launch dp*pp*tp processes, or pick "
                f"degrees whose product is {world_size}"
            )
        if self.device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_distributed(self.device_type)
        self.mesh = init_device_mesh(
            self.device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp")
        )

    # -- what layers and schedules need ----------------------------------------------------------
    @property
    def backend(self) -> str:
        """nccl for CUDA, gloo for CPU."""
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def device(self) -> torch.device:
        """This rank's device: its local GPU, or the CPU."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The 1-D ``dp`` sub-mesh, for ``fully_shard`` or DDP's ``device_mesh``."""
        return self.mesh["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self.mesh["pp"]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def pp_peer(self, stage: int) -> int:
        """The global rank of pipeline stage ``stage`` in this rank's (dp, tp) position."""
        return dist.get_process_group_ranks(self.pp_group)[stage % self.pp]

    def __str__(self) -> str:
        return f"ParallelDims(dp={self.dp}, pp={self.pp}, tp={self.tp}, {self.device_type})"
