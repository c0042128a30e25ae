"""Microsoft's own clients against the emulator: the Dataverse SDK (PowerPlatform-Dataverse-Client) and
msgraph-sdk, on the calls issue #17 found failing (tables.list, relationships, batch with a metadata
read, bulk delete, FetchXML; group members cast to users, memberOf, manager, an ``in`` filter)."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest


@pytest.fixture(scope="module")
def dv_client(emulator: Any) -> Iterator[Any]:
    from azure.identity import ClientSecretCredential
    from PowerPlatform.Dataverse.client import DataverseClient

    # The SDK sends requests through a plain requests.Session: point its CA bundle at the emulator's.
    mp = pytest.MonkeyPatch()
    mp.setenv("REQUESTS_CA_BUNDLE", emulator.ca_bundle)
    credential = ClientSecretCredential(emulator.tenant_id, emulator.secret_client_id, emulator.client_secret,
                                        authority=emulator.base_url, disable_instance_discovery=True,
                                        connection_verify=emulator.ca_bundle)
    with DataverseClient(emulator.dataverse_url, credential) as client:
        yield client
    mp.undo()


def _dv(emulator: Any, path: str, **params: str) -> Any:
    r = emulator.session().get(f"{emulator.dataverse_url}/api/data/v9.2/{path}", params=params,
                               headers=emulator.headers("dataverse"), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_dataverse_sdk_lists_the_tables_it_can_see(dv_client: Any) -> None:
    tables = dv_client.tables.list()
    names = {t["LogicalName"] for t in tables}
    assert {"account", "contact", "opportunity", "systemuser"} <= names
    account = next(t for t in tables if t["LogicalName"] == "account")
    assert account["IsPrivate"] is False and account["EntitySetName"] == "accounts"
    only = dv_client.tables.list(filter="LogicalName eq 'contact'", select=["LogicalName", "IsPrivate"])
    assert [t["LogicalName"] for t in only] == ["contact"]


def test_dataverse_sdk_lists_a_tables_relationships_with_their_real_names(dv_client: Any) -> None:
    rels = dv_client.tables.list_table_relationships("account")
    names = {r["SchemaName"] for r in rels}
    # 1:N (contacts whose parent customer is the account), N:1 (the primary contact), standard names.
    assert {"contact_customer_accounts", "account_primary_contact", "opportunity_customer_accounts"} <= names
    user_rels = dv_client.tables.list_table_relationships("systemuser")
    nn = [r for r in user_rels if r.get("RelationshipType") == "ManyToManyRelationship"]
    assert [(r["SchemaName"], r["Entity2LogicalName"]) for r in nn] == [("teammembership_association", "team")]


def test_dataverse_sdk_batch_with_a_metadata_read_and_a_list(dv_client: Any, emulator: Any) -> None:
    """The SDK writes ``$filter=IsPrivate eq false`` unencoded into the part's request line."""
    batch = dv_client.batch.new()
    batch.tables.get("account")
    batch.tables.list()
    result = batch.execute()
    assert [r.status_code for r in result.responses] == [200, 200], [r.error_message for r in result.responses]
    assert [t["EntitySetName"] for t in result.responses[0].data["value"]] == ["accounts"]
    listed = {t["LogicalName"] for t in result.responses[1].data["value"]}
    assert listed == {t["LogicalName"] for t in _dv(emulator, "EntityDefinitions", **{"$select": "LogicalName"})["value"]}


def test_dataverse_sdk_deletes_a_list_of_records_with_bulkdelete(dv_client: Any, emulator: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [dv_client.records.create("account", {"name": f"Bulk {tag} {i}"}) for i in range(3)]
    keep = dv_client.records.create("account", {"name": f"Bulk {tag} keep"})
    job = dv_client.records.delete("account", ids[:3])
    uuid.UUID(job)
    left = _dv(emulator, "accounts", **{"$select": "name", "$filter": f"startswith(name,'Bulk {tag}')"})["value"]
    assert [(r["accountid"], r["name"]) for r in left] == [(keep, f"Bulk {tag} keep")]


def test_dataverse_sdk_fetchxml_pages_with_the_paging_cookie(dv_client: Any, emulator: Any) -> None:
    expected = sorted(r["contactid"] for r in _dv(emulator, "contacts", **{"$select": "contactid"})["value"])
    query = dv_client.query.fetchxml(
        '<fetch count="150"><entity name="contact"><attribute name="fullname" /><order attribute="contactid" />'
        "</entity></fetch>")
    pages = list(query.execute_pages())
    ids = [rec["contactid"] for page in pages for rec in page.records]
    assert len(pages) == -(-len(expected) // 150) >= 2
    assert ids == expected
    joined = dv_client.query.fetchxml(
        '<fetch top="5"><entity name="contact"><attribute name="fullname" />'
        '<link-entity name="account" from="accountid" to="parentcustomerid" alias="a" link-type="inner">'
        '<attribute name="name" /></link-entity><order attribute="fullname" /></entity></fetch>').execute()
    rows = list(joined)
    assert len(rows) == 5 and all(r["a.name"] for r in rows)
    names = [r["fullname"] for r in rows]
    assert names == sorted(names, key=str.casefold)


# -- msgraph-sdk -----------------------------------------------------------------------------------------


@pytest.fixture
def graph_client(emulator: Any) -> Any:
    """A client per test: its httpx client belongs to the event loop of the test's asyncio.run."""
    import httpx
    from azure.identity import ClientSecretCredential
    from kiota_authentication_azure.azure_identity_authentication_provider import (
        AzureIdentityAuthenticationProvider,
    )
    from msgraph import GraphRequestAdapter, GraphServiceClient
    from msgraph_core import GraphClientFactory

    credential = ClientSecretCredential(
        emulator.tenant_id, emulator.secret_client_id, emulator.client_secret,
        authority=emulator.authority_host, disable_instance_discovery=True, connection_verify=emulator.ca_bundle)
    auth = AzureIdentityAuthenticationProvider(credential, scopes=[f"{emulator.graph_url}/.default"],
                                               allowed_hosts=[urlsplit(emulator.base_url).hostname])
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=emulator.ca_bundle)))
    adapter = GraphRequestAdapter(auth, http)
    adapter.base_url = f"{emulator.graph_url}/v1.0"
    return GraphServiceClient(request_adapter=adapter)


def _graph(emulator: Any, path: str) -> Any:
    r = emulator.session().get(f"{emulator.graph_url}/v1.0/{path}", headers=emulator.headers("graph"), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_msgraph_sdk_reads_group_members_cast_to_users(graph_client: Any, emulator: Any) -> None:
    group = next(g for g in _graph(emulator, "groups")["value"] if g["displayName"] == "All Staff")
    expected = {u["id"] for u in _graph(emulator, f"groups/{group['id']}/members?$top=999")["value"]}

    async def run() -> list[Any]:
        page = await graph_client.groups.by_group_id(group["id"]).members.graph_user.get()
        users = list(page.value or [])
        while page.odata_next_link:
            page = await graph_client.groups.by_group_id(group["id"]).members.graph_user.with_url(
                page.odata_next_link).get()
            users += page.value or []
        return users

    users = asyncio.run(run())
    assert {u.id for u in users} == expected and len(expected) > 5
    assert all(u.display_name for u in users)


def test_msgraph_sdk_reads_manager_and_member_of(graph_client: Any, emulator: Any) -> None:
    users = _graph(emulator, "users?$top=999&$select=id,jobTitle,displayName")["value"]
    reps = [u for u in users if "Account Executive" in (u["jobTitle"] or "") or u["jobTitle"] == "Sales Representative"]

    def sales_groups(user: dict[str, Any]) -> set[str]:
        names = {g["displayName"] for g in _graph(emulator, f"users/{user['id']}/memberOf")["value"]}
        return names if any(n.startswith("Sales ") for n in names) else set()

    # Live activity (other tests run mutate) rewrites job titles and group members: take a rep whom the
    # emulator still lists in a sales team.
    rep = next(u for u in reps if sales_groups(u))
    region_manager = _graph(emulator, f"users/{rep['id']}/manager")

    async def run() -> tuple[Any, Any]:
        item = graph_client.users.by_user_id(rep["id"])
        return await item.manager.get(), await item.member_of.get()

    manager, member_of = asyncio.run(run())
    assert manager.id == region_manager["id"] and manager.display_name == region_manager["displayName"]
    # (its jobTitle is not checked: live activity rewrites job titles, and other tests run mutate)
    assert manager.id != rep["id"]
    groups = {g.display_name for g in member_of.value}
    assert "All Staff" in groups and any(name.startswith("Sales ") for name in groups)
    assert groups == sales_groups(rep)


def test_msgraph_sdk_filters_users_with_in(graph_client: Any, emulator: Any) -> None:
    from msgraph.generated.users.users_request_builder import UsersRequestBuilder

    some = _graph(emulator, "users?$top=4&$select=id,userPrincipalName")["value"]
    upns = [u["userPrincipalName"] for u in some[1:4]]
    flt = "userPrincipalName in (" + ",".join(f"'{u}'" for u in upns) + ")"

    async def run() -> Any:
        config = UsersRequestBuilder.UsersRequestBuilderGetRequestConfiguration(
            query_parameters=UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(
                filter=flt, select=["id", "userPrincipalName"]))
        return await graph_client.users.get(request_configuration=config)

    page = asyncio.run(run())
    assert sorted(u.user_principal_name for u in page.value) == sorted(upns)
