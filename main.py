"""Training entry point.

    composer -n 8 main.py yamls/pretrain-base.yaml [key=value ...]   # 8 GPUs, DDP (or FSDP via fsdp_config)
    python main.py yamls/demo/pretrain.yaml                          # one process
    python main.py yamls/pretrain-base.yaml --print-config           # resolved config, then exit

Multi-node: composer --world_size 16 --node_rank $NODE_RANK --master_addr $HOST0 --master_port 29500 \\
    -n 8 main.py RECIPE.yaml
"""

import sys

from flexbert.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        main(["train", "--help"])
    sys.exit(main(["train", *sys.argv[1:]]))
