import sys

from edgeq.cli import main

sys.exit(main())
