"""``python -m bridgekit`` runs the command line."""

import sys

from bridgekit.cli.main import main

sys.exit(main())
