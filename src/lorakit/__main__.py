"""`python -m lorakit ...` (and `torchrun -m lorakit ...`) is the `lorakit` command."""

import sys

from .cli import main

sys.exit(main())
