"""Training entry point for every launcher.

    deepspeed [--hostfile H] [--num_gpus N] cluster/launch.py --config configs/X.yaml [--section.key=value ...]
    torchrun --nproc_per_node N cluster/launch.py --config ...
    python cluster/launch.py --config ...            # one process

It is `distil-scale train` with the arguments the launcher passes (DeepSpeed adds --local_rank).
"""

import sys

from distil_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
