"""Test set-up shared by every test file.

Kernel tests run the Triton kernels; on a machine without CUDA they do so under Triton's
interpreter, which must be switched on before ``triton`` is first imported, so it is set here,
at the top of the first file pytest loads. Everything else (layers, models, schedules) runs the
fast torch reference path on the CPU unless a test forces the kernel with the ``triton`` fixture.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Layer and model tests take the torch reference path of the kernels on CPU; kernel tests
    # opt back in with the ``triton`` fixture. Worker processes inherit this.
    os.environ.setdefault("TPL_KERNEL_BACKEND", "ref")

import pytest  # noqa: E402

from triton_parallel_layers.kernels import force_backend, interpreter_enabled  # noqa: E402
from triton_parallel_layers.parallel_layers.testing import (  # noqa: E402
    BackendUnavailable,
    WorkerPools,
)


@pytest.fixture
def triton(request):
    """Run the test body on the Triton kernels (compiled on CUDA, interpreted on CPU).

    The CPU kernel tests need the interpreter, which conftest switches on only where there is no
    CUDA; on a GPU machine they skip and the ``gpu``-marked tests check the compiled kernels.
    """
    if "gpu" not in request.keywords and not interpreter_enabled():
        pytest.skip(INTERPRETER_NEEDED)
    with force_backend("triton"):
        yield


INTERPRETER_NEEDED = (
    "CPU kernel test: needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported, "
    "which conftest sets only on machines without CUDA); on GPU run the gpu-marked tests"
)


@pytest.fixture(scope="session")
def dist_run():
    """``dist_run(world_size, fn, *args, timeout=120, **kwargs)``: run ``fn`` on every rank of a
    gloo group of ``world_size`` CPU processes and return the ranks' results.

    The worker processes are started once per world size and reused by every test; ``fn`` must
    be a module-level function. A rank that raises fails the test with its traceback; a rank that
    hangs fails it at ``timeout`` seconds, and the pool is restarted for the next test.

    ``TPL_TEST_BACKEND=nccl`` runs the same tests on NCCL, rank ``r`` on GPU ``r``; a test that
    needs more ranks than the machine has GPUs skips, naming both counts.
    """
    pools = WorkerPools()

    def run(world_size, fn, *args, **kwargs):
        try:
            return pools.run(world_size, fn, *args, **kwargs)
        except BackendUnavailable as exc:
            pytest.skip(str(exc))

    yield run
    pools.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
