"""``python -m edgeq``: the edgeq command.

The import of the command is inside the interrupt handling too: Ctrl-C at any moment after
Python itself started gives one line and exit 130, never a traceback.
"""

import sys

try:
    from edgeq.cli import main
except KeyboardInterrupt:
    print("edgeq: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
