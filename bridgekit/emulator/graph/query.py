"""Graph OData query options for the emulator: $filter to SQL, $select, $orderby, $top, opaque tokens.

Pure functions over strings; the route module (:mod:`bridgekit.emulator.graph.api`) turns :class:`QueryError`
into Graph's error JSON. Property names are checked against the resource's fields before they reach SQL,
and every literal is a bound parameter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson

from bridgekit.emulator.odata_filter import (
    Call,
    Compare,
    FilterError,
    InList,
    Lambda,
    Literal,
    Logical,
    Member,
    Node,
    Not,
)
from bridgekit.emulator.odata_filter import parse_filter as parse_ast

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

_COMPARE = {"eq": "=", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_FLIP = {"eq": "eq", "ne": "ne", "gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}


class _FilterCompiler:
    """Compiles the OData AST (parsed by the Dataverse emulator's parser) with Graph's rules and errors."""

    def __init__(self, fields: tuple[str, ...], dialect: str, advanced: bool, type_name: str) -> None:
        self.fields = set(fields)
        self.dialect = dialect
        self.advanced = advanced
        self.type_name = type_name
        self.params: list[Any] = []
        #: Lambda variables in scope: name -> SQL alias of the json_each row.
        self.scope: dict[str, str] = {}

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

    def expr(self, node: Member) -> str:
        """SQL reading a property, or a lambda variable (``c``) or a path inside it (``r/emailAddress/address``)."""
        head, _, rest = node.path.partition("/")
        alias = self.scope.get(head)
        if alias is not None:
            if not rest:
                return f"{alias}.value"
            parts = [p.replace('"', "").replace("'", "") for p in rest.split("/")]
            return f"json_extract({alias}.value, '$" + "".join(f'."{p}"' for p in parts) + "')"
        return json_path(self.prop(node))

    def prop(self, node: Member) -> str:
        name = node.path
        if self.fields and name.split("/")[0] not in self.fields:
            raise QueryError("Request_BadRequest" if self.dialect == DIRECTORY else "BadRequest",
                             f"Could not find a property named '{name.split('/')[0]}' on type '{self.type_name}'.")
        return name

    @staticmethod
    def value(lit: Literal) -> Any:
        v = lit.value
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, datetime):
            # The records keep UTC ``YYYY-MM-DDTHH:MM:SSZ`` text, which sorts like the instant.
            return v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(v, date):
            return v.isoformat()
        if isinstance(v, Decimal):
            return float(v)
        return v

    def compile(self, node: Node) -> str:
        if isinstance(node, Logical):
            return f"({self.compile(node.left)} {node.op.upper()} {self.compile(node.right)})"
        if isinstance(node, Not):
            self.needs_advanced("not")
            return f"NOT coalesce({self.compile(node.operand)}, 0)"
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, InList):
            return self.in_list(node)
        if isinstance(node, Lambda):
            return self.lambda_(node)
        if isinstance(node, Member):
            raise self.unsupported(node.path)
        raise QueryError("BadRequest", "Invalid filter clause: expected a condition.")

    def in_list(self, node: InList) -> str:
        """``prop in ('a','b')``: documented for directory objects and Outlook items (filter-query-parameter.md)."""
        if not isinstance(node.left, Member) or not node.values:
            raise QueryError("BadRequest", "Invalid filter clause: 'in' needs a property and a list of values.")
        expr = self.expr(node.left)
        values = [self.value(v) for v in node.values]
        self.params += values
        collate = " COLLATE NOCASE" if all(isinstance(v, str) for v in values) else ""
        return f"{expr}{collate} IN ({', '.join('?' * len(values))})"

    def lambda_(self, node: Lambda) -> str:
        """``coll/any(x: ...)`` and ``coll/all(x: ...)`` over a collection property (json_each)."""
        head = node.path.split("/")[0]
        if head in self.scope:
            raise QueryError("BadRequest", "Invalid filter clause: nested lambda operators are not supported.")
        source = json_path(self.prop(Member(node.path, node.pos))).replace("json_extract(data", "json_each(data", 1)
        alias = f"l{len(self.scope)}"
        if node.body is None:
            return f"EXISTS (SELECT 1 FROM {source} AS {alias})"
        if node.var in self.scope or node.var in self.fields:
            raise QueryError("BadRequest", f"Invalid filter clause: the lambda variable '{node.var}' hides a name.")
        self.scope[node.var] = alias
        try:
            body = self.compile(node.body)
        finally:
            del self.scope[node.var]
        if node.op == "any":
            return f"EXISTS (SELECT 1 FROM {source} AS {alias} WHERE {body})"
        return f"NOT EXISTS (SELECT 1 FROM {source} AS {alias} WHERE NOT coalesce({body}, 0))"

    def compare(self, node: Compare) -> str:
        op, left, right = node.op, node.left, node.right
        if isinstance(left, Literal) and isinstance(right, Member):
            op, left, right = _FLIP[op], right, left
        if not isinstance(left, Member) or not isinstance(right, Literal):
            raise QueryError("BadRequest", "Invalid filter clause: compare a property with a literal value.")
        prop = left.path if left.path.split("/")[0] in self.scope else self.prop(left)
        if op == "ne":
            self.needs_advanced(prop)
        expr = self.expr(left)
        value = self.value(right)
        if value is None:
            if op not in ("eq", "ne"):
                raise self.unsupported(prop)
            return f"{expr} IS {'NOT ' if op == 'ne' else ''}NULL"
        self.params.append(value)
        # Graph compares strings case-insensitively (userPrincipalName eq 'ADELEV@...' matches).
        collate = " COLLATE NOCASE" if isinstance(value, str) else ""
        return f"{expr} {_COMPARE[op]} ?{collate}"

    def call(self, node: Call) -> str:
        args = node.args
        if len(args) != 2 or not isinstance(args[0], Member) or not isinstance(args[1], Literal) \
                or not isinstance(args[1].value, str):
            raise QueryError("BadRequest", f"Invalid filter clause: {node.name}(property, 'text') expected.")
        prop = args[0].path if args[0].path.split("/")[0] in self.scope else self.prop(args[0])
        fn = node.name
        if fn == "endswith" or (fn == "contains" and self.dialect == DIRECTORY):
            if self.dialect != DIRECTORY or fn == "contains":
                raise self.unsupported(prop)
            self.needs_advanced(prop)
        elif fn not in ("startswith", "contains"):
            raise self.unsupported(prop)
        text = args[1].value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        # SQLite's LIKE is case-insensitive for ASCII, like Graph's string functions.
        self.params.append({"startswith": text + "%", "endswith": "%" + text}.get(fn, "%" + text + "%"))
        return f"{self.expr(args[0])} LIKE ? ESCAPE '\\'"


def parse_filter(text: str, *, fields: tuple[str, ...], dialect: str, advanced: bool = False,
                 type_name: str = "") -> tuple[str, list[Any]]:
    """Translate a ``$filter`` expression into a SQL condition over ``data`` and its parameters.

    Supported: ``eq ne gt ge lt le`` on properties (including ``a/b`` paths), ``in (...)``, ``startswith``,
    ``endswith`` (directory, advanced), ``contains`` (Outlook), ``and``/``or``/``not``, parentheses and the
    lambda operators ``any``/``all`` over collection properties (``groupTypes/any(c:c eq 'Unified')``).
    Other functions raise :class:`QueryError` with the dialect's code.
    """
    compiler = _FilterCompiler(fields, dialect, advanced, type_name)
    try:
        node = parse_ast(text)
    except FilterError as exc:
        if "unknown function" in exc.message:
            raise compiler.unsupported(text.split("(")[0].strip()) from None
        raise QueryError("BadRequest", f"Invalid filter clause: {exc.message}") from None
    return compiler.compile(node), compiler.params


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
