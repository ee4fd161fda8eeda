"""``python -m service.webhooks [--once]``: the dispatcher as a process of its own."""

import sys

from .dispatcher import main

sys.exit(main())
