"""``python -m edgeq``: the edgeq command.

The import of the command is inside the interrupt handling too, so Ctrl-C while it loads gives
one line and exit 130, not a traceback. (Only ``edgeq/__init__.py`` runs before this line: it
imports nothing but ``edgeq.errors``.)
"""

import sys

try:
    from edgeq.cli import main
except KeyboardInterrupt:
    print("edgeq: interrupted; nothing was written", file=sys.stderr)  # as edgeq.cli.INTERRUPTED
    sys.exit(130)

sys.exit(main())
