"""``python -m fastpeft``: the ``fastpeft`` command line."""

import sys

from .cli import main

sys.exit(main())
