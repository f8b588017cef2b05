"""The TP-vs-DTensor benchmark runs end to end (tiny sizes) and writes what it claims to."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_tp_layers  # noqa: E402


def test_smoke(tmp_path):
    result = bench_tp_layers.main(
        ["--iters", "2", "--warmup", "1", "--repeats", "2", "--shapes", "2x8x16",
         "--out", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "tp_layers_cpu.json").read_text())
    assert saved == json.loads(json.dumps(result))
    variants = [(r["variant"], r["sequence_parallel"], r["overlap_comm"]) for r in saved["rows"]]
    assert variants == [("tp", False, False), ("sp", True, False), ("sp+overlap", True, True)]
    # the overlapped row shares the sequence-parallel row's DTensor step and floor
    sp, overlapped = saved["rows"][1:]
    for key in ("dtensor_ms", "gemms_ms", "comms_ms", "floor_ms"):
        assert sp[key] == overlapped[key]
    for row in saved["rows"]:
        assert row["ours_ms"] > 0 and row["dtensor_ms"] > 0
        assert abs(row["ratio"] - row["ours_ms"] / row["dtensor_ms"]) < 1e-9
        # the floor: the step's GEMMs alone plus its collectives alone, timed in the same run
        assert row["gemms_ms"] > 0 and row["comms_ms"] > 0
        assert abs(row["floor_ms"] - row["gemms_ms"] - row["comms_ms"]) < 1e-9
        assert abs(row["overhead"] - row["ours_ms"] / row["floor_ms"]) < 1e-9
        # each collective also alone, and every repeat's own figures kept
        assert row["comms_each_ms"] > 0
        assert len(row["ratio_per_repeat"]) == len(row["overhead_per_repeat"]) == 2
    assert (tmp_path / "tp_layers_cpu.png").stat().st_size > 0


def test_profile_prints_where_the_step_goes(tmp_path, capsys):
    argv = ["--profile", "2x8x16", "--variant", "sp+overlap", "--out", str(tmp_path)]
    assert bench_tp_layers.main(argv) == {}
    table = capsys.readouterr().out
    assert "aten::mm" in table and "Self CPU" in table
    assert not list(tmp_path.iterdir())  # a profile writes no results


def test_breakdown_times_each_phase_against_its_share_of_the_floor(tmp_path, capsys):
    argv = ["--breakdown", "2x8x16", "--variant", "sp", "--iters", "2", "--warmup", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench_tp_layers.main(argv) == {}
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:14].strip(): line[14:].split() for line in lines[2:]}
    assert list(rows) == [name for name, *_ in bench_tp_layers.PHASES] + ["step"]
    for name in ("GELU", "GELU backward"):  # no GEMM, no collective: all of it is excess
        ours, floor, excess = map(float, rows[name])
        assert floor == 0 and ours == excess > 0
    assert "step / floor" in lines[-1]
    assert not list(tmp_path.iterdir())  # a breakdown writes no results


def test_breakdown_table_sums_each_phases_share_of_the_floor():
    # two ranks; phases in seconds, then the floor's six GEMMs and five collectives (SP) alone
    ranks = [
        {"ours": [0.012, 0.001, 0.015, 0.025, 0.002, 0.027],
         "gemms": [0.010] * 6, "comms": [0.002, 0.003, 0.002, 0.002, 0.003]},
        {"ours": [0.014, 0.001, 0.015, 0.025, 0.002, 0.027],
         "gemms": [0.010] * 6, "comms": [0.002, 0.003, 0.002, 0.002, 0.003]},
    ]  # fmt: skip
    table = bench_tp_layers.breakdown_table(ranks, sequence_parallel=True)
    rows = {line[:14].strip(): [float(v) for v in line[14:].split()[:3]]
            for line in table.splitlines()[1:]}  # fmt: skip
    assert rows["fc1 forward"] == [13.0, 12.0, 1.0]  # the ranks' mean; GEMM + all-gather
    assert rows["fc2 backward"] == [25.0, 22.0, 3.0]  # two GEMMs + the gradient's all-gather
    assert rows["fc1 backward"] == [27.0, 25.0, 2.0]  # two GEMMs + gather again + scatter
    assert rows["step"] == [83.0, 72.0, 11.0]
    # without sequence parallelism the same phases hold the two all-reduces instead
    plain = bench_tp_layers.breakdown_table(
        [{**r, "comms": [0.004, 0.005]} for r in ranks], sequence_parallel=False
    )
    assert "step             83.000    69.000     14.000" in plain


def _collectives_in_flight_after_steps(sequence_parallel: bool) -> tuple[int, int]:
    """``(in flight after a bare DTensor forward+backward, in flight after a bench step)``."""
    from torch._C._distributed_c10d import _get_work_registry_size

    from triton_parallel_layers.parallel_layers import ParallelDims

    dims = ParallelDims(tp=2)
    mlp, x, dy = bench_tp_layers._setup(2, 8, 16, sequence_parallel, dims)
    model = bench_tp_layers._dtensor(mlp, dims.tp_mesh, sequence_parallel)
    y = model(x)
    y.backward(dy)
    bare = _get_work_registry_size()
    bench_tp_layers._complete(y, x.grad)
    x.grad = None
    bench_tp_layers._step(model, x, dy)
    return bare, _get_work_registry_size()


def test_a_dtensor_step_ends_with_its_collectives_done(dist_run):
    # DTensor hands back its last collectives' results unwaited; a step that never reads them
    # would stop early and leave them (and their buffers) in torch's work registry
    for sequence_parallel in (False, True):
        for bare, after_step in dist_run(2, _collectives_in_flight_after_steps, sequence_parallel):
            assert bare > 0
            assert after_step == 0
