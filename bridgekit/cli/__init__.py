"""The ``bridgekit`` command line: thin translators over the library, one error-to-exit-code mapping.

Modules:
    main.py       the root group, global options, registration of every command, errors -> exit codes
    profiles.py   ``profiles list|show``
    warehouse.py  ``sync``, ``sql``, ``export``
    runbooks.py   ``runbooks``, ``run``
    demo.py       ``demo``
    auth.py       ``auth login|status|logout``
The ``emulator`` group lives with the emulator (``bridgekit.emulator.cli``).
"""

from __future__ import annotations

from bridgekit.cli.main import cli, main

__all__ = ["cli", "main"]
