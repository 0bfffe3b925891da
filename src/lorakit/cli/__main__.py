"""`python -m lorakit.cli ...` is the `lorakit` command (as `python -m lorakit ...`)."""

import sys

from . import main

sys.exit(main())
