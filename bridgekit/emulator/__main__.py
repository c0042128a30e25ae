"""``python -m bridgekit.emulator``: the emulator's command group (``serve`` is what ``start`` spawns)."""

from __future__ import annotations

from bridgekit.emulator.cli import emulator

if __name__ == "__main__":
    emulator(prog_name="python -m bridgekit.emulator")
