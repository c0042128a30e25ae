"""OData ``$filter`` for the Dataverse emulator: a recursive-descent parser and a compiler to a SQL WHERE.

The supported language is the subset Dataverse documents (protocols.md §1.6, query/filter-rows.md):
comparisons ``eq ne gt ge lt le``, ``and``/``or``/``not``, parentheses, ``null``, the string functions
``contains``/``startswith``/``endswith`` (case-insensitive), ``Microsoft.Dynamics.CRM.In``/``NotIn``/
``Between``/``NotBetween``, and parameter aliases (``@p1``). Literals: single-quoted strings (``''``
escapes a quote), integers and decimals, ``true``/``false``, GUIDs (bare or quoted), dates and
date-times (bare).

The compiler never puts a literal into SQL text: every value becomes a bound ``?`` parameter. Property
names are resolved by a caller-supplied function that returns a SQL expression and an EDM type, so an
unknown name never reaches SQL either.

Example:
    >>> def resolve(name: str) -> FieldRef:
    ...     return FieldRef("json_extract(data, '$.name')", "Edm.String")
    >>> compile_filter("name eq 'O''Brien'", resolve)
    ("(json_extract(data, '$.name') = ? COLLATE NOCASE)", ["O'Brien"])
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

__all__ = [
    "FieldRef",
    "FilterError",
    "InList",
    "Lambda",
    "compile_filter",
    "date_window",
    "fold",
    "parse_filter",
    "register_functions",
]

#: Name of the SQL function (registered by :func:`register_functions`) that folds case beyond ASCII.
FOLD_FUNCTION = "emu_fold"
#: SQL function: the folded text of a JSON string value, NUL characters included (``json_extract``
#: stops at the first NUL, so strings holding one are compared through this function instead).
JSON_TEXT_FUNCTION = "emu_json_text"
#: SQL function ``emu_match(text, kind, needle)``: contains/startswith/endswith on folded text.
MATCH_FUNCTION = "emu_match"
_JSON_FIELD = re.compile(r"json_extract\((\w+(?:\.\w+)?), ('[^']*')\)")


class FilterError(ValueError):
    """The ``$filter`` text is not valid; ``message`` is worded like Dataverse's own parser errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A resolved property: the SQL expression that reads it and its EDM type (``Edm.String`` ...)."""

    sql: str
    edm: str
    #: Display name used in type-mismatch messages (defaults to the SQL).
    name: str = ""


Resolver = Callable[[str], FieldRef]
#: Compiles a lambda node (with the compiler, to reuse it for the body) into SQL.
LambdaCompiler = Callable[[Any, "Lambda"], str]

# -- AST ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    kind: str  # string, int, decimal, bool, null, guid, date, datetime
    value: Any
    pos: int


@dataclass(frozen=True, slots=True)
class Member:
    path: str
    pos: int


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Node
    right: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Logical:
    op: str  # and / or
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class Named:
    """``PropertyName='x'`` / ``PropertyValues=["a","b"]`` arguments of Dataverse query functions."""

    name: str
    value: Any
    pos: int


@dataclass(frozen=True, slots=True)
class InList:
    """``property in ('a', 'b')`` (OData 4.01's ``in``; Graph accepts it, Dataverse does not)."""

    left: Node
    values: tuple[Literal, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class Lambda:
    """``path/any(v: body)``, ``path/all(v: body)`` or ``path/any()`` over a collection."""

    path: str
    op: str  # any / all
    var: str
    body: Node | None
    pos: int


Node = Literal | Member | Compare | Logical | Not | Call | Named | InList | Lambda

# -- tokenizer ------------------------------------------------------------------------------------------

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![\w-])")
_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})?(?![\w:.])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?![\w:.-])")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?[mMdDfFlL]?(?![\w.])")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[./][A-Za-z_$][A-Za-z0-9_]*)*")
_ALIAS = re.compile(r"@[A-Za-z_][A-Za-z0-9_]*")
_COMPARE_OPS = {"eq": "=", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_OP_NAMES = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
             "lt": "LessThan", "le": "LessThanOrEqual"}
_STRING_FUNCS = ("contains", "startswith", "endswith")
_CRM = "microsoft.dynamics.crm."
_CRM_FUNCS = ("in", "notin", "between", "notbetween")


# -- date query functions (shared with FetchXML's date operators) ---------------------------------------

#: Query functions (query/filter-rows.md, "Dataverse query functions") by their FetchXML operator name.
#: ``x`` means the function takes a PropertyValue count.
DATE_OPERATORS = {
    "today": "", "yesterday": "", "tomorrow": "", "this-week": "", "last-week": "", "next-week": "",
    "this-month": "", "last-month": "", "next-month": "", "this-year": "", "last-year": "", "next-year": "",
    "last-seven-days": "", "next-seven-days": "",
    "last-x-hours": "x", "next-x-hours": "x", "last-x-days": "x", "next-x-days": "x", "last-x-weeks": "x",
    "next-x-weeks": "x", "last-x-months": "x", "next-x-months": "x", "last-x-years": "x", "next-x-years": "x",
    "olderthan-x-minutes": "x", "olderthan-x-hours": "x", "olderthan-x-days": "x", "olderthan-x-weeks": "x",
    "olderthan-x-months": "x", "olderthan-x-years": "x",
    "on": "d", "on-or-after": "d", "on-or-before": "d",
}
#: Web API query function names (lower case, without the namespace) -> FetchXML operator names.
_FUNCTION_OPERATORS = {op.replace("-", "").replace("seven", "7").replace("olderthan", "olderthan"): op
                       for op in DATE_OPERATORS}
_FUNCTION_OPERATORS.update({"onorafter": "on-or-after", "onorbefore": "on-or-before"})


def _add_months(d: date, months: int) -> date:
    y, m = divmod(d.year * 12 + d.month - 1 + months, 12)
    return date(y, m + 1, 1)


def date_window(op: str, value: Any, now: datetime) -> tuple[datetime | None, datetime | None, bool]:
    """The instants a date operator matches: ``(low, high, high_inclusive)``; low is inclusive, None is open.

    The emulator's user works in UTC with weeks starting on Sunday (en-US), so "today" is the UTC day.
    ``last-x-*`` runs from the start of the day (or the hour) X units ago up to now; ``next-x-*`` from
    now to the end of the day X units ahead; ``olderthan-x-*`` is everything before now minus X.
    """
    from datetime import timedelta

    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    d1 = timedelta(days=1)
    n = 0
    if DATE_OPERATORS.get(op) == "x":
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise FilterError(f"The operator '{op}' needs a whole number, not '{value}'.") from None
    if op in ("on", "on-or-after", "on-or-before"):
        try:
            when = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
        except ValueError:
            raise FilterError(f"The operator '{op}' needs a date, not '{value}'.") from None
        start = datetime(when.year, when.month, when.day, tzinfo=UTC)
        return {"on": (start, start + d1, False), "on-or-after": (start, None, False),
                "on-or-before": (None, start + d1, False)}[op]
    week = day - timedelta(days=(day.weekday() + 1) % 7)
    month = _add_months(day.date(), 0)
    m0 = datetime(month.year, month.month, 1, tzinfo=UTC)

    def mstart(k: int) -> datetime:
        d = _add_months(month, k)
        return datetime(d.year, d.month, 1, tzinfo=UTC)

    y0 = datetime(day.year, 1, 1, tzinfo=UTC)
    unit = {"minutes": timedelta(minutes=n), "hours": timedelta(hours=n), "days": timedelta(days=n),
            "weeks": timedelta(weeks=n)}
    fixed: dict[str, tuple[datetime | None, datetime | None, bool]] = {
        "today": (day, day + d1, False), "yesterday": (day - d1, day, False), "tomorrow": (day + d1, day + 2 * d1, False),
        "this-week": (week, week + 7 * d1, False), "last-week": (week - 7 * d1, week, False),
        "next-week": (week + 7 * d1, week + 14 * d1, False),
        "this-month": (m0, mstart(1), False), "last-month": (mstart(-1), m0, False),
        "next-month": (mstart(1), mstart(2), False),
        "this-year": (y0, y0.replace(year=y0.year + 1), False), "last-year": (y0.replace(year=y0.year - 1), y0, False),
        "next-year": (y0.replace(year=y0.year + 1), y0.replace(year=y0.year + 2), False),
        "last-seven-days": (day - 7 * d1, now, True), "next-seven-days": (now, day + 8 * d1, False),
    }
    if op in fixed:
        return fixed[op]
    kind, _, what = op.rpartition("-")
    if kind == "olderthan-x":
        if what in unit:
            return None, now - unit[what], False
        return None, datetime.combine(_add_months(now.date(), -n * (12 if what == "years" else 1)).replace(
            day=min(now.day, 28)), now.timetz()), False
    if kind == "last-x":
        if what == "hours":
            return now - unit["hours"], now, True
        if what in ("days", "weeks"):
            return day - unit[what], now, True
        d = _add_months(now.date(), -n * (12 if what == "years" else 1))
        return datetime(d.year, d.month, min(now.day, 28), tzinfo=UTC), now, True
    if kind == "next-x":
        if what == "hours":
            return now, now + unit["hours"], True
        if what in ("days", "weeks"):
            return now, day + unit[what] + d1, False
        d = _add_months(now.date(), n * (12 if what == "years" else 1))
        return now, datetime(d.year, d.month, min(now.day, 28), tzinfo=UTC) + d1, False
    raise FilterError(f"The operator '{op}' is not supported by the emulator.")


def window_sql(sql: str, edm: str, window: tuple[datetime | None, datetime | None, bool],
               params: list[Any]) -> str:
    """SQL for ``sql`` (a stored UTC ``...Z`` date-time or ``YYYY-MM-DD`` date) inside ``window``."""
    low, high, inclusive = window

    def text(when: datetime) -> str:
        return when.date().isoformat() if edm == "Edm.Date" else when.strftime("%Y-%m-%dT%H:%M:%SZ")

    parts = []
    if low is not None:
        parts.append(f"{sql} >= ?")
        params.append(text(low))
    if high is not None:
        parts.append(f"{sql} {'<=' if inclusive else '<'} ?")
        params.append(text(high))
    return "(" + " AND ".join(parts or ["1"]) + f" AND {sql} IS NOT NULL)"


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # lit, ident, alias, (, ), ',', '=', [, ], end
    value: Any
    pos: int


def _unterminated(pos: int, text: str) -> FilterError:
    return FilterError(f"There is an unterminated literal at position {pos} in '{text}'.")


def _syntax(pos: int, text: str) -> FilterError:
    return FilterError(f"Syntax error at position {pos} in '{text}'.")


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "(),=[]:":
            toks.append(_Tok(ch, ch, i))
            i += 1
            continue
        if ch == "'" or ch == '"':
            # Single quotes delimit OData strings; double quotes only appear inside the JSON-like
            # PropertyValues arrays of Dataverse query functions (protocols.md §1.6).
            start, i, buf = i, i + 1, []
            while True:
                if i >= n:
                    raise _unterminated(start, text)
                if text[i] == ch:
                    if ch == "'" and i + 1 < n and text[i + 1] == "'":
                        buf.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                if ch == '"' and text[i] == "\\" and i + 1 < n:
                    buf.append(text[i + 1])
                    i += 2
                    continue
                buf.append(text[i])
                i += 1
            toks.append(_Tok("lit", Literal("string", "".join(buf), start), start))
            continue
        for kind, rx in (("guid", _GUID), ("datetime", _DATETIME), ("date", _DATE)):
            m = rx.match(text, i)
            if m:
                toks.append(_Tok("lit", Literal(kind, _convert(kind, m.group(0), i, text), i), i))
                i = m.end()
                break
        else:
            m = _NUMBER.match(text, i)
            if m:
                toks.append(_Tok("lit", Literal(*_number(m.group(0)), i), i))
                i = m.end()
                continue
            m = _ALIAS.match(text, i)
            if m:
                toks.append(_Tok("alias", m.group(0), i))
                i = m.end()
                continue
            m = _IDENT.match(text, i)
            if m:
                word = m.group(0)
                low = word.lower()
                if low in ("true", "false"):
                    toks.append(_Tok("lit", Literal("bool", low == "true", i), i))
                elif low == "null":
                    toks.append(_Tok("lit", Literal("null", None, i), i))
                else:
                    toks.append(_Tok("ident", word, i))
                i = m.end()
                continue
            raise _syntax(i, text)
    toks.append(_Tok("end", None, n))
    return toks


def _number(raw: str) -> tuple[str, Any]:
    body = raw.rstrip("mMdDfFlL")
    if re.fullmatch(r"-?\d+", body):
        return "int", int(body)
    return "decimal", Decimal(body)


def _convert(kind: str, raw: str, pos: int, text: str) -> Any:
    try:
        if kind == "guid":
            return str(uuid.UUID(raw))
        if kind == "date":
            return date.fromisoformat(raw)
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    except ValueError:
        raise FilterError(f"Unrecognized '{_EDM_OF_KIND.get(kind, kind)}' literal '{raw}' at '{pos}' "
                          f"in '{text}'.") from None


_EDM_OF_KIND = {"string": "Edm.String", "int": "Edm.Int32", "decimal": "Edm.Decimal", "bool": "Edm.Boolean",
                "guid": "Edm.Guid", "date": "Edm.Date", "datetime": "Edm.DateTimeOffset"}

# -- parser ---------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, aliases: Mapping[str, str]) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.aliases = aliases

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str) -> _Tok:
        tok = self.take()
        if tok.kind != kind:
            raise _syntax(tok.pos, self.text)
        return tok

    def keyword(self, *words: str) -> str | None:
        tok = self.peek()
        if tok.kind == "ident" and tok.value.lower() in words:
            self.i += 1
            return str(tok.value).lower()
        return None

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise FilterError(f"Syntax error: the $filter expression is empty in '{self.text}'.")
        node = self.or_expr()
        if self.peek().kind != "end":
            raise _syntax(self.peek().pos, self.text)
        return node

    def or_expr(self) -> Node:
        node = self.and_expr()
        while self.keyword("or"):
            node = Logical("or", node, self.and_expr())
        return node

    def and_expr(self) -> Node:
        node = self.not_expr()
        while self.keyword("and"):
            node = Logical("and", node, self.not_expr())
        return node

    def not_expr(self) -> Node:
        if self.keyword("not"):
            return Not(self.not_expr())
        return self.comparison()

    def comparison(self) -> Node:
        left = self.primary()
        tok = self.peek()
        if tok.kind == "ident" and tok.value.lower() in _COMPARE_OPS:
            self.i += 1
            right = self.primary()
            return Compare(tok.value.lower(), left, right, tok.pos)
        if tok.kind == "ident" and tok.value.lower() == "in" and self.toks[self.i + 1].kind == "(":
            self.i += 2
            values: list[Literal] = []
            while True:
                item = self.take()
                if item.kind != "lit":
                    raise _syntax(item.pos, self.text)
                values.append(item.value)
                if self.peek().kind == ",":
                    self.i += 1
                    continue
                break
            self.expect(")")
            return InList(left, tuple(values), tok.pos)
        return left

    def primary(self) -> Node:
        tok = self.take()
        if tok.kind == "(":
            node = self.or_expr()
            self.expect(")")
            return node
        if tok.kind == "lit":
            lit: Literal = tok.value
            return lit
        if tok.kind == "alias":
            return self.alias(tok)
        if tok.kind == "ident":
            head, _, last = str(tok.value).rpartition("/")
            if head and last.lower() in ("any", "all") and self.peek().kind == "(":
                return self.lambda_(tok, head, last.lower())
            if self.peek().kind == "(":
                return self.call(tok)
            return Member(tok.value, tok.pos)
        raise _syntax(tok.pos, self.text)

    def lambda_(self, tok: _Tok, path: str, op: str) -> Node:
        self.expect("(")
        if self.peek().kind == ")":
            self.i += 1
            if op == "all":
                raise _syntax(tok.pos, self.text)
            return Lambda(path, op, "", None, tok.pos)
        var = self.expect("ident")
        if "/" in str(var.value) or "." in str(var.value):
            raise _syntax(var.pos, self.text)
        self.expect(":")
        body = self.or_expr()
        self.expect(")")
        return Lambda(path, op, str(var.value), body, tok.pos)

    def alias(self, tok: _Tok) -> Node:
        # An alias with no value in the query string means null (query/overview.md).
        raw = self.aliases.get(tok.value)
        if raw is None:
            return Literal("null", None, tok.pos)
        sub = _Parser(raw, {})
        node = sub.primary()
        if sub.peek().kind != "end" or not isinstance(node, Literal | Member):
            raise FilterError(f"The parameter alias '{tok.value}' has an invalid value '{raw}'.")
        return node

    def call(self, name_tok: _Tok) -> Node:
        name = str(name_tok.value)
        low = name.lower()
        self.expect("(")
        args: list[Node] = []
        if self.peek().kind != ")":
            while True:
                args.append(self.argument())
                if self.peek().kind == ",":
                    self.i += 1
                    continue
                break
        self.expect(")")
        if low in _STRING_FUNCS or (low.startswith(_CRM) and (low[len(_CRM):] in _CRM_FUNCS
                                                               or low[len(_CRM):] in _FUNCTION_OPERATORS)):
            return Call(low, tuple(args), name_tok.pos)
        if low.startswith(_CRM):
            raise FilterError(f"The query function '{name}' is not supported by the emulator.")
        raise FilterError(f"An unknown function with name '{name}' was found. This may also be a function "
                          "import or a key lookup on a navigation property, which is not allowed.")

    def argument(self) -> Node:
        tok = self.peek()
        if tok.kind == "ident" and self.toks[self.i + 1].kind == "=":
            self.i += 2
            if self.peek().kind == "[":
                return Named(tok.value, self.array(), tok.pos)
            value = self.take()
            if value.kind != "lit":
                raise _syntax(value.pos, self.text)
            return Named(tok.value, value.value, tok.pos)
        return self.or_expr()

    def array(self) -> list[Literal]:
        self.expect("[")
        items: list[Literal] = []
        while self.peek().kind != "]":
            tok = self.take()
            if tok.kind != "lit":
                raise _syntax(tok.pos, self.text)
            items.append(tok.value)
            if self.peek().kind == ",":
                self.i += 1
        self.expect("]")
        return items


def parse_filter(text: str, aliases: Mapping[str, str] | None = None) -> Node:
    """Parse ``$filter`` text into an AST (raises :class:`FilterError`)."""
    return _Parser(text, aliases or {}).parse()


# -- compiler -------------------------------------------------------------------------------------------

_NUMERIC = {"Edm.Int32", "Edm.Int64", "Edm.Decimal", "Edm.Double", "Edm.Int16", "Edm.Byte"}


def fold(value: Any) -> Any:
    """Case-fold a string the way the emulator compares strings (Dataverse collations are case-insensitive)."""
    return value.casefold() if isinstance(value, str) else value


def _json_text(raw: Any) -> Any:
    if not isinstance(raw, str):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return fold(value) if isinstance(value, str) else None


def _match(text: Any, kind: str, needle: str) -> int | None:
    if not isinstance(text, str):
        return None
    if kind == "startswith":
        return int(text.startswith(needle))
    if kind == "endswith":
        return int(text.endswith(needle))
    return int(needle in text)


def register_functions(conn: sqlite3.Connection) -> None:
    """Register the SQL functions compiled filters may call (cheap; safe to call per request)."""
    conn.create_function(FOLD_FUNCTION, 1, fold, deterministic=True)
    conn.create_function(JSON_TEXT_FUNCTION, 1, _json_text, deterministic=True)
    conn.create_function(MATCH_FUNCTION, 3, _match, deterministic=True)


def json_text_sql(sql: str) -> str | None:
    """For ``json_extract(data, '$.x')``, the expression giving that value as JSON text (NULs kept escaped)."""
    m = _JSON_FIELD.fullmatch(sql)
    return f"({m.group(1)} -> {m.group(2)})" if m else None


_NUL_ESCAPE = "'\\u0000'"


class _Compiler:
    def __init__(self, text: str, resolve: Resolver, lambdas: LambdaCompiler | None = None) -> None:
        self.text = text
        self.resolve = resolve
        self.lambdas = lambdas
        self.params: list[Any] = []

    def nested(self, resolve: Resolver, lambdas: LambdaCompiler | None) -> _Compiler:
        """A compiler for a lambda body: its own resolver, sharing this one's bound parameters (text order)."""
        sub = _Compiler(self.text, resolve, lambdas)
        sub.params = self.params
        return sub

    def node(self, n: Node) -> str:
        if isinstance(n, Logical):
            return f"({self.node(n.left)} {n.op.upper()} {self.node(n.right)})"
        if isinstance(n, Not):
            # NULL-safe negation: "not contains(x,'a')" must match rows where x is null, as SQL Server does
            # for Dataverse (a null column does not contain anything).
            return f"(NOT coalesce({self.node(n.operand)}, 0))"
        if isinstance(n, Compare):
            return self.compare(n)
        if isinstance(n, Call):
            return self.call(n)
        if isinstance(n, InList):
            raise FilterError(f"The 'in' operator at position {n.pos} in '{self.text}' is not supported: use "
                              "Microsoft.Dynamics.CRM.In(PropertyName=...,PropertyValues=[...]).")
        if isinstance(n, Lambda):
            return self.lambda_(n)
        if isinstance(n, Literal) and n.kind == "bool":
            return "1" if n.value else "0"
        if isinstance(n, Member):
            field = self.resolve(n.path)
            if field.edm == "Edm.Boolean":
                return f"({field.sql} = 1)"
        raise FilterError(f"The $filter expression at position {getattr(n, 'pos', 0)} in '{self.text}' "
                          "is not a boolean condition.")

    def lambda_(self, n: Lambda) -> str:
        """any/all over a collection: the resolver maps ``nav/any`` to a correlated subquery (Dataverse)."""
        if self.lambdas is None:
            raise FilterError(f"The lambda operator '{n.op}' at position {n.pos} in '{self.text}' is not supported "
                              "on this resource.")
        return self.lambdas(self, n)

    def _mismatch(self, op: str, left: str, right: str) -> FilterError:
        return FilterError(f"A binary operator with incompatible types was detected. Found operand types "
                           f"'{left}' and '{right}' for operator kind '{_OP_NAMES.get(op, op)}'.")

    def compare(self, n: Compare) -> str:
        left, right, op = n.left, n.right, n.op
        if isinstance(left, Literal) and isinstance(right, Member):
            # '5 lt numberofemployees' reads as 'numberofemployees gt 5'.
            left, right = right, left
            op = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}.get(op, op)
        sql_op = _COMPARE_OPS[op]
        if not isinstance(left, Member):
            raise FilterError(f"The left side of the '{op}' operator at position {n.pos} in '{self.text}' "
                              "must be a property of the table.")
        field = self.resolve(left.path)
        if isinstance(right, Member):
            other = self.resolve(right.path)
            if not _compatible(field.edm, other.edm):
                raise self._mismatch(op, field.edm, other.edm)
            collate = " COLLATE NOCASE" if field.edm in ("Edm.String", "Edm.Guid") else ""
            return f"({field.sql} {sql_op} {other.sql}{collate})"
        if not isinstance(right, Literal):
            raise _syntax(n.pos, self.text)
        if right.kind == "null":
            if op not in ("eq", "ne"):
                return "0"
            return f"({field.sql} IS {'NOT ' if op == 'ne' else ''}NULL)"
        value, collate = self.literal_for(field, right, op)
        raw = json_text_sql(field.sql) if field.edm == "Edm.String" else None
        if raw is not None and "\0" in str(value):
            # json_extract cuts a string at its first NUL: compare the whole JSON string in Python.
            self.params.append(fold(value))
            expr = f"{JSON_TEXT_FUNCTION}({raw}) {sql_op} ?"
            return f"({expr} OR {field.sql} IS NULL)" if op == "ne" else f"({expr})"
        self.params.append(value)
        if raw is not None and op in ("eq", "ne"):
            # A stored string holding a NUL must not equal the part before it (json_extract's truncation).
            collated = f"{FOLD_FUNCTION}({field.sql}) = ?" if collate == "fold" else f"{field.sql} = ?{collate}"
            expr = f"({collated} AND instr({raw}, {_NUL_ESCAPE}) = 0)"
            return f"(NOT coalesce({expr}, 0))" if op == "ne" else f"({expr})"
        if collate == "fold":
            expr = f"{FOLD_FUNCTION}({field.sql}) {sql_op} ?"
        else:
            expr = f"{field.sql} {sql_op} ?{collate}"
        if op == "ne":
            # OData 'ne' is true for nulls ("name ne 'x'" returns rows with no name), like Dataverse.
            return f"({expr} OR {field.sql} IS NULL)"
        return f"({expr})"

    def literal_for(self, field: FieldRef, lit: Literal, op: str) -> tuple[Any, str]:
        """The bound parameter for ``lit`` compared with ``field`` and the collation suffix to use."""
        edm = field.edm
        if edm == "Edm.Guid":
            if lit.kind == "guid":
                return lit.value, " COLLATE NOCASE"
            if lit.kind == "string":
                # The docs show quoted GUIDs next to the spec's bare form; accept both (protocols.md §1.6).
                try:
                    return str(uuid.UUID(lit.value)), " COLLATE NOCASE"
                except ValueError:
                    raise FilterError(f"Unrecognized 'Edm.Guid' literal '{lit.value}' at '{lit.pos}' in "
                                      f"'{self.text}'.") from None
        elif edm == "Edm.String":
            if lit.kind == "string":
                text = str(lit.value)
                if text.isascii():
                    return text, " COLLATE NOCASE"
                return fold(text), "fold"
        elif edm in _NUMERIC:
            if lit.kind == "int":
                return lit.value, ""
            if lit.kind == "decimal":
                return float(lit.value), ""
        elif edm == "Edm.Boolean":
            if lit.kind == "bool":
                return (1 if lit.value else 0), ""
        elif edm == "Edm.DateTimeOffset":
            if lit.kind == "datetime":
                return lit.value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), ""
            if lit.kind == "date":
                # A bare date against a date-time column means midnight UTC that day.
                return lit.value.isoformat() + "T00:00:00Z", ""
        elif edm == "Edm.Date":
            if lit.kind == "date":
                return lit.value.isoformat(), ""
            if lit.kind == "datetime":
                return lit.value.astimezone(UTC).date().isoformat(), ""
        raise self._mismatch(op, edm, _EDM_OF_KIND.get(lit.kind, lit.kind))

    def call(self, n: Call) -> str:
        if n.name in _STRING_FUNCS:
            return self.string_function(n)
        return self.crm_function(n)

    def string_function(self, n: Call) -> str:
        if len(n.args) != 2 or not isinstance(n.args[0], Member) or not isinstance(n.args[1], Literal):
            raise FilterError(f"The function '{n.name}' at position {n.pos} in '{self.text}' takes a "
                              "property and a string literal.")
        field = self.resolve(n.args[0].path)
        lit = n.args[1]
        if field.edm != "Edm.String" or lit.kind != "string":
            raise FilterError(f"No function signature for the function with name '{n.name}' matches the "
                              f"specified arguments. The function signatures considered are: "
                              f"{n.name}(Edm.String Nullable=true, Edm.String).")
        # Dataverse honours SQL LIKE wildcards (%, _) inside these functions (filter-rows.md).
        text = str(lit.value)
        raw = json_text_sql(field.sql)
        if raw is not None:
            # Values holding a NUL (which json_extract and LIKE cut short) are matched in Python.
            self.params += [fold(text)]
            slow = f"{MATCH_FUNCTION}({JSON_TEXT_FUNCTION}({raw}), '{n.name}', ?)"
            if "\0" in text:
                return f"({slow})"
            fast = self.string_function_sql(n.name, field, text)
            self.params.append(self.params.pop(-2))  # the slow branch's needle goes after the fast one's
            return f"(CASE WHEN instr({raw}, {_NUL_ESCAPE}) = 0 THEN {fast} ELSE {slow} END)"
        return self.string_function_sql(n.name, field, text)

    def string_function_sql(self, name: str, field: FieldRef, text: str) -> str:
        pattern = {"contains": f"%{text}%", "startswith": f"{text}%", "endswith": f"%{text}"}[name]
        if text.isascii():
            self.params.append(pattern)
            return f"({field.sql} LIKE ?)"  # SQLite LIKE is case-insensitive for ASCII
        self.params.append(fold(pattern))
        return f"({FOLD_FUNCTION}({field.sql}) LIKE ?)"

    def crm_function(self, n: Call) -> str:
        fname = n.name[len(_CRM):]
        named = {a.name.lower(): a for a in n.args if isinstance(a, Named)}
        if fname in _FUNCTION_OPERATORS:
            return self.date_function(n, _FUNCTION_OPERATORS[fname], named)
        prop = named.get("propertyname")
        values = named.get("propertyvalues")
        if prop is None or values is None or not isinstance(prop.value, Literal) \
                or not isinstance(values.value, list):
            raise FilterError(f"The function 'Microsoft.Dynamics.CRM.{fname}' needs PropertyName and "
                              "PropertyValues parameters.")
        field = self.resolve(str(prop.value.value))
        literals = [self._array_literal(field, item) for item in values.value]
        params = []
        collate = ""
        for lit in literals:
            value, collate = self.literal_for(field, lit, "eq")
            params.append(value)
        if fname in ("between", "notbetween"):
            if len(params) != 2:
                raise FilterError("Between and NotBetween take exactly two PropertyValues.")
            self.params.extend(params)
            expr = f"({field.sql} BETWEEN ? AND ?)"
            return expr if fname == "between" else f"(NOT coalesce({expr}, 0))"
        if not params:
            raise FilterError(f"The function 'Microsoft.Dynamics.CRM.{fname}' needs at least one value.")
        self.params.extend(params)
        target = f"{FOLD_FUNCTION}({field.sql})" if collate == "fold" else field.sql
        suffix = collate if collate != "fold" else ""
        expr = f"({target}{suffix} IN ({', '.join('?' * len(params))}))"
        return expr if fname == "in" else f"(NOT coalesce({expr}, 0))"

    def date_function(self, n: Call, op: str, named: Mapping[str, Named]) -> str:
        """LastXDays, Today, ThisMonth, On ... (query functions on date columns)."""
        prop = named.get("propertyname")
        if prop is None or not isinstance(prop.value, Literal):
            raise FilterError(f"The function '{n.name}' needs a PropertyName parameter.")
        field = self.resolve(str(prop.value.value))
        if field.edm not in ("Edm.DateTimeOffset", "Edm.Date"):
            raise FilterError(f"The function '{n.name}' applies to date and time columns; "
                              f"'{prop.value.value}' is {field.edm}.")
        value: Any = None
        if DATE_OPERATORS[op]:
            arg = named.get("propertyvalue")
            if arg is None or not isinstance(arg.value, Literal):
                raise FilterError(f"The function '{n.name}' needs a PropertyValue parameter.")
            value = arg.value.value
        return window_sql(field.sql, field.edm, date_window(op, value, datetime.now(UTC)), self.params)

    def _array_literal(self, field: FieldRef, item: Literal) -> Literal:
        # PropertyValues are JSON strings ("5", "2000"); reinterpret them as the column's type.
        if item.kind != "string" or field.edm == "Edm.String":
            return item
        raw = str(item.value)
        if field.edm in _NUMERIC:
            try:
                kind, value = _number(raw)
            except InvalidOperation:
                kind, value = "string", raw
            return Literal(kind, value, item.pos) if re.fullmatch(r"-?\d+(\.\d+)?", raw) else item
        if field.edm == "Edm.Boolean" and raw.lower() in ("true", "false", "1", "0"):
            return Literal("bool", raw.lower() in ("true", "1"), item.pos)
        if field.edm in ("Edm.DateTimeOffset", "Edm.Date"):
            kind = "date" if _DATE.fullmatch(raw) else "datetime"
            return Literal(kind, _convert(kind, raw, item.pos, self.text), item.pos)
        return item


def _compatible(a: str, b: str) -> bool:
    if a == b:
        return True
    return (a in _NUMERIC and b in _NUMERIC) or {a, b} == {"Edm.Date", "Edm.DateTimeOffset"}


def compile_filter(text: str, resolve: Resolver, aliases: Mapping[str, str] | None = None, *,
                   lambdas: LambdaCompiler | None = None) -> tuple[str, list[Any]]:
    """Compile ``$filter`` text into a SQL condition and its bound parameters.

    Args:
        text: The ``$filter`` value as received (already URL-decoded).
        resolve: Maps a property path (``name``, ``_ownerid_value``, ``primarycontactid/fullname``) to a
            :class:`FieldRef`; raises :class:`FilterError` for names the table does not have.
        aliases: Query-string parameter aliases (``{"@p1": "'x'"}``).

    Returns:
        ``(where_sql, params)``; the SQL uses only ``?`` placeholders for values.

    Raises:
        FilterError: For syntax errors, unknown functions, type mismatches and unterminated literals.
    """
    tree = parse_filter(text, aliases)
    compiler = _Compiler(text, resolve, lambdas)
    return compiler.node(tree), compiler.params
