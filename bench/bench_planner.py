"""Plan Narayanan et al. 2021's GPT configurations (Megatron-LM, SC21, Table 1) and compare with
the published per-GPU throughput.

For each row: the planner's prediction for the published layout (its dp, pp, tp on A100s with
activation recomputation; the microbatch size and schedule the planner finds best for it), the
layout the planner picks from the whole space (the same options), the planning time, and the ratio
of predicted to published TFLOP/s per GPU. Writes ``plan_megatron.json`` and ``.md`` under
``--out-dir``.

    python bench/bench_planner.py                       # all ten rows (about a minute)
    python bench/bench_planner.py --rows 6 --out-dir /tmp/plan
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402

from triton_parallel_layers.parallel_layers.planner import (  # noqa: E402
    plan_parallelism,
)
from triton_parallel_layers.parallel_layers.planner.megatron import (  # noqa: E402
    NARAYANAN_2021,
    gpt_profile,
    published_layout_estimate,
)

OPTIONS = dict(recompute=(True,), sequence_parallel=(False,), bytes_per_param=18)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=len(NARAYANAN_2021),
                        help="plan the first ROWS rows of Table 1 (default all)")  # fmt: skip
    parser.add_argument("--out-dir", default="bench/results", help="where the results go")
    args = parser.parse_args(argv)
    rows = []
    for cfg in NARAYANAN_2021[: args.rows]:
        pub = published_layout_estimate(cfg)
        start = time.perf_counter()
        plan = plan_parallelism(gpt_profile(cfg), "a100", cfg.gpus, cfg.batch, **OPTIONS)
        seconds = time.perf_counter() - start
        row = {
            "params_b": cfg.params_b,
            "gpus": cfg.gpus,
            "published_layout": f"dp={cfg.dp} pp={cfg.pp} tp={cfg.tp}",
            "published_tflops": cfg.tflops_per_gpu,
            "predicted_tflops": pub.model_flops_per_gpu / 1e12,
            "ratio": pub.model_flops_per_gpu / 1e12 / cfg.tflops_per_gpu,
            "published_layout_detail": str(pub.layout),
            "picked_layout": str(plan.best.layout),
            "picked_tflops": plan.best.model_flops_per_gpu / 1e12,
            "candidates": len(plan.ranked) + len(plan.rejected),
            "planning_seconds": seconds,
        }
        rows.append(row)
        print(f"{cfg.params_b:>7g}B {cfg.gpus:>5} GPUs  published {cfg.tflops_per_gpu:>4} "
              f"predicted {row['predicted_tflops']:6.1f} ({row['ratio']:.2f})  pick "
              f"{row['picked_tflops']:6.1f} {row['picked_layout']}  [{seconds:.1f} s]",
              flush=True)  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": cpu_name(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "hardware_spec": "a100 (built-in, published specifications)",
        "load_average_1min": os.getloadavg()[0],  # planning_seconds depend on the machine's load
    }
    (out / "plan_megatron.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# Planner vs Narayanan et al. 2021, Table 1 (A100, TFLOP/s per GPU)",
        "",
        "| model | GPUs | published layout | published | predicted | ratio | planner's pick | "
        "its prediction | planning s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['params_b']:g}B | {r['gpus']} | {r['published_layout']} | "
            f"{r['published_tflops']} | {r['predicted_tflops']:.1f} | {r['ratio']:.2f} | "
            f"{r['picked_layout']} | {r['picked_tflops']:.1f} | {r['planning_seconds']:.1f} |"
        )
    (out / "plan_megatron.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
