"""``python -m orion_mllm.cli``: the ``orion`` command (torchrun relaunches ``orion train`` this way)."""

import sys

from orion_mllm.cli import main

sys.exit(main())
