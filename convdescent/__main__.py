"""``python -m convdescent``: the same command line as the ``convdescent`` script."""

import sys

from .cli import main

sys.exit(main())
