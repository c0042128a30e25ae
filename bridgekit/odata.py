"""Pure OData helpers: query strings, safe $filter literals and a filter builder, Prefer headers, paging links, error bodies.

Nothing here does I/O. Every value a caller puts into a ``$filter`` goes through :func:`literal` (quotes
doubled, types rendered the OData way) and every query option through :func:`build_query`
(percent-encoded), so a hostile value such as ``') or (1 eq 1`` stays a string literal.

Example:
    >>> f = eq("lastname", "O'Brien") & ge("createdon", datetime.date(2024, 1, 31))
    >>> str(f)
    "(lastname eq 'O''Brien' and createdon ge 2024-01-31)"
    >>> build_query({"$select": "fullname", "$filter": f})
    "$select=fullname&$filter=(lastname%20eq%20'O''Brien'%20and%20createdon%20ge%202024-01-31)"
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

__all__ = [
    "Expr",
    "Page",
    "ServiceError",
    "and_",
    "build_query",
    "contains",
    "delta_token",
    "endswith",
    "eq",
    "ge",
    "gt",
    "guid",
    "in_",
    "iter_pages",
    "le",
    "literal",
    "lt",
    "ne",
    "not_",
    "or_",
    "parse_error",
    "prefer",
    "query_param",
    "skip_token",
    "startswith",
    "with_query",
]

#: A value that can be rendered as an OData literal.
Scalar = str | int | float | decimal.Decimal | bool | None | uuid.UUID | datetime.datetime | datetime.date

# A property path: identifiers joined by '/', e.g. ``primarycontactid/fullname`` or ``_ownerid_value``.
# Names are validated rather than escaped because OData has no quoting for identifiers.
_PROPERTY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Characters left readable in query values; everything else (space, & + # % = ; ? / : @ $ , and non-ASCII)
# is percent-encoded, as the Dataverse filter docs require for special characters.
_QUERY_SAFE = "'()*"


def literal(value: Scalar) -> str:
    """Render ``value`` as an OData v4 literal for ``$filter``.

    Strings are single-quoted with embedded quotes doubled (``O'Brien`` -> ``'O''Brien'``); UUIDs are
    unquoted GUID literals; datetimes are ISO 8601 in UTC with ``Z``; dates are ``YYYY-MM-DD``;
    booleans ``true``/``false``; ``None`` is ``null``. Percent-encoding happens later, in
    :func:`build_query`, so the literal here is the decoded form the service parses.

    Raises:
        TypeError: for a type OData has no literal for (lists, dicts, bytes...).
        ValueError: for NaN or infinity.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"OData has no literal for {value!r}")
        return repr(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError(f"OData has no literal for {value!r}")
        return format(value, "f")
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            # Naive datetimes are taken as UTC: Dataverse stores and compares UTC.
            value = value.replace(tzinfo=datetime.UTC)
        utc = value.astimezone(datetime.UTC)
        text = utc.strftime("%Y-%m-%dT%H:%M:%S")
        if utc.microsecond:
            text += f".{utc.microsecond:06d}".rstrip("0")
        return text + "Z"
    if isinstance(value, datetime.date):
        return value.isoformat()
    raise TypeError(f"cannot render a {type(value).__name__} as an OData literal")


def guid(value: str | uuid.UUID) -> uuid.UUID:
    """Parse a GUID string (with or without braces) so :func:`literal` renders it unquoted."""
    if isinstance(value, uuid.UUID):
        return value
    text = value.strip().strip("{}")
    if not _GUID.match(text):
        raise ValueError(f"not a GUID: {value!r}")
    return uuid.UUID(text)


def _property(name: str) -> str:
    if not isinstance(name, str) or not _PROPERTY.match(name):
        raise ValueError(f"not a valid OData property path: {name!r}")
    return name


@dataclass(frozen=True)
class Expr:
    """A ``$filter`` expression built from safe parts; combine with ``&``, ``|`` and ``~``.

    ``str(expr)`` is the expression text before URL encoding.
    """

    text: str

    def __str__(self) -> str:
        return self.text

    def __and__(self, other: Expr) -> Expr:
        return and_(self, other)

    def __or__(self, other: Expr) -> Expr:
        return or_(self, other)

    def __invert__(self) -> Expr:
        return not_(self)


def _compare(op: str) -> Callable[[str, Scalar], Expr]:
    def build(prop: str, value: Scalar) -> Expr:
        return Expr(f"{_property(prop)} {op} {literal(value)}")

    build.__name__ = op
    build.__doc__ = f"``prop {op} value`` with ``value`` rendered by :func:`literal`."
    return build


eq = _compare("eq")
ne = _compare("ne")
gt = _compare("gt")
ge = _compare("ge")
lt = _compare("lt")
le = _compare("le")


def _string_function(name: str) -> Callable[[str, str], Expr]:
    def build(prop: str, value: str) -> Expr:
        if not isinstance(value, str):
            raise TypeError(f"{name}() takes a string value")
        return Expr(f"{name}({_property(prop)},{literal(value)})")

    build.__name__ = name
    build.__doc__ = f"``{name}(prop,'value')``; the value is quoted by :func:`literal`."
    return build


contains = _string_function("contains")
startswith = _string_function("startswith")
endswith = _string_function("endswith")


def and_(*exprs: Expr) -> Expr:
    """All of ``exprs`` (parenthesised so precedence never surprises)."""
    return _join("and", exprs)


def or_(*exprs: Expr) -> Expr:
    """Any of ``exprs``."""
    return _join("or", exprs)


def not_(expr: Expr) -> Expr:
    """The negation of ``expr``."""
    return Expr(f"not ({_expr(expr).text})")


def in_(prop: str, values: Iterable[Scalar]) -> Expr:
    """``prop`` equals one of ``values``.

    Rendered as an ``or`` of ``eq`` terms: Dataverse speaks OData 4.0, which has no ``in`` operator
    (its own ``Microsoft.Dynamics.CRM.In`` function is Dataverse-only), and Graph accepts the same form.

    Raises:
        ValueError: ``values`` is empty (an empty ``in`` would match nothing and has no OData form).
    """
    terms = [eq(prop, v) for v in values]
    if not terms:
        raise ValueError(f"in_({prop!r}, ...) needs at least one value")
    return terms[0] if len(terms) == 1 else or_(*terms)


def _expr(value: Any) -> Expr:
    if not isinstance(value, Expr):
        raise TypeError("combine Expr objects only; build values with eq()/contains()/... so they are quoted")
    return value


def _join(op: str, exprs: Sequence[Expr]) -> Expr:
    parts = [_expr(e).text for e in exprs]
    if not parts:
        raise ValueError(f"{op}_() needs at least one expression")
    if len(parts) == 1:
        return Expr(parts[0])
    return Expr("(" + f" {op} ".join(parts) + ")")


def _option_text(value: Any) -> str:
    if isinstance(value, Expr):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, Iterable):
        return ",".join(str(v) for v in value)
    raise TypeError(f"cannot use a {type(value).__name__} as a query option value")


def build_query(options: Mapping[str, Any]) -> str:
    """Encode query options (``$select``, ``$filter``, ...) into a query string; ``None`` values are left out.

    Values may be strings, ints, booleans, :class:`Expr`, or iterables of names (joined with commas).
    Everything outside letters, digits, ``-._~'()*`` is percent-encoded, with ``%20`` for spaces (not
    ``+``, which OData servers may read literally).
    """
    parts = []
    for key, value in options.items():
        if value is None:
            continue
        parts.append(f"{quote(key, safe='$@')}={quote(_option_text(value), safe=_QUERY_SAFE)}")
    return "&".join(parts)


def with_query(url: str, options: Mapping[str, Any]) -> str:
    """``url`` with the encoded ``options`` appended (``?`` or ``&`` as needed)."""
    query = build_query(options)
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


def prefer(*, maxpagesize: int | None = None, include_annotations: str | Sequence[str] | None = None,
           track_changes: bool = False, return_representation: bool = False,
           continue_on_error: bool = False, return_minimal: bool = False,
           extra: Sequence[str] = ()) -> str | None:
    """Compose a ``Prefer`` header value (comma-joined), or ``None`` when nothing is preferred.

    Example:
        >>> prefer(maxpagesize=500, include_annotations="*")
        'odata.maxpagesize=500,odata.include-annotations="*"'
    """
    parts: list[str] = []
    if return_representation:
        parts.append("return=representation")
    if return_minimal:
        parts.append("return=minimal")
    if maxpagesize is not None:
        if not 1 <= int(maxpagesize) <= 5000:
            raise ValueError("odata.maxpagesize must be 1..5000")
        parts.append(f"odata.maxpagesize={int(maxpagesize)}")
    if include_annotations:
        names = include_annotations if isinstance(include_annotations, str) else ",".join(include_annotations)
        parts.append(f'odata.include-annotations="{names}"')
    if track_changes:
        parts.append("odata.track-changes")
    if continue_on_error:
        parts.append("odata.continue-on-error")
    parts.extend(extra)
    return ",".join(parts) if parts else None


@dataclass
class Page:
    """One page of an OData collection response.

    Attributes:
        value: The rows/items of this page.
        next_link: ``@odata.nextLink`` (follow unchanged), or None on the last page.
        delta_link: ``@odata.deltaLink`` (only on the last page of a tracked/delta read).
        count: ``@odata.count`` when asked for.
        raw: The other top-level annotations of the response.
    """

    value: list[dict[str, Any]]
    next_link: str | None = None
    delta_link: str | None = None
    count: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Page:
        """Build a page from a decoded collection response body."""
        value = body.get("value")
        if not isinstance(value, list):
            raise ValueError("not an OData collection response (no 'value' array)")
        count = body.get("@odata.count")
        raw = {k: v for k, v in body.items() if k != "value"}
        return cls(value=value, next_link=body.get("@odata.nextLink"), delta_link=body.get("@odata.deltaLink"),
                   count=int(count) if count is not None else None, raw=raw)


def iter_pages(fetch: Callable[[str], Mapping[str, Any]], first_url: str, *,
               max_pages: int | None = None) -> Iterator[Page]:
    """Yield pages from ``first_url``, following ``@odata.nextLink`` until a page has none.

    ``fetch`` GETs a URL and returns the decoded JSON body. The last page may carry a delta link.

    Raises:
        RuntimeError: the service returned the same nextLink twice (a paging loop).
    """
    url: str | None = first_url
    seen: set[str] = set()
    pages = 0
    while url is not None:
        page = Page.from_json(fetch(url))
        yield page
        pages += 1
        if max_pages is not None and pages >= max_pages:
            return
        url = page.next_link
        if url is not None:
            # A cookie that does not advance would loop forever; the PowerPlatform SDK guards the same way.
            if url in seen:
                raise RuntimeError("the service returned the same @odata.nextLink twice")
            seen.add(url)


def query_param(link: str, name: str) -> str | None:
    """The decoded value of query parameter ``name`` in ``link`` (e.g. ``$deltatoken``), or None."""
    for key, value in parse_qsl(urlsplit(link).query, keep_blank_values=True):
        if key.lower() == name.lower():
            return value
    return None


def skip_token(link: str) -> str | None:
    """The ``$skiptoken`` of a next link, decoded once."""
    return query_param(link, "$skiptoken")


def delta_token(link: str) -> str | None:
    """The ``$deltatoken`` of a delta link, decoded once (opaque; e.g. ``919042!08/22/2017 08:10:44``)."""
    return query_param(link, "$deltatoken")


@dataclass(frozen=True)
class ServiceError:
    """The parts of a Dataverse or Graph error body bridgekit uses."""

    code: str | None
    message: str
    request_id: str | None = None
    inner_code: str | None = None


def parse_error(body: bytes | str | Mapping[str, Any] | None) -> ServiceError | None:
    """Parse ``{"error": {"code", "message", "innerError": {...}}}`` (Dataverse and Graph shapes).

    Returns None when the body is empty or not such an object. The Graph ``innerError`` carries
    ``request-id``; Dataverse's error object may carry ``@Microsoft.PowerApps.CDS.InnerError.Message``.
    """
    data: Any = body
    if isinstance(body, bytes | str):
        if not body:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
    if not isinstance(data, Mapping):
        return None
    err = data.get("error")
    if not isinstance(err, Mapping):
        return None
    code = err.get("code")
    message = err.get("message")
    inner = err.get("innerError") or err.get("innererror")
    request_id = inner_code = None
    if isinstance(inner, Mapping):
        rid = inner.get("request-id") or inner.get("requestId")
        request_id = str(rid) if rid else None
        ic = inner.get("code")
        inner_code = str(ic) if ic else None
        if not message and inner.get("message"):
            message = inner.get("message")
    return ServiceError(code=str(code) if code else None, message=str(message or ""),
                        request_id=request_id, inner_code=inner_code)
