"""Train the stacked LSTM on the Python standard library's sources (byte-level), at any (dp, pp, tp).

    python -m torch.distributed.run --standalone --nproc-per-node=4 scripts/train_lstm.py --pp 2 --tp 2

Flags: ``--help``. Outputs in ``--out`` (default ``runs/lstm-<model>``): ``metrics.jsonl``,
``loss.png``, ``summary.json``, ``checkpoints/``. See the README's "Training" section.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton_parallel_layers.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("lstm"))
