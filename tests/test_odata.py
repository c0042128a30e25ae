"""OData helpers: literal quoting survives hostile values, query strings are encoded, links and errors parse."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, unquote

import pytest

from bridgekit import odata
from bridgekit.odata import (
    Page,
    build_query,
    contains,
    delta_token,
    endswith,
    eq,
    ge,
    in_,
    iter_pages,
    literal,
    lt,
    ne,
    parse_error,
    prefer,
    skip_token,
    startswith,
    with_query,
)

PAYLOADS = Path(__file__).parent / "payloads"

HOSTILE = ["O'Brien", "') or (1 eq 1", "Zoë Ångström 東京", "%&+#", "a'b''c", "x&$filter=true", "';--"]


def _decoded_filter(query: str) -> str:
    """What the server sees after it splits the query string and percent-decodes."""
    pairs = dict(parse_qsl(query, keep_blank_values=True))
    return pairs["$filter"]


def _parse_string_literal(text: str) -> tuple[str, str]:
    """A tiny OData string-literal reader: returns (value, rest) for text starting with a quote."""
    assert text[0] == "'"
    out, i = [], 1
    while True:
        ch = text[i]
        if ch == "'":
            if i + 1 < len(text) and text[i + 1] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out), text[i + 1:]
        out.append(ch)
        i += 1


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_string_stays_one_literal(value: str) -> None:
    query = build_query({"$filter": eq("lastname", value)})
    # Exactly one query option comes out, whatever the value contains.
    assert [k for k, _ in parse_qsl(query)] == ["$filter"]
    text = _decoded_filter(query)
    assert text.startswith("lastname eq '")
    parsed, rest = _parse_string_literal(text[len("lastname eq "):])
    assert parsed == value
    assert rest == ""


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_inside_a_function_and_combination(value: str) -> None:
    expr = contains("name", value) & ne("statecode", 1)
    text = _decoded_filter(build_query({"$filter": expr}))
    assert text.startswith("(contains(name,'")
    parsed, rest = _parse_string_literal(text[len("(contains(name,"):])
    assert parsed == value
    assert rest == ") and statecode ne 1)"


def test_special_characters_are_percent_encoded() -> None:
    query = build_query({"$filter": eq("name", "%&+#é ?=;/:@$,")})
    raw = query.split("=", 1)[1]
    for ch in "&+#é ?=;/:@$,":
        assert ch not in raw, ch
    assert unquote(raw) == "name eq '%&+#é ?=;/:@$,'"


def test_literals_of_each_type() -> None:
    g = uuid.UUID("78914942-34cb-ed11-b596-0022481d68cd")
    assert literal(g) == "78914942-34cb-ed11-b596-0022481d68cd"
    assert literal(odata.guid("{78914942-34CB-ED11-B596-0022481D68CD}")) == str(g)
    assert literal(None) == "null"
    assert literal(True) == "true" and literal(False) == "false"
    assert literal(42) == "42" and literal(-1.5) == "-1.5"
    assert literal(decimal.Decimal("20000.50")) == "20000.50"
    assert literal(datetime.date(2024, 2, 29)) == "2024-02-29"
    assert literal(datetime.datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05Z"
    cet = datetime.timezone(datetime.timedelta(hours=1))
    assert literal(datetime.datetime(2024, 1, 2, 3, 4, 5, 250000, tzinfo=cet)) == "2024-01-02T02:04:05.25Z"
    with pytest.raises(ValueError):
        literal(float("nan"))
    with pytest.raises(TypeError):
        literal([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        odata.guid("not-a-guid')")


def test_property_names_are_validated_not_escaped() -> None:
    assert str(eq("primarycontactid/fullname", "x")) == "primarycontactid/fullname eq 'x'"
    for bad in ["name eq 'x' or 1 eq 1", "na me", "", "a//b", "x)"]:
        with pytest.raises(ValueError):
            eq(bad, "x")


def test_builder_operators() -> None:
    f = (startswith("name", "Con") | endswith("name", "Ltd")) & ~eq("statecode", 1)
    assert str(f) == "((startswith(name,'Con') or endswith(name,'Ltd')) and not (statecode eq 1))"
    assert str(in_("accountnumber", ["A1", "B'2"])) == "(accountnumber eq 'A1' or accountnumber eq 'B''2')"
    assert str(in_("x", [1])) == "x eq 1"
    assert str(ge("createdon", datetime.date(2024, 1, 1)) & lt("revenue", 10)) == \
        "(createdon ge 2024-01-01 and revenue lt 10)"
    with pytest.raises(ValueError):
        in_("x", [])
    with pytest.raises(TypeError):
        _ = eq("a", 1) & "b eq 2"  # type: ignore[operator]


def test_query_building() -> None:
    q = build_query({"$select": ["name", "accountid"], "$top": 5, "$count": True, "$orderby": None})
    assert q == "$select=name%2Caccountid&$top=5&$count=true"
    assert with_query("https://h/api/data/v9.2/accounts", {"$top": 1}) == "https://h/api/data/v9.2/accounts?$top=1"
    assert with_query("https://h/x?a=1", {"$top": 1}) == "https://h/x?a=1&$top=1"
    assert with_query("https://h/x", {}) == "https://h/x"


def test_prefer_header() -> None:
    assert prefer() is None
    assert prefer(maxpagesize=500, include_annotations="*", track_changes=True) == \
        'odata.maxpagesize=500,odata.include-annotations="*",odata.track-changes'
    assert prefer(return_representation=True, continue_on_error=True) == \
        "return=representation,odata.continue-on-error"
    assert prefer(include_annotations=["OData.Community.Display.V1.FormattedValue",
                                       "Microsoft.Dynamics.CRM.lookuplogicalname"]) == \
        'odata.include-annotations="OData.Community.Display.V1.FormattedValue,Microsoft.Dynamics.CRM.lookuplogicalname"'
    with pytest.raises(ValueError):
        prefer(maxpagesize=5001)


def _load(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((PAYLOADS / name).read_text())
    return data


def test_dataverse_paged_payloads_iterate_to_the_delta_link() -> None:
    first, last = _load("dataverse_accounts_page1.json"), _load("dataverse_accounts_page2_delta.json")
    responses = {"https://org/api/data/v9.2/accounts": first, str(first["@odata.nextLink"]): last}
    pages = list(iter_pages(lambda url: responses[url], "https://org/api/data/v9.2/accounts"))
    assert [len(p.value) for p in pages] == [2, 1]
    assert pages[0].next_link and pages[-1].next_link is None
    assert pages[-1].delta_link is not None
    assert delta_token(pages[-1].delta_link) == "919042!08/22/2017 08:10:44"
    token = skip_token(str(first["@odata.nextLink"]))
    assert token is not None and token.startswith('<cookie pagenumber="2"')
    assert 'istracking="False"' in token


def test_paging_loop_is_detected() -> None:
    body = {"value": [], "@odata.nextLink": "https://org/next"}
    with pytest.raises(RuntimeError):
        list(iter_pages(lambda url: body, "https://org/first"))


def test_page_rejects_non_collections() -> None:
    with pytest.raises(ValueError):
        Page.from_json({"error": {"code": "x", "message": "y"}})


def test_error_bodies_of_both_services() -> None:
    dv = parse_error(json.dumps(_load("dataverse_error_404.json")))
    assert dv is not None and dv.code == "0x80040217" and "Does Not Exist" in dv.message
    graph = parse_error(_load("graph_error_throttled.json"))
    assert graph is not None and graph.code == "TooManyRequests"
    assert graph.request_id == "94fb3b52-452a-4535-a601-69e0a90e3aa2"
    assert parse_error(b"") is None and parse_error(b"<html>") is None and parse_error({"value": []}) is None
    empty_code = parse_error({"error": {"code": "", "message": "A record with matching key values already exists."}})
    assert empty_code is not None and empty_code.code is None
