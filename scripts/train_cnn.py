"""Train the ResNet-style CNN on scikit-learn's digits (28x28), at any (dp, pp, tp).

    python scripts/train_cnn.py                                   # one process
    python -m torch.distributed.run --standalone --nproc-per-node=2 scripts/train_cnn.py --tp 2

Flags: ``--help``. Outputs in ``--out`` (default ``runs/cnn-<model>``): ``metrics.jsonl``,
``loss.png``, ``summary.json``, ``checkpoints/``. Needs scikit-learn (the digits ship inside it).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton_parallel_layers.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("cnn"))
