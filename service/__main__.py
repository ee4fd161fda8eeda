"""``python -m service serve|reaper|scheduler|webhooks|keys``: the service's processes, as
``shortened <command>`` starts them (``service/commands.py``)."""

import sys

from service.commands import main

sys.exit(main())
