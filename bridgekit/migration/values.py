"""Migration values: the mapping's value transforms, coercion to Dataverse column types, and canonical forms for comparison.

Three steps turn a source cell into what is written and compared:

1. :func:`apply_transforms` runs the mapping's transforms (``strip``, ``upper``, ``map: {...}`` ...);
2. :func:`coerce` checks and converts the value for the target column's metadata (type, maximum length,
   option values, precision), raising :class:`ValueProblem` with a reason a user can act on;
3. :func:`canon` renders a value as a canonical string, the same whether it came from the source, a
   Web API JSON row or a warehouse cell, so plans, resumes and reconciliations compare like with like.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

__all__ = [
    "TRANSFORMS",
    "ValueProblem",
    "apply_transforms",
    "canon",
    "check_transforms",
    "coerce",
    "json_value",
]

_TRUE = frozenset({"true", "yes", "y", "1", "t", "on"})
_FALSE = frozenset({"false", "no", "n", "0", "f", "off"})
_INT_TYPES = frozenset({"Integer", "BigInt"})
_CHOICE_TYPES = frozenset({"Picklist", "State", "Status"})
_NUMBER_TYPES = frozenset({"Money", "Decimal", "Double"})
_TEXT_TYPES = frozenset({"String", "Memo", "EntityName"})
_LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})
# Web API Integer columns are Edm.Int32 (MinValue/MaxValue in IntegerAttributeMetadata).
_INT32 = (-2147483648, 2147483647)


class ValueProblem(ValueError):
    """A value that cannot be written to its column; ``reason`` says why in a user's words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- transforms --------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _number(value: Any) -> Any:
    if value is None or (isinstance(value, int | float | Decimal) and not isinstance(value, bool)):
        return value
    text = _text(value).strip().replace(",", "").replace(" ", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueProblem(f"'{value}' is not a number") from None


TRANSFORMS: dict[str, Callable[..., Any]] = {
    "strip": lambda v: _text(v).strip(),
    "upper": lambda v: _text(v).upper(),
    "lower": lambda v: _text(v).lower(),
    "title": lambda v: _text(v).title(),
    "collapse_spaces": lambda v: re.sub(r"\s+", " ", _text(v)).strip(),
    "digits": lambda v: re.sub(r"\D", "", _text(v)),
    "number": _number,
    "empty_to_null": lambda v: None if isinstance(v, str) and not v.strip() else v,
    "prefix": lambda v, arg: f"{arg}{_text(v)}",
    "suffix": lambda v, arg: f"{_text(v)}{arg}",
    "replace": lambda v, arg: _text(v).replace(str(arg[0]), str(arg[1])),
    "truncate": lambda v, arg: _text(v)[: int(arg)],
    "multiply": lambda v, arg: None if _number(v) is None else Decimal(str(_number(v))) * Decimal(str(arg)),
}
# Transforms that take an argument (``{prefix: "LEG-"}``); ``map`` and ``default`` are handled inline.
_WITH_ARG = frozenset({"prefix", "suffix", "replace", "truncate", "multiply"})


def check_transforms(steps: Sequence[Any], where: str) -> list[str]:
    """Problems with a transform list as written in a mapping (unknown names, bad arguments)."""
    problems: list[str] = []
    for step in steps:
        if isinstance(step, str):
            if step not in TRANSFORMS or step in _WITH_ARG:
                problems.append(f"{where}: unknown transform {step!r}" if step not in TRANSFORMS
                                else f"{where}: transform {step!r} needs an argument ({{{step}: ...}})")
            continue
        if isinstance(step, Mapping) and len(step) == 1:
            name, arg = next(iter(step.items()))
            if name == "map":
                if not isinstance(arg, Mapping):
                    problems.append(f"{where}: map needs a mapping of source value -> target value")
            elif name == "default":
                pass
            elif name not in _WITH_ARG:
                problems.append(f"{where}: unknown transform {name!r}")
            elif name == "replace" and not (isinstance(arg, list | tuple) and len(arg) == 2):
                problems.append(f"{where}: replace needs [old, new]")
            continue
        problems.append(f"{where}: a transform is a name or a one-key mapping, not {step!r}")
    return problems


def apply_transforms(value: Any, steps: Sequence[Any]) -> Any:
    """Run ``steps`` over ``value``; ``None`` passes through every step except ``default``.

    Raises:
        ValueProblem: a step cannot handle the value (``number`` on text, ...).
    """
    for step in steps:
        if isinstance(step, str):
            if value is not None:
                value = TRANSFORMS[step](value)
            continue
        name, arg = next(iter(step.items()))
        if name == "default":
            if value is None or (isinstance(value, str) and not value.strip()):
                value = arg
        elif name == "map":
            if value is not None:
                key = _text(value).strip()
                lowered = {str(k).strip().lower(): v for k, v in arg.items()}
                if key.lower() in lowered:
                    value = lowered[key.lower()]
        elif value is not None:
            value = TRANSFORMS[name](value, arg)
    return value


# -- coercion to the column's type ---------------------------------------------------------------------------


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueProblem(f"'{value}' is not a number")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueProblem(f"'{value}' is not a finite number")
        result = Decimal(repr(value))
    else:
        result = _number(value)
        if not isinstance(result, Decimal):
            result = _to_decimal(result)
    if not result.is_finite():
        raise ValueProblem(f"'{value}' is not a finite number")
    return result


def _to_datetime(value: Any, *, date_only: bool) -> str:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    else:
        text = _text(value).strip()
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueProblem(f"'{value}' is not an ISO date or date-time (YYYY-MM-DD[THH:MM:SS[Z]])") from None
    if date_only:
        return moment.date().isoformat()
    # A time without a zone is taken as UTC: Dataverse stores UTC (UserLocal behaviour converts on display).
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_BY_LABEL: dict[int, tuple[Mapping[int, str], dict[str, int]]] = {}


def _labels(options: Mapping[int, str]) -> dict[str, int]:
    """Lower-cased label -> value of a choice's options, worked out once per options mapping (not per row)."""
    cached = _BY_LABEL.get(id(options))
    if cached is None or cached[0] is not options:
        if len(_BY_LABEL) > 256:  # holds each mapping it has seen: keep it small
            _BY_LABEL.clear()
        cached = _BY_LABEL[id(options)] = (options, {lab.strip().lower(): v for v, lab in options.items()})
    return cached[1]


def coerce(value: Any, *, type: str, max_length: int | None = None, options: Mapping[int, str] | None = None,
           precision: int | None = None, date_only: bool = False, choice_labels: bool = False) -> Any:
    """``value`` converted for a Dataverse column of AttributeType ``type``; None stays None.

    Args:
        value: The transformed source value.
        type: The column's AttributeType (``String``, ``Money``, ``Picklist`` ...).
        max_length: ``MaxLength`` of a String/Memo column.
        options: Choice values -> labels (Picklist/State/Status).
        precision: Digits after the point for Money/Decimal/Double (values are rounded half-even).
        date_only: DateTime column with the DateOnly format.
        choice_labels: Accept option *labels* (case-insensitive) as well as option values.

    Returns:
        The value in its Web API JSON shape (str, int, float, bool), or a :class:`~decimal.Decimal`
        for numbers (see :func:`json_value`).

    Raises:
        ValueProblem: with a reason naming the problem and, for choices, the accepted labels.
    """
    if value is None or (isinstance(value, str) and not value.strip() and type not in _TEXT_TYPES):
        return None
    if type in _TEXT_TYPES:
        text = _text(value)
        if text == "":
            return None
        if max_length is not None and len(text) > max_length:
            raise ValueProblem(f"is {len(text)} characters long; the column allows {max_length}")
        return text
    if type in _CHOICE_TYPES:
        opts = dict(options or {})
        candidate: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            candidate = value
        else:
            text = _text(value).strip()
            if re.fullmatch(r"-?\d+", text):
                candidate = int(text)
            elif choice_labels:
                by_label = _labels(options or {})
                if text.lower() in by_label:
                    return by_label[text.lower()]
                shown = ", ".join(sorted(opts.values())[:8]) + (", ..." if len(opts) > 8 else "")
                raise ValueProblem(f"'{text}' is not a label of this choice (labels: {shown})")
            else:
                raise ValueProblem(f"'{text}' is not an option value (map labels with `choice: label`)")
        if opts and candidate not in opts:
            raise ValueProblem(f"{candidate} is not an option value (values: "
                               f"{', '.join(str(v) for v in sorted(opts))})")
        return candidate
    if type in _INT_TYPES:
        number = _to_decimal(value)
        if number != number.to_integral_value():
            raise ValueProblem(f"'{value}' is not a whole number")
        result = int(number)
        if type == "Integer" and not _INT32[0] <= result <= _INT32[1]:
            raise ValueProblem(f"{result} is outside the 32-bit integer range")
        return result
    if type in _NUMBER_TYPES:
        number = _to_decimal(value)
        if precision is not None:
            number = number.quantize(Decimal(1).scaleb(-precision), rounding=ROUND_HALF_EVEN)
        return number
    if type == "Boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | Decimal | float):
            if value in (0, 1):
                return bool(value)
            raise ValueProblem(f"'{value}' is not a yes/no value")
        text = _text(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueProblem(f"'{value}' is not a yes/no value (true/false, yes/no, 1/0)")
    if type == "DateTime":
        return _to_datetime(value, date_only=date_only)
    if type == "Uniqueidentifier" or type in _LOOKUP_TYPES:
        try:
            return str(uuid.UUID(_text(value).strip().strip("{}")))
        except ValueError:
            raise ValueProblem(f"'{value}' is not a GUID") from None
    raise ValueProblem(f"columns of type {type} cannot be migrated")


def json_value(value: Any) -> Any:
    """A coerced value as JSON (Decimals become floats, integral ones ints: Edm.Decimal accepts both)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and abs(value) < 2**53 else float(value)
    return value


# -- canonical text for comparisons ------------------------------------------------------------------------------


def canon(value: Any, type: str, *, date_only: bool = False) -> str | None:
    """A canonical string for ``value`` of a column of AttributeType ``type`` (None for null/empty).

    Source values (after :func:`coerce`), Web API JSON values and warehouse cells (DuckDB's Python types:
    Decimal, datetime, date, UUID) of the same content give the same string.
    """
    if value is None:
        return None
    if type in _TEXT_TYPES:
        text = _text(value)
        return text if text != "" else None  # Dataverse stores an empty string as null
    if type in _NUMBER_TYPES or type in _INT_TYPES:
        try:
            number = _to_decimal(value)
        except ValueProblem:
            return _text(value)
        if number == 0:
            return "0"
        normal = number.normalize()
        return format(normal, "f")
    if type in _CHOICE_TYPES:
        return str(int(value)) if not isinstance(value, str) or value.strip().lstrip("-").isdigit() else value
    if type == "Boolean":
        if isinstance(value, str):
            return "true" if value.strip().lower() in _TRUE else "false"
        return "true" if bool(value) else "false"
    if type == "DateTime":
        try:
            return _to_datetime(value, date_only=date_only)
        except ValueProblem:
            return _text(value)
    if type == "Uniqueidentifier" or type in _LOOKUP_TYPES:
        return _text(value).strip("{}").lower()
    return _text(value)
