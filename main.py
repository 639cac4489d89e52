"""Training entry point: ``composer main.py <yaml> [key=value ...]``.

Training itself (Composer trainer, data streams, the three-phase recipe) lands with the training
issue. Until then this validates the config's model section and summarises the encoder, so a
recipe's typos are caught today.
"""

import sys

from flexbert.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        print("usage: python main.py CONFIG.yaml [key=value ...]")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    sys.exit(main(["describe", *sys.argv[1:]]))
