"""`python -m kiln ...` (what torchrun launches) is the `kiln` command."""

import sys

from kiln.cli import main

sys.exit(main())
