"""``python -m service.webhooks [--once]``: the dispatcher as a process of its own, the same
as ``shortened webhooks`` (``service/commands.py``)."""

import sys

from service.commands import main

sys.exit(main(["webhooks", *sys.argv[1:]]))
