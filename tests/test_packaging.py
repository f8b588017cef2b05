"""The distribution: one import root, installable anywhere, entry points with a working --help.

* A user's project with its own ``kernels/``, ``models/`` and ``training/`` packages (the first
  also first on ``sys.path``) imports ours and trains a TP=2 GPT step.
* Without Triton (macOS, Windows) the package imports, models train on the torch path, and
  forcing the Triton backend says how to get Triton.
* The wheel installs nothing but ``triton_parallel_layers`` and runs, non-editable, from a fresh
  virtual environment outside the checkout.
* ``--help`` of every script and module entry point.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run as a file by a fresh interpreter: a TP=2 GPT forward/backward on 2 gloo processes, compared
# with the single-device model (same seed) on rank 0. Prints "ok <loss>".
TP2_GPT_STEP = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.multiprocessing as mp

    import triton_parallel_layers as tpl
    from triton_parallel_layers.models.gpt import GPT, GPT_TP_PLAN, GPTConfig
    from triton_parallel_layers.parallel_layers.dims import free_port

    CONFIG = GPTConfig(vocab_size=61, n_layers=2, n_heads=2, embed_dim=32, max_seq_len=16,
                       vocab_pad_multiple=2)


    def step(model, ids, target):
        loss = model.loss(model(ids), target)
        loss.backward()
        return loss.detach()


    def worker(rank, port, expected):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE="2")
        torch.set_num_threads(1)
        dims = tpl.ParallelDims(dp=1, pp=1, tp=2, device_type="cpu")
        torch.manual_seed(0)
        model = tpl.parallelize(GPT(CONFIG), GPT_TP_PLAN, dims, sequence_parallel=True)
        ids, target = batch()
        loss = step(model, ids, target)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.distributed.destroy_process_group()


    def batch():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g)
        return ids[:, :-1].contiguous()[:, :14], ids[:, 1:].contiguous()[:, :14]


    if __name__ == "__main__":
        torch.manual_seed(0)
        expected = step(GPT(CONFIG), *batch())
        mp.spawn(worker, args=(free_port(), expected), nprocs=2)
        print("ok", float(expected), tpl.__file__)
    """
)


def _run(args, cwd, env=None, timeout=240) -> subprocess.CompletedProcess:
    """``args`` in a fresh interpreter in ``cwd``, without this checkout on ``PYTHONPATH``."""
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_no_module_imports_a_subpackage_by_its_bare_folder_name():
    """Every import goes through the one root: ``triton_parallel_layers.kernels``, never ``kernels``
    (which would load a second copy of the module, or someone else's package)."""
    bare = re.compile(r"^\s*(from|import) (kernels|parallel_layers|models|training)\b", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in (
            "triton_parallel_layers",
            "kernels",
            "parallel_layers",
            "models",
            "training",
            "scripts",
            "bench",
            "tests",
        )  # fmt: skip
        for path in sorted((ROOT / folder).rglob("*.py"))
        if bare.search(path.read_text())
    ]
    assert offenders == []


def test_user_folders_named_like_ours_do_not_shadow_the_package(tmp_path):
    for name in ("kernels", "models", "training"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"USERS_OWN = {name!r}\n")
    (tmp_path / "step.py").write_text(
        "import kernels, models, training\n"
        "assert (kernels.USERS_OWN, models.USERS_OWN, training.USERS_OWN) == "
        "('kernels', 'models', 'training')\n" + TP2_GPT_STEP
    )
    # The user's folder is the script's folder (sys.path[0]) and also first on PYTHONPATH.
    out = _ok(_run([sys.executable, "step.py"], tmp_path, env={"PYTHONPATH": str(tmp_path)}))
    assert out.startswith("ok ")
    assert str(tmp_path) not in out.split()[-1]  # ours came from the install, not the user's folder


NO_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None          # `import triton` now raises ImportError
    import torch
    import triton_parallel_layers as tpl
    from triton_parallel_layers.kernels._triton import HAS_TRITON
    from triton_parallel_layers.models.gpt import GPT, GPTConfig
    assert not HAS_TRITON

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, n_layers=1, n_heads=2, embed_dim=32, max_seq_len=8,
                          vocab_pad_multiple=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 32, (4, 9))
    losses = []
    for _ in range(20):
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses

    q = torch.randn(1, 2, 8, 16)
    with tpl.force_backend("triton"):
        try:
            tpl.flash_attention(q, q, q)
        except RuntimeError as e:
            print("error:", e)
    """
)


def test_without_triton_reference_path_and_clear_error(tmp_path):
    out = _ok(
        _run(
            [sys.executable, "-c", NO_TRITON],
            tmp_path,
            env={"TRITON_INTERPRET": "0", "TPL_KERNEL_BACKEND": "auto"},
        )
    )
    assert "error: Triton is not installed" in out and "pip install triton" in out


def _top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {name.split("/")[0] for name in zf.namelist()}


@pytest.mark.slow
def test_wheel_installs_one_root_and_runs_outside_the_checkout(tmp_path):
    """Build the wheel, install it (not editable) into a fresh virtual environment that reuses
    this environment's torch, and run a TP=2 gloo GPT step from a folder that is not the
    checkout."""
    dist = tmp_path / "dist"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", str(dist), str(ROOT)],
            tmp_path,
        )
    )  # fmt: skip
    (wheel,) = dist.glob("triton_parallel_layers-*.whl")
    tops = _top_level_names(wheel)
    assert {t for t in tops if not t.endswith(".dist-info")} == {"triton_parallel_layers"}, tops
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for module in ("kernels/attention.py", "parallel_layers/pipeline/schedules.py",
                   "models/gpt.py", "training/cli.py", "info.py"):  # fmt: skip
        assert f"triton_parallel_layers/{module}" in names

    venv = tmp_path / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
             tmp_path))  # fmt: skip
    python = venv / "bin" / "python"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
             "--no-index", str(wheel)],
            tmp_path,
        )
    )  # fmt: skip
    shown = _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "show", "-f",
                      "triton-parallel-layers"], tmp_path))  # fmt: skip
    files = [line.strip() for line in shown.split("Files:")[1].splitlines() if line.strip()]
    assert files and all(f.startswith("triton_parallel_layers") for f in files), files

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "step.py").write_text(TP2_GPT_STEP)
    out = _ok(_run([str(python), "step.py"], work))
    assert out.startswith("ok ") and str(venv) in out.split()[-1], out


ENTRY_POINTS = [
    ["scripts/train_gpt.py"],
    ["scripts/train_cnn.py"],
    ["scripts/sample_gpt.py"],
    ["scripts/tp_demo.py"],
    ["-m", "triton_parallel_layers.info"],
    ["-m", "triton_parallel_layers.models.cnn"],
    *[[f"bench/{p.name}"] for p in sorted((ROOT / "bench").glob("[!_]*.py"))],
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e[-1])
def test_help_of_every_entry_point(entry):
    proc = _run([sys.executable, *entry, "--help"], ROOT, timeout=120)
    out = _ok(proc)
    assert out.lstrip().startswith("usage:"), out[:200]
    assert "--help" in out
