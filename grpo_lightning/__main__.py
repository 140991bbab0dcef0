"""``python -m grpo_lightning fit --config configs/sat_tiny.yaml`` (see ``cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
