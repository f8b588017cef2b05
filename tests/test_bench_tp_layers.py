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
    assert [r["sequence_parallel"] for r in saved["rows"]] == [False, True]
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
    assert bench_tp_layers.main(["--profile", "2x8x16", "--out", str(tmp_path)]) == {}
    table = capsys.readouterr().out
    assert "aten::mm" in table and "Self CPU" in table
    assert not list(tmp_path.iterdir())  # a profile writes no results
