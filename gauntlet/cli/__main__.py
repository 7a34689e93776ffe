"""``python -m gauntlet.cli``: the command line."""

import sys

from gauntlet.cli import main

sys.exit(main())
