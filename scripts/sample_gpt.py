"""Sample text from a checkpoint of ``scripts/train_gpt.py``, at any (dp, pp, tp).

    python scripts/sample_gpt.py --checkpoint runs/gpt-tiny/checkpoints --prompt "import "
    python -m torch.distributed.run --standalone --nproc-per-node=4 scripts/sample_gpt.py --tp 4

Flags: ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton_parallel_layers.training.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
