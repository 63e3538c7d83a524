"""The training worker as a script, for DeepSpeed's multi-node launcher (every rank runs it)::

    deepspeed --hostfile infra/hostfile training/train.py --config data/runs/finetune/<run>/config.yaml

``kalm train`` writes that resolved config and launches the same worker as ``-m kalm.training.train``;
the loop itself is :mod:`kalm.training.train`.
"""

import sys

from kalm.training.train import main

if __name__ == "__main__":
    sys.exit(main())
