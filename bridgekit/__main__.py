"""``python -m bridgekit`` runs the command line."""

import sys

from bridgekit.cli import main

sys.exit(main())
