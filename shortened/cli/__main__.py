"""``python -m shortened.cli``: the same entry point as the ``shortened`` command."""

import sys

from . import main

sys.exit(main())
