"""Graph OData query options for the emulator: $filter to SQL, $select, $orderby, $top, opaque tokens.

Pure functions over strings; the route module (:mod:`bridgekit.emulator.graph`) turns :class:`QueryError`
into Graph's error JSON. Property names are checked against the resource's fields before they reach SQL,
and every literal is a bound parameter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "DIRECTORY",
    "OUTLOOK",
    "Order",
    "QueryError",
    "TokenCodec",
    "json_path",
    "parse_filter",
    "parse_orderby",
    "parse_select",
    "parse_top",
]

#: Dialects: directory objects (users, groups) and Outlook items (messages, events, contacts) differ in
#: which filter operators they accept and in how they word their errors (protocols.md §2.5, §2.6).
DIRECTORY = "directory"
OUTLOOK = "outlook"


class QueryError(Exception):
    """A query option Graph would refuse: carries the HTTP status and Graph error code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def json_path(prop: str) -> str:
    """SQL for a property path (``from/emailAddress/address``) inside the record's JSON ``data``.

    Top-level properties are spelled exactly like :meth:`Store.field` so expression indexes apply.
    """
    parts = [p.replace('"', "").replace("'", "") for p in prop.split("/")]
    return "json_extract(data, '$" + "".join(f'."{p}"' for p in parts) + "')"


# -- $select ----------------------------------------------------------------------------------------

def parse_select(raw: str | None, *, fields: tuple[str, ...], type_name: str,
                 extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The properties named by ``$select`` (None when absent); unknown names raise ``QueryError``."""
    if raw is None or not raw.strip():
        return None
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    known = set(fields) | set(extra)
    for n in names:
        if known and n not in known and n != "*":
            raise QueryError("Request_BadRequest" if type_name.startswith("microsoft.graph.user")
                             or type_name.startswith("microsoft.graph.group") else "BadRequest",
                             f"Could not find a property named '{n}' on type '{type_name}'.")
    return None if "*" in names else names


# -- $top -------------------------------------------------------------------------------------------

def parse_top(raw: str | None, *, default: int, maximum: int, dialect: str) -> int:
    """The page size asked by ``$top``: the resource default when absent, an error outside ``1..maximum``."""
    if raw is None:
        return default
    try:
        top = int(raw.strip())
    except ValueError:
        raise QueryError("BadRequest", f"Invalid value '{raw}' for query option '$top'.") from None
    if 1 <= top <= maximum:
        return top
    if dialect == DIRECTORY:
        # Seen verbatim in answers on Microsoft Q&A (protocols.md §2.1).
        raise QueryError("Request_BadRequest",
                         f"Invalid page size specified: '{top}'. Must be between 1 and {maximum} inclusive.")
    raise QueryError("ErrorInvalidUrlQuery",
                     f"The value '{top}' of parameter 'Top' should be between 1 and {maximum}.")


# -- $orderby ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Order:
    """One sort key: a property path and its direction."""

    prop: str
    desc: bool

    @property
    def sql(self) -> str:
        # Missing values sort as '' so the keyset comparison below never meets NULL.
        return f"coalesce({json_path(self.prop)}, '')"


def parse_orderby(raw: str | None, *, allowed: tuple[str, ...], dialect: str,
                  type_name: str) -> tuple[Order, ...]:
    """Sort keys from ``$orderby``; properties outside ``allowed`` raise ``QueryError``."""
    if raw is None or not raw.strip():
        return ()
    out: list[Order] = []
    for part in raw.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise QueryError("BadRequest", f"Invalid $orderby expression '{part.strip()}'.")
        prop = words[0]
        if prop not in allowed:
            if dialect == DIRECTORY:
                raise QueryError("Request_UnsupportedQuery",
                                 f"Sorting by property '{prop}' of resource '{type_name}' is not supported.")
            raise QueryError("ErrorInvalidProperty", f"The property '{prop}' does not support sorting.")
        out.append(Order(prop, len(words) == 2 and words[1].lower() == "desc"))
    return tuple(out)


# -- $filter ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>'(?:[^']|'')*')
    | (?P<dt>\d{4}-\d{2}-\d{2}(?:T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<punct>[(),:])
    | (?P<word>[A-Za-z_@][A-Za-z0-9_@./]*)
    )""", re.VERBOSE)
_COMPARE = {"eq": "=", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str


def _tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise QueryError("BadRequest", f"Invalid filter clause: syntax error at position {pos} in '{text}'.")
        kind = m.lastgroup or ""
        out.append(_Tok(kind, m.group(kind)))
        pos = m.end()
    return out


def _utc_literal(text: str) -> str:
    """A DateTimeOffset literal as the UTC ``YYYY-MM-DDTHH:MM:SSZ`` text the records use."""
    if "T" not in text:
        return text
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError("BadRequest", f"Invalid filter clause: '{text}' is not a valid DateTimeOffset.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _FilterParser:
    """Recursive descent over or / and / not / comparisons / startswith, endswith / in."""

    def __init__(self, text: str, fields: tuple[str, ...], dialect: str, advanced: bool, type_name: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0
        self.fields = set(fields)
        self.dialect = dialect
        self.advanced = advanced
        self.type_name = type_name
        self.params: list[Any] = []

    # helpers
    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise QueryError("BadRequest", "Invalid filter clause: the expression ends too early.")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            raise QueryError("BadRequest", f"Invalid filter clause: expected '{text}' but found '{tok.text}'.")

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "word" and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    def unsupported(self, prop: str) -> QueryError:
        if self.dialect == DIRECTORY:
            return QueryError("Request_UnsupportedQuery", "Unsupported or invalid query filter clause specified "
                              f"for property '{prop}' of resource '{self.type_name}'.")
        return QueryError("ErrorInvalidUrlQueryFilter", "The query filter contains one or more invalid nodes.")

    def needs_advanced(self, prop: str) -> None:
        # ne / not / endswith on directory objects are advanced queries: they need ConsistencyLevel:
        # eventual and $count=true (protocols.md §2.5).
        if self.dialect == DIRECTORY and not self.advanced:
            raise self.unsupported(prop)

    def prop(self, tok: _Tok) -> str:
        if tok.kind != "word" or tok.text.lower() in ("true", "false", "null"):
            raise QueryError("BadRequest", f"Invalid filter clause: expected a property but found '{tok.text}'.")
        name = tok.text
        if self.fields and name.split("/")[0] not in self.fields:
            raise QueryError("Request_BadRequest" if self.dialect == DIRECTORY else "BadRequest",
                             f"Could not find a property named '{name.split('/')[0]}' on type "
                             f"'{self.type_name}'.")
        return name

    def literal(self, tok: _Tok) -> Any:
        if tok.kind == "str":
            return tok.text[1:-1].replace("''", "'")
        if tok.kind == "dt":
            return _utc_literal(tok.text)
        if tok.kind == "num":
            return float(tok.text) if "." in tok.text else int(tok.text)
        if tok.kind == "word" and tok.text.lower() in ("true", "false"):
            return 1 if tok.text.lower() == "true" else 0
        if tok.kind == "word" and tok.text.lower() == "null":
            return None
        raise QueryError("BadRequest", f"Invalid filter clause: expected a literal but found '{tok.text}'.")

    # grammar
    def parse(self) -> str:
        sql = self.or_expr()
        if self.peek() is not None:
            raise QueryError("BadRequest", f"Invalid filter clause: unexpected '{self.take().text}'.")
        return sql

    def or_expr(self) -> str:
        parts = [self.and_expr()]
        while self.keyword("or"):
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def and_expr(self) -> str:
        parts = [self.not_expr()]
        while self.keyword("and"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def not_expr(self) -> str:
        if self.keyword("not"):
            self.needs_advanced("not")
            return f"NOT coalesce({self.not_expr()}, 0)"
        return self.primary()

    def primary(self) -> str:
        tok = self.take()
        if tok.text == "(":
            inner = self.or_expr()
            self.expect(")")
            return inner
        nxt = self.peek()
        if tok.kind == "word" and "/" in tok.text and tok.text.split("/")[-1].lower() in ("any", "all"):
            # Lambda operators over collections (assignedLicenses/any(...)) are not emulated.
            raise self.unsupported(tok.text.split("/")[0])
        if tok.kind == "word" and nxt is not None and nxt.text == "(":
            return self.function(tok.text)
        prop = self.prop(tok)
        op_tok = self.take()
        op = op_tok.text.lower()
        if op == "in":
            return self.in_list(prop)
        if op not in _COMPARE:
            raise QueryError("BadRequest", f"Invalid filter clause: unknown operator '{op_tok.text}'.")
        if op == "ne":
            self.needs_advanced(prop)
        value = self.literal(self.take())
        expr = json_path(prop)
        if value is None:
            if op not in ("eq", "ne"):
                raise self.unsupported(prop)
            return f"{expr} IS {'NOT ' if op == 'ne' else ''}NULL"
        self.params.append(value)
        # Graph compares strings case-insensitively (userPrincipalName eq 'ADELEV@...' matches).
        collate = " COLLATE NOCASE" if isinstance(value, str) else ""
        return f"{expr} {_COMPARE[op]} ?{collate}"

    def in_list(self, prop: str) -> str:
        self.expect("(")
        values: list[Any] = []
        while True:
            values.append(self.literal(self.take()))
            tok = self.take()
            if tok.text == ")":
                break
            if tok.text != ",":
                raise QueryError("BadRequest", "Invalid filter clause: expected ',' or ')' in an 'in' list.")
        if self.dialect != DIRECTORY:
            raise self.unsupported(prop)
        self.params.extend(values)
        marks = ", ".join("?" for _ in values)
        return f"{json_path(prop)} COLLATE NOCASE IN ({marks})"

    def function(self, name: str) -> str:
        fn = name.lower()
        self.expect("(")
        prop = self.prop(self.take())
        self.expect(",")
        value = self.literal(self.take())
        self.expect(")")
        if fn not in ("startswith", "endswith") or not isinstance(value, str):
            raise self.unsupported(prop)
        if fn == "endswith":
            if self.dialect != DIRECTORY:
                raise self.unsupported(prop)
            self.needs_advanced(prop)
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        # SQLite's LIKE is case-insensitive for ASCII, like Graph's startswith.
        self.params.append(escaped + "%" if fn == "startswith" else "%" + escaped)
        return f"{json_path(prop)} LIKE ? ESCAPE '\\'"


def parse_filter(text: str, *, fields: tuple[str, ...], dialect: str, advanced: bool = False,
                 type_name: str = "") -> tuple[str, list[Any]]:
    """Translate a ``$filter`` expression into a SQL condition over ``data`` and its parameters.

    Supported: ``eq ne gt ge lt le`` on properties (including ``a/b`` paths), ``startswith``, ``endswith``
    (directory, advanced), ``in`` (directory), ``and``/``or``/``not`` and parentheses. Lambda operators
    (``any``/``all``) and other functions raise :class:`QueryError` with the dialect's error code.
    """
    parser = _FilterParser(text, fields, dialect, advanced, type_name)
    return parser.parse(), parser.params


# -- opaque tokens ----------------------------------------------------------------------------------

class TokenCodec:
    """Signs and reads the opaque ``$skiptoken`` / ``$deltatoken`` values (base64url JSON + HMAC tag).

    The tag keeps clients from editing a token into a position or version it was never given; Graph's
    own tokens are opaque too (protocols.md §2.2).
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _tag(self, body: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()[:12]).decode()

    def encode(self, payload: dict[str, Any]) -> str:
        """An opaque URL-safe token for ``payload``."""
        body = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=")
        return body.decode() + "." + self._tag(body)

    def decode(self, token: str) -> dict[str, Any] | None:
        """The payload of a token this codec made, or None when it is malformed or was altered."""
        body, _, tag = token.strip().rpartition(".")
        if not body or not hmac.compare_digest(tag, self._tag(body.encode())):
            return None
        try:
            payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, orjson.JSONDecodeError):
            return None
        return payload if isinstance(payload, dict) else None
