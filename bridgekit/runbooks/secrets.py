"""Notebook hygiene: stripped outputs, one tagged parameters cell per runbook, and no secrets in notebooks or reports."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bridgekit.errors import SECRET_PATTERNS

__all__ = ["SECRET_PATTERNS", "check_notebook", "find_secrets"]

def find_secrets(text: str, *, literals: Iterable[str] = ()) -> list[str]:
    """Names of the secret shapes (and any of the given literal secret values) found in ``text``."""
    found = [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    for i, value in enumerate(v for v in literals if v and len(v) >= 6):
        if value in text:
            found.append(f"secret value #{i + 1} in use")
    return found


def _tags(cell: dict[str, Any]) -> list[str]:
    tags = cell.get("metadata", {}).get("tags", [])
    return list(tags) if isinstance(tags, list) else []


def check_notebook(path: str | Path, *, runbook: bool = False, committed: bool = True) -> list[str]:
    """Problems with a notebook file, as readable one-line strings (empty when clean).

    Args:
        runbook: also require exactly one cell tagged ``parameters``.
        committed: also require outputs and execution counts to be stripped.
    """
    p = Path(path)
    try:
        nb = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{p}: not a readable notebook ({exc})"]
    problems: list[str] = []
    cells = nb.get("cells", [])
    if committed:
        for i, cell in enumerate(cells):
            if cell.get("outputs"):
                problems.append(f"{p}: cell {i} has outputs (commit notebooks stripped: nbstripout)")
            if cell.get("execution_count") is not None:
                problems.append(f"{p}: cell {i} has an execution count (commit notebooks stripped)")
    if runbook:
        n = sum(1 for c in cells if "parameters" in _tags(c))
        if n != 1:
            problems.append(f"{p}: runbook has {n} cells tagged 'parameters' (exactly one required)")
    if "kernelspec" not in nb.get("metadata", {}):
        problems.append(f"{p}: no kernelspec in metadata")
    for name in find_secrets(p.read_text(encoding="utf-8")):
        problems.append(f"{p}: holds something that looks like a secret ({name})")
    return problems
