"""``python -m lorakit`` (and ``torchrun -m lorakit``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
