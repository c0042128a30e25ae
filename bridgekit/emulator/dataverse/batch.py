"""``$batch`` for the emulated Dataverse Web API: multipart/mixed parsing, change sets, multipart answers.

Facts from protocols.md §1.13: at most 1,000 requests; parts run in order; change sets are atomic
(here: one store write transaction, rolled back when any part fails); ``Content-ID`` lets later parts
of a change set refer to ``$n``; without ``Prefer: odata.continue-on-error`` processing stops at the
first failure and the batch answers with that failure's status. The parser accepts CRLF or LF line
ends, quoted or bare boundaries, absolute URLs or root-relative paths in request lines; a request line
needs its HTTP version, and its URL may hold spaces (the service takes the URL between the first and
the last space).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

from bridgekit.emulator.dataverse.common import DvError, Reply

__all__ = ["MAX_REQUESTS", "BatchPart", "BatchRequest", "ChangeSet", "format_batch", "parse_batch"]

MAX_REQUESTS = 1000


@dataclass
class BatchRequest:
    """One HTTP request inside a batch."""

    method: str
    target: str  # path after the service root, with the query string ("accounts?$select=name")
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    """An atomic group of requests."""

    requests: list[BatchRequest] = field(default_factory=list)


BatchPart = BatchRequest | ChangeSet


def _boundary(content_type: str) -> str:
    m = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.I)
    if m is None:
        raise DvError(400, "0x80060888", "The batch request must have a Content-Type of multipart/mixed with a "
                                         "boundary parameter.")
    return m.group(1) or m.group(2)


def _split_parts(body: str, boundary: str) -> list[str]:
    """The parts between ``--boundary`` delimiter lines, up to the closing ``--boundary--``.

    A delimiter counts only at the start of a line and when only spaces or tabs follow it on that
    line; the line break before it belongs to the delimiter (RFC 2046 §5.1.1). Plain string search:
    every change set has its own boundary, so a compiled pattern per boundary would not be reused.
    """
    delim = "--" + boundary
    size = len(body)
    parts: list[str] = []
    pos: int | None = None  # where the current part's text starts
    i = 0
    while (j := body.find(delim, i)) >= 0:
        i = j + 1
        if j and body[j - 1] != "\n":
            continue
        k = j + len(delim)
        closing = body.startswith("--", k)
        if closing:
            k += 2
        while k < size and body[k] in " \t":
            k += 1
        if k < size and body[k] != "\n" and not body.startswith("\r\n", k):
            continue
        if pos is not None:
            end = j - 1 if j else 0
            parts.append(body[pos:end - 1 if end and body[end - 1] == "\r" else end])
        if closing:
            return parts
        pos = k + (2 if body.startswith("\r\n", k) else 1 if k < size else 0)
        i = pos
    if pos is None:
        raise DvError(400, "0x80060888", "The batch body does not contain the boundary declared in Content-Type.")
    raise DvError(400, "0x80060888", "The batch body is not terminated by its closing boundary.")


_BLANK_LINE = re.compile(r"^[ \t\r\f\v]*(?:\n|\Z)", re.M)


def _headers_and_rest(text: str) -> tuple[dict[str, str], str]:
    """Header lines up to the first blank line (lower-cased names), and what follows it."""
    m = _BLANK_LINE.search(text)
    head, rest = (text[:m.start()], text[m.end():]) if m else (text, "")
    headers: dict[str, str] = {}
    for line in head.split("\n"):
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return headers, rest


_API_PREFIX = re.compile(r"^/api/data/v\d+\.\d+/?")
_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")
_VERSION = re.compile(r"HTTP/1\.[01]")


def _request_line(line: str) -> tuple[str, str]:
    """(method, URL) of a part's request line, read as the service's OData library reads it.

    The method runs to the first space and the version (``HTTP/1.1``) follows the last one; the URL is
    everything between, spaces included (the Dataverse SDK sends ``$filter=IsPrivate eq false``
    unencoded). A line without the version is refused.
    """
    method, sep, rest = line.partition(" ")
    url, sep2, version = rest.rpartition(" ")
    if not sep or not sep2 or method not in _METHODS or not _VERSION.fullmatch(version) or not url.strip():
        raise DvError(400, "0x80060888", f"The batch part's request line '{line[:100]}' is not valid: expected "
                                         "'<METHOD> <URL> HTTP/1.1'.")
    return method, url.strip()


# An absolute URL or a root-relative path up to and including the service root (the common form of a part).
_ROOTED = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?(?:/[^?#]*?)?/api/data/v\d+\.\d+(?:/|(?=[?]|$))")


def _relative(url: str, service_path: str) -> str:
    """Reduce an absolute URL or a root-relative path to the part after the service root."""
    if "#" not in url:
        m = _ROOTED.match(url)
        if m is not None:
            return url[m.end():]
    parts = urlsplit(url)
    path = parts.path
    if parts.scheme or path.startswith("/"):
        idx = path.find("/api/data/v")
        if idx >= 0:
            path = path[idx:]
            path = _API_PREFIX.sub("", path)
        elif path.startswith(service_path):
            path = path[len(service_path):].lstrip("/")
        else:
            path = path.lstrip("/")
    return path + (f"?{parts.query}" if parts.query else "")


def _request(text: str, part_headers: dict[str, str], service_path: str) -> BatchRequest:
    ctype = part_headers.get("content-type", "application/http")
    if not ctype.lower().startswith("application/http"):
        raise DvError(400, "0x80060888", f"A batch part has the unsupported Content-Type '{ctype}'.")
    text = text.lstrip("\r\n")
    request_line, _, rest = text.partition("\n")
    request_line = request_line.removesuffix("\r")
    method, url = _request_line(request_line.strip())
    headers, body = _headers_and_rest(rest)
    return BatchRequest(method, _relative(url, service_path), headers,
                        body.rstrip("\r\n").encode(), part_headers.get("content-id"))


def parse_batch(body: bytes, content_type: str, service_path: str) -> list[BatchPart]:
    """Parse a multipart/mixed ``$batch`` body into requests and change sets (DvError when malformed)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise DvError(400, "0x80060888", "The batch body is not UTF-8 text.") from None
    out: list[BatchPart] = []
    count = 0
    for raw in _split_parts(text, _boundary(content_type)):
        headers, rest = _headers_and_rest(raw)
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/mixed"):
            cs = ChangeSet()
            for inner in _split_parts(rest, _boundary(ctype)):
                ih, irest = _headers_and_rest(inner)
                req = _request(irest, ih, service_path)
                if req.method == "GET":
                    raise DvError(400, "0x80060888", "GET requests are not allowed inside a change set.")
                cs.requests.append(req)
            count += len(cs.requests)
            out.append(cs)
        else:
            out.append(_request(rest, headers, service_path))
            count += 1
        if count > MAX_REQUESTS:
            # The documented limit (§1.13); the exact Web API code is not documented.
            raise DvError(400, "0x80060888", f"The number of requests in the batch exceeds the limit of "
                                             f"{MAX_REQUESTS}.")
    return out


def _http_part(reply: Reply, content_id: str | None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines.append("")
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = ""
    lines.append(f"HTTP/1.1 {reply.status} {phrase}".rstrip())
    headers = {"OData-Version": "4.0", **reply.headers}
    if reply.body and reply.content_type:
        ctype = reply.content_type
        if ctype.startswith("application/json"):
            ctype += "; odata.streaming=true"
        headers["Content-Type"] = ctype
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("")
    lines.append(reply.body.decode("utf-8") if reply.body else "")
    return "\r\n".join(lines)


@dataclass
class PartResult:
    """The outcome of one top-level part: a reply, or a change set's replies (with Content-IDs)."""

    reply: Reply | None = None
    changeset: list[tuple[str | None, Reply]] | None = None


def format_batch(results: list[PartResult]) -> tuple[str, bytes]:
    """(content type, body) of a multipart batch response (§1.13)."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    chunks: list[str] = []
    for res in results:
        if res.changeset is not None:
            cs_boundary = f"changesetresponse_{uuid.uuid4()}"
            inner = "".join(f"--{cs_boundary}\r\n{_http_part(r, cid)}\r\n" for cid, r in res.changeset)
            chunks.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={cs_boundary}\r\n\r\n"
                          f"{inner}--{cs_boundary}--\r\n")
        elif res.reply is not None:
            chunks.append(f"--{boundary}\r\n{_http_part(res.reply, None)}\r\n")
    body = "".join(chunks) + f"--{boundary}--\r\n"
    return f"multipart/mixed; boundary={boundary}", body.encode("utf-8")


Executor = Callable[[BatchRequest, dict[str, str]], Reply]
