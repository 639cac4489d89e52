"""``python -m flexbert.cli``: the ``flexbert`` command (how sweeps launch their runs)."""

import sys

from flexbert.cli import main

sys.exit(main())
