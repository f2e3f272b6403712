"""Train a model under a memory budget: planned by memfit, optionally compressed, on one process
or with DistributedDataParallel under torchrun, with progress, plots and honest memory figures.

    .venv/bin/python examples/train.py                       # ResNet-18 (CIFAR stem, width 16) on digits
    .venv/bin/python examples/train.py --budget-mb 85%       # the same, planned to 85% of its peak
    .venv/bin/python examples/train.py --budget-mb 30 --strategy dp --optimizer adam --epochs 5
    .venv/bin/python examples/train.py --compress ternary --budget-mb 90%   # ternary (better: --init)
    .venv/bin/python examples/train.py --data cifar10 --data-root ~/data --width 64 --epochs 30
    .venv/bin/python examples/train.py --out runs/train --resume            # continue a stopped run
    torchrun --nproc_per_node=2 examples/train.py --budget-mb 30             # DDP, gloo on CPU

On a busy CPU, ``--threads 1`` is often much faster for these small models: a second intra-op
thread that the machine cannot schedule makes every kernel wait for it.

docs/train.md describes what it does step by step, compression, the files in ``--out``, resuming
and interrupting, data parallelism and reproducibility; ``--help`` lists every option. The code is
the package ``examples/trainer/``; ``examples/train_minimal.py`` is the same idea in 60 lines.
"""

import sys

from trainer import main  # examples/ is on the path: Python puts a script's folder there

if __name__ == "__main__":
    sys.exit(main())
