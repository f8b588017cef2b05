"""``bench/aot_compile.py``: the kernels compile for the GPU without spills or shared memory
over the limit, and the tool catches what it is there to catch.

The tool runs in a fresh process: this test session has Triton's interpreter switched on
(conftest), and the kernels must be compiled for real. The full scope (every kernel, dtype and
configuration for sm_80 and sm_90, ~20 minutes on 2 cores) is the documented command
``python bench/aot_compile.py``; here the CI scope (``--small``) compiles each kernel's fixed
tile once, and the fp32 launch cases that used to spill are compiled with every tile their
autotuner can pick, in the precision they spilled in. The stored full tables
(``bench/results/aot_compile_triton*.json``) must list exactly the combinations of the current
tile lists, fp32 in both precisions (IEEE and TF32 products), all passing.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
# The tool needs the real Triton (its compiler and the ptxas in its wheel), not the stand-ins.
if not Path(__import__("triton").__file__).with_name("backends").joinpath("nvidia").is_dir():
    pytest.skip("this Triton has no NVIDIA backend to compile with", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "bench" / "aot_compile.py"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


@pytest.fixture(scope="module")
def listed() -> list[str]:
    """``aot_compile.py --list``: one line per combination the full run compiles."""
    proc = _run(str(TOOL), "--list")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()[:-1]  # the last line is the count


def _label(r: dict) -> str:
    """A result row named as ``aot_compile.py --list`` names the combination."""
    dtype = r["dtype"] + (f"/{r['precision']}" if r["precision"] else "")
    fixed = " (fixed tile)" if r["fixed"] else ""
    return (
        f"{r['kernel']} {r['target']} {dtype} {r['case']} {r['config']} "
        f"w{r['num_warps']} s{r['num_stages']}{fixed}"
    )


def _failing(rows: list[dict]) -> list[str]:
    return [f"{_label(r)}: {r['status']} {r['error'] or ''}" for r in rows if r["status"] != "ok"]


def test_small_scope_compiles_without_spills_within_shared_memory(tmp_path):
    out = tmp_path / "aot"
    proc = _run(str(TOOL), "--small", "--targets", "sm_90", "--dtypes", "bf16",
                "--out", str(out), "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert tmp_path.joinpath("aot.json").exists(), proc.stderr[-3000:]
    report = json.loads(tmp_path.joinpath("aot.json").read_text())
    rows = report["results"]
    # every kernel of the package, each at its fixed tile (the GEMM: its first candidate)
    assert {r["kernel"] for r in rows} == {
        "attn_fwd", "attn_preprocess", "attn_dkdv", "attn_dq", "conv_fwd", "matmul",
    }  # fmt: skip
    failing = _failing(rows)
    assert not failing, "\n".join(failing)
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == 0
        assert 0 < r["shared"] <= r["shared_limit"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["summary"]["all"]["ok"] == len(rows)
    md = tmp_path.joinpath("aot.md").read_text()
    assert f"{len(rows)} combinations: 0 compile errors" in md
    assert report["triton"] in md


def test_attention_compiles_in_fp32_when_inductor_types_its_scales_fp64(tmp_path):
    """Inductor types a Python float argument fp64 when ``torch.compile`` puts a Triton kernel in
    its graph (Triton's own launcher: fp32). Uncast, the softmax scale promoted the forward's
    accumulator to fp64 (a compile error in ``tl.dot``) and the backward's arithmetic to fp64
    (seen on an H200: the compiled GPT training step failed). Each kernel must compile with
    fp64 float arguments and do no fp64 arithmetic."""
    out = tmp_path / "aot"
    proc = _run(str(TOOL), "--small", "--kernels", "attn_fwd,attn_dkdv,attn_dq",
                "--targets", "sm_90", "--dtypes", "bf16,fp32", "--precisions", "ieee",
                "--float-args", "fp64", "--out", str(out), "--no-cache")  # fmt: skip
    assert out.with_suffix(".json").exists(), proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["results"]
    assert report["float_args"] == "fp64"
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in ("attn_fwd", "attn_dkdv", "attn_dq") for d in ("bf16", "fp32")
    }
    failing = _failing(rows)
    assert not failing, "\n".join(failing)
    assert all(r["fp64_ops"] == 0 for r in rows)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fp32_cases_that_spilled_compile_without_spills(tmp_path):
    """fp32 with exact products at head dim 128 (attention forward, dQ and the delta
    preprocessing), the 7x7 RGB stem on NCHW input and the GEMM with its bias: every tile the
    autotuner can pick spilled on sm_90 until the fp32 tile lists (12 compiles; the conv's fixed
    tile on the NCHW stem also spilled with exact products, 4 B with Triton 3.6)."""
    out = tmp_path / "aot_fp32"
    proc = _run(str(TOOL), "--targets", "sm_90", "--dtypes", "fp32", "--precisions", "ieee",
                "--kernels", "attn_fwd,attn_preprocess,attn_dq,conv_fwd,matmul",
                "--cases", "hd128,7x7 C3 stem NCHW,x @ w.T +bias",
                "--out", str(out), "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert tmp_path.joinpath("aot_fp32.json").exists(), proc.stderr[-3000:]
    rows = json.loads(tmp_path.joinpath("aot_fp32.json").read_text())["results"]
    assert {r["kernel"] for r in rows} == {
        "attn_fwd", "attn_preprocess", "attn_dq", "conv_fwd", "matmul",
    }  # fmt: skip
    assert {r["case"] for r in rows} >= {"hd128", "hd128 causal", "7x7 C3 stem NCHW"}
    assert len({r["config"] for r in rows if r["kernel"] == "matmul"}) > 1  # all GEMM tiles
    failing = _failing(rows)
    assert not failing, "\n".join(failing)
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fp32_cases_that_spilled_in_either_precision_compile_without_spills(tmp_path):
    """The conv on channels_last input and on the NCHW stem, and dQ at head dim 32, causal, in
    both fp32 precisions on sm_80 (12 compiles): 128x32x32 on 4 warps spilled 8-132 B per thread
    with exact products (``torch.backends.cudnn.allow_tf32 = False``), 64x64x64 on 4 warps with
    TF32 ones, and dQ 32x32 on 8 warps 12 B with TF32 dots (Triton 3.6)."""
    out = tmp_path / "aot_fp32"
    proc = _run(str(TOOL), "--targets", "sm_80", "--dtypes", "fp32", "--precisions", "ieee,tf32",
                "--kernels", "attn_dq,conv_fwd", "--cases", "hd32 causal,channels_last,stem NCHW",
                "--out", str(out), "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert tmp_path.joinpath("aot_fp32.json").exists(), proc.stderr[-3000:]
    rows = json.loads(tmp_path.joinpath("aot_fp32.json").read_text())["results"]
    for kernel in ("attn_dq", "conv_fwd"):
        assert {r["precision"] for r in rows if r["kernel"] == kernel} == {"ieee", "tf32"}
    assert {r["case"] for r in rows} == {
        "hd32 causal", "3x3 C64 channels_last", "7x7 C3 stem channels_last", "7x7 C3 stem NCHW",
    }  # fmt: skip
    failing = _failing(rows)
    assert not failing, "\n".join(failing)
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("version", ["3.9", "3.6"])
def test_stored_tables_are_the_current_tile_lists_and_all_pass(listed, version):
    """The full tables in bench/results hold one passing row per combination the current tile
    lists give (re-run ``aot_compile.py`` after changing a list, for both Triton versions)."""
    path = REPO / "bench" / "results" / f"aot_compile_triton{version}.json"
    report = json.loads(path.read_text())
    assert report["triton"].startswith(version + ".")
    rows = report["results"]
    stored = [_label(r) for r in rows]
    assert len(stored) == len(set(stored))
    assert {r["precision"] for r in rows if r["dtype"] == "fp32"} == {"ieee", "tf32", None}
    assert set(stored) == set(listed), (
        f"{path.name} is stale: missing {sorted(set(listed) - set(stored))[:5]}, "
        f"no longer compiled {sorted(set(stored) - set(listed))[:5]}"
    )
    failing = _failing(rows)
    assert not failing, "\n".join(failing)
    for group in ("all", "sm_80", "sm_90", "fp32/ieee", "fp32/tf32"):
        summary = report["summary"][group]
        assert summary["spilling"] == 0 == summary["compile_errors"], group
        assert summary["ok"] == summary["combinations"] > 0, group
    assert all(r["shared"] <= r["shared_limit"] for r in rows)


def test_the_check_fails_on_spills_shared_memory_and_compile_errors():
    proc = _run(str(REPO / "tests" / "aot_toy_kernels.py"), "sm_90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    toys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert toys["spilling"]["status"] == "spills"
    assert toys["spilling"]["spill_stores"] > 0
    assert toys["over_shared_memory"]["status"] == "shared memory over limit"
    assert toys["over_shared_memory"]["shared"] > 227 * 1024
    assert toys["broken"]["status"] == "compile error"
    assert "CompilationError" in toys["broken"]["error"]
    # the same tool passes a kernel that is fine
    assert toys["small_dot"]["status"] == "ok"
    assert toys["small_dot"]["spill_stores"] == 0 and toys["small_dot"]["shared"] > 0


def test_every_launchable_case_keeps_a_configuration(listed):
    """Pruning must leave at least one tile per kernel, target, dtype (fp32: in each precision)
    and head dim / case."""
    dtypes = ("fp16", "bf16", "fp32/ieee", "fp32/tf32")
    for kernel in ("attn_fwd", "attn_dkdv", "attn_dq", "attn_preprocess"):
        for target in ("sm_80", "sm_90"):
            # the delta preprocessing has no products: fp32 without a precision
            for dtype in ("fp16", "bf16", "fp32") if kernel == "attn_preprocess" else dtypes:
                for head_dim in (16, 32, 64, 128):
                    pattern = re.compile(rf"^{kernel} {target} {dtype} hd{head_dim}\b")
                    assert any(pattern.match(line) for line in listed), (kernel, target, dtype)
                    # the fixed tile (autotuning off) is always among them
                    assert any(pattern.match(line) and line.endswith("(fixed tile)")
                               for line in listed), (kernel, target, dtype, head_dim)  # fmt: skip
    for kernel in ("conv_fwd", "matmul"):
        for dtype in dtypes:
            assert any(line.startswith(f"{kernel} sm_90 {dtype} ") for line in listed)


def test_rejects_unknown_names():
    proc = _run(str(TOOL), "--kernels", "attn_fwd,nope", "--list")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "attn_fwd" in proc.stderr
