"""``python -m gauntlet``: the command line."""

import sys

from gauntlet.cli import main

sys.exit(main())
