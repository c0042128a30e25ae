"""Run records: the results, checks and data watermarks a runbook reports to the runner that executes it.

A runbook calls these as plain library functions::

    import bridgekit.record as record
    record.result("open_opportunities", 42)
    record.check("sync_freshness", status="amber", detail="account last synced 26 h ago")
    record.watermark("dataverse.account", sync_run_id="r-17", position="delta:918", rows=1200)

Each call appends one JSON line to the file named by ``$BRIDGEKIT_RECORD_FILE``, which ``bridgekit run``
sets for the kernel and reads back into the run's ``manifest.json`` once the kernel has stopped (a file,
because the kernel is another process that may die mid-run: the lines written before it died survive).
Without the variable (JupyterLab, plain ``papermill``) the records are only kept in memory, so the same
runbook runs unchanged everywhere. Values must be JSON-able; numpy/pandas scalars and dates are converted.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from bridgekit.errors import CheckFailed

__all__ = [
    "RECORD_ENV",
    "STATUSES",
    "CheckFailed",
    "check",
    "read_records",
    "records",
    "result",
    "watermark",
]

RECORD_ENV = "BRIDGEKIT_RECORD_FILE"
STATUSES: tuple[str, ...] = ("green", "amber", "red")
Status = Literal["green", "amber", "red"]

# Records of this process, in call order (what an interactive session can inspect).
_RECORDED: list[dict[str, Any]] = []


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types, or TypeError naming ``where``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # JSON has no NaN/inf; a missing measure reads better than an invalid file
        return value
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    # numpy / pandas scalars and arrays, without importing either.
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return _jsonable(item(), where)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist(), where)
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return str(isoformat())
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-able; record a number, string, list or dict")


def _emit(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    entry = {"kind": kind, "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **payload}
    _RECORDED.append(entry)
    path = os.environ.get(RECORD_ENV)
    if path:
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False)
        # One write per line and a flush, so a kernel killed right after still leaves whole lines behind.
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
    return entry


def result(name: str, value: Any) -> Any:
    """Record a key result of the run (a count, a rate, a small table as a list of dicts).

    Returns ``value`` unchanged so the call can sit at the end of a cell.

    Example:
        >>> import bridgekit.record as record
        >>> record.result("accounts_without_owner", 3)
        3
    """
    _emit("result", {"name": str(name), "value": _jsonable(value, str(name))})
    return value


def check(name: str, status: Status | str = "green", *, detail: str = "", stop: bool = False) -> str:
    """Record the outcome of a check: ``green`` (fine), ``amber`` (look at it) or ``red`` (a problem).

    A red check makes ``bridgekit run`` exit 6 (CHECK_FAILED) once the runbook has finished; with
    ``stop=True`` a red check raises :class:`CheckFailed` at once instead.

    Returns:
        The status, so ``check(...)`` can be used in an expression.

    Raises:
        ValueError: ``status`` is not green, amber or red.
        CheckFailed: ``status`` is red and ``stop`` is true.

    Example:
        >>> import bridgekit.record as record
        >>> record.check("orphan_contacts", "amber", detail="12 contacts have no account")
        'amber'
    """
    status = str(status).lower()
    if status not in STATUSES:
        raise ValueError(f"check {name!r}: status must be one of {', '.join(STATUSES)}, not {status!r}")
    _emit("check", {"name": str(name), "status": status, "detail": str(detail)})
    if status == "red" and stop:
        raise CheckFailed(f"check '{name}' is red" + (f": {detail}" if detail else ""))
    return status


def watermark(table: str, *, sync_run_id: str | int | None = None, position: Any = None,
              rows: int | None = None) -> None:
    """Record which data the run analysed: per table, the sync run, the delta position and the row count.

    Args:
        table: The warehouse table, e.g. ``dataverse.account`` or ``graph.users``.
        sync_run_id: The id of the sync run that last wrote the table.
        position: The change-tracking / delta position reached (a version number, never a raw token URL).
        rows: The table's row count when the runbook read it.
    """
    _emit("watermark", {"table": str(table), "sync_run_id": _jsonable(sync_run_id, "sync_run_id"),
                        "position": _jsonable(position, "position"),
                        "rows": None if rows is None else int(rows)})


def records() -> list[dict[str, Any]]:
    """The records made by this process so far (a copy), in call order."""
    return [dict(r) for r in _RECORDED]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a record file; a torn last line (the kernel died while writing) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    out: list[dict[str, Any]] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("kind") in ("result", "check", "watermark"):
            out.append(entry)
    return out
