"""The LSTM benchmark runs end to end (``--smoke``) and writes what it claims to."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_lstm  # noqa: E402


def test_smoke(tmp_path):
    result = bench_lstm.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lstm_smoke.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["machine"] and saved["fused_path"] == "ref"
    (row,) = saved["rows"]
    assert (row["hidden"], row["batch"], row["length"]) == (16, 2, 4)
    for name in bench_lstm.PROVIDERS:
        assert row[f"{name}_ms"] > 0
    assert abs(row["fused_vs_nn_lstm"] - row["fused_ms"] / row["nn.LSTM_ms"]) < 1e-9
    assert (tmp_path / "lstm_smoke.png").stat().st_size > 0
