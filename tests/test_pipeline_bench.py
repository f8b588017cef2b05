"""The pipeline benchmark runs end to end (one tiny configuration) and writes what it claims to."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_pipeline  # noqa: E402


def test_smoke(tmp_path):
    result = bench_pipeline.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "pipeline_cpu.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    assert {(r["workload"], r["schedule"]) for r in rows} == {
        (w, s) for w in ("timed", "mlp") for s in bench_pipeline.SCHEDULES
    }
    for row in rows:
        assert row["ours_ms"] > 0 and 0 <= row["ours_timeline_bubble"] < 1
        compared = not (row["workload"] == "timed" and row["schedule"] == "zb-h1")
        assert (row["ratio"] is not None) == compared
        if compared:
            assert abs(row["ratio"] - row["ours_ms"] / row["torch_ms"]) < 1e-9
    assert set(saved["ratio_summary"]) == set(bench_pipeline.SCHEDULES)
    assert (tmp_path / "pipeline_cpu.png").stat().st_size > 0
    assert "rank 1 |" in (tmp_path / "pipeline_timeline_cpu.txt").read_text()
