"""The synthetic company's integration layer as Dataverse data: plug-in steps, service endpoints, flows, system jobs,
trace logs, connection references, environment variables, security roles and the organization settings.

Called by :mod:`bridgekit.emulator.synth` after the business data, so the business data of a seed is the same with or
without it. Alpine Ridge Systems integrates Dataverse with Azure Service Bus (a queue and a topic), an Event Hub,
two webhooks (Azure Functions), classic workflows, business rules and Power Automate cloud flows. The defects planted
in that layer (``defects=True``, the default) are recorded in store meta ``planted_defects`` next to the data defects,
each with the ids of the components concerned; ``defects=False`` generates the same layer without them (the clean
tenant). docs/integration-surface.md describes both.
"""

from __future__ import annotations

import json
import random
import uuid
from typing import TYPE_CHECKING, Any

from bridgekit.emulator.schema import TABLES

if TYPE_CHECKING:
    from bridgekit.emulator.synth import _Gen

__all__ = ["SYSTEM_ADMINISTRATOR_TEMPLATE", "generate_platform"]

DAY = 86400
HOUR = 3600
#: The role template id of the System Administrator role (the same in every environment).
SYSTEM_ADMINISTRATOR_TEMPLATE = "627090ff-40a3-4053-8790-584edc5be201"
_SB_NAMESPACE = "sb://alpineridge-integration.servicebus.windows.net/"
_EH_NAMESPACE = "sb://alpineridge-telemetry.servicebus.windows.net/"
_CONNECTORS = {
    "dataverse": "/providers/Microsoft.PowerApps/apis/shared_commondataserviceforapps",
    "outlook": "/providers/Microsoft.PowerApps/apis/shared_office365",
    "teams": "/providers/Microsoft.PowerApps/apis/shared_teams",
    "sharepoint": "/providers/Microsoft.PowerApps/apis/shared_sharepointonline",
    "entra_http": "/providers/Microsoft.PowerApps/apis/shared_webcontents",
}


class _Platform:
    """One generation of the integration layer over a generated company."""

    def __init__(self, g: _Gen, defects: bool) -> None:
        self.g = g
        self.defects = defects
        self.rng = random.Random(g.seed * 1_000_003 + 19)  # noqa: S311 - synthetic data; its own stream
        self.setup = g.go_live - 20 * DAY
        self.now = g.now
        self.planted: dict[str, Any] = {}
        self.rows: dict[str, list[tuple[str, dict[str, Any]]]] = {t: [] for t in (
            "solution", "pluginassembly", "plugintype", "sdkmessage", "sdkmessagefilter", "sdkmessageprocessingstep",
            "serviceendpoint", "workflow", "connectionreference", "environmentvariabledefinition",
            "environmentvariablevalue", "asyncoperation", "plugintracelog", "role", "systemuserroles",
            "organization", "systemuser")}
        self.messages: dict[str, str] = {}
        self.filters: dict[tuple[str, str], str] = {}
        self.integration_solution = ""
        self.hot_sync: list[str] = []
        self.unfiltered_update = ""
        self.unmanaged: list[str] = []

    # -- helpers ----------------------------------------------------------------------------------------
    def row(self, table: str, rid: str, values: dict[str, Any], *, created: int | None = None,
            owner: str | None = None) -> dict[str, Any]:
        rec = dict(self.g.tpl[table])
        t = TABLES[table]
        rec[t.primary_id] = rid
        rec.update(values)
        when = self.setup if created is None else created
        if "createdon" in rec:
            rec["createdon"] = rec["modifiedon"] = self.g.iso(when)
            rec["_createdby_value"] = rec["_modifiedby_value"] = self.g.admin_sys
        if "_ownerid_value" in rec:
            rec["_ownerid_value"] = owner or self.g.admin_sys
            rec["@emu._ownerid_value.type"] = "systemuser"
            rec["_owningbusinessunit_value"] = self.g.bu_ids[next(iter(self.g.bu_ids))]
        self.rows[table].append((rid, rec))
        return rec

    def plant(self, name: str, ids: list[str], rule: str, **extra: Any) -> None:
        if self.defects:
            self.planted[name] = {"count": len(ids), "ids": sorted(ids), "rule": rule, **extra}

    # -- the layer ----------------------------------------------------------------------------------------
    def solutions(self) -> None:
        g = self.g
        for uniq, friendly, version, managed in (
                ("Default", "Default Solution", "1.0", False),
                ("AlpineRidgeIntegration", "Alpine Ridge Integration", "3.4.2.0", True),
                ("AlpineRidgeSales", "Alpine Ridge Sales", "2.11.0.0", True)):
            sid = g.guid()
            if uniq == "AlpineRidgeIntegration":
                self.integration_solution = sid
            self.row("solution", sid, {"uniquename": uniq, "friendlyname": friendly, "version": version,
                                       "ismanaged": managed, "isvisible": True,
                                       "installedon": g.iso(self.setup),
                                       "description": f"{friendly} of {g_company()}."})
        for name in ("Create", "Update", "Delete", "Retrieve", "RetrieveMultiple", "Assign"):
            mid = g.guid()
            self.messages[name] = mid
            self.row("sdkmessage", mid, {"name": name, "categoryname": "CustomOperation" if name == "Assign" else None,
                                         "isprivate": False})

    def message_filter(self, message: str, table: str) -> str:
        key = (message, table)
        if key not in self.filters:
            fid = self.g.guid()
            self.filters[key] = fid
            self.row("sdkmessagefilter", fid, {"name": f"{message} of {table}",
                                               "_sdkmessageid_value": self.messages[message],
                                               "primaryobjecttypecode": table, "secondaryobjecttypecode": "none",
                                               "iscustomprocessingstepallowed": True})
        return self.filters[key]

    def step(self, name: str, message: str, table: str, handler: str, handler_type: str, *, mode: int, stage: int,
             rank: int = 1, filtering: str | None = None, managed: bool = True) -> str:
        sid = self.g.guid()
        self.row("sdkmessageprocessingstep", sid, {
            "name": name, "description": name, "_sdkmessageid_value": self.messages[message],
            "_sdkmessagefilterid_value": self.message_filter(message, table),
            "_eventhandler_value": handler, "@emu._eventhandler_value.type": handler_type,
            "_plugintypeid_value": handler if handler_type == "plugintype" else None,
            "mode": mode, "stage": stage, "rank": rank, "filteringattributes": filtering, "supporteddeployment": 0,
            "asyncautodelete": False, "configuration": None,
            "solutionid": self.integration_solution if managed else None, "ismanaged": managed,
            "statecode": 0, "statuscode": 1})
        return sid

    def plugins(self) -> None:
        g = self.g
        aid = g.guid()
        self.row("pluginassembly", aid, {"name": "AlpineRidge.Plugins", "version": "3.4.2.0",
                                         "publickeytoken": "9f3c1a7be20d4c55", "isolationmode": 2, "sourcetype": 0,
                                         "solutionid": self.integration_solution, "ismanaged": True})
        self.types: dict[str, str] = {}
        for short in ("CurrencyGuard", "TeamProvisioning", "AccountEnrichment", "OpportunityScoring",
                      "ContactValidation", "EmailTracking", "AccountSecurityFilter"):
            tid = g.guid()
            self.types[short] = tid
            full = f"AlpineRidge.Plugins.{short}"
            self.row("plugintype", tid, {"name": full, "typename": full, "friendlyname": short,
                                         "assemblyname": "AlpineRidge.Plugins", "_pluginassemblyid_value": aid,
                                         "isworkflowactivity": False, "solutionid": self.integration_solution,
                                         "ismanaged": True})
        t = self.types
        d = self.defects
        # Synchronous steps on small reference tables: fine at any volume.
        self.plugin_steps: dict[str, tuple[str, int]] = {}  # step id -> (plug-in type, mode)
        for name, msg, table, typ, mode, stage, filt in (
                ("CurrencyGuard: Update of transactioncurrency", "Update", "transactioncurrency", "CurrencyGuard", 0,
                 10, "exchangerate"),
                ("TeamProvisioning: Create of team", "Create", "team", "TeamProvisioning", 0, 40, None),
                ("AccountEnrichment: Create of account", "Create", "account", "AccountEnrichment", 1, 40, None),
                ("OpportunityScoring: Update of opportunity", "Update", "opportunity", "OpportunityScoring", 1, 40,
                 None if d else "estimatedvalue,closeprobability,stepname"),
                # The contact check runs asynchronously in the clean tenant, synchronously (on a hot table) when planted.
                ("ContactValidation: Update of contact", "Update", "contact", "ContactValidation", 0 if d else 1,
                 20 if d else 40, "emailaddress1,telephone1,parentcustomerid"),
                ("EmailTracking: Create of email", "Create", "email", "EmailTracking", 0 if d else 1,
                 40, None)):
            sid = self.step(name, msg, table, t[typ], "plugintype", mode=mode, stage=stage, filtering=filt)
            self.plugin_steps[sid] = (typ, mode)
            if typ == "OpportunityScoring":
                self.unfiltered_update = sid
            if typ in ("ContactValidation", "EmailTracking"):
                self.hot_sync.append(sid)
        if d:
            sid = self.step("AccountSecurityFilter: RetrieveMultiple of account", "RetrieveMultiple", "account",
                            t["AccountSecurityFilter"], "plugintype", mode=0, stage=20)
            self.plugin_steps[sid] = ("AccountSecurityFilter", 0)
            self.hot_sync.append(sid)
        self.plant("sync_steps_on_hot_paths", self.hot_sync,
                   "sdkmessageprocessingstep mode 0 (synchronous) on a high-volume table (5% or more of the "
                   "Dataverse rows) or on Retrieve/RetrieveMultiple")
        self.plant("update_steps_without_filtering", [self.unfiltered_update],
                   "enabled Update step with no filteringattributes")

    def endpoints(self) -> None:
        g, d = self.g, self.defects
        self.endpoint_ids: dict[str, str] = {}
        self.endpoint_steps: dict[str, str] = {}  # step id -> endpoint id
        specs: list[tuple[str, dict[str, Any], str, str, str, str | None, bool]] = [
            ("Contact sync queue", {"contract": 2, "authtype": 2 if d else 3, "namespaceaddress": _SB_NAMESPACE,
                                    "path": "crm-contacts", "saskeyname": "crm-send" if d else None,
                                    "solutionnamespace": "alpineridge-integration"},
             "Update", "contact", "contact", "emailaddress1,telephone1,parentcustomerid,statecode", True),
            ("Account events topic", {"contract": 5, "authtype": 3, "namespaceaddress": _SB_NAMESPACE,
                                      "path": "crm-accounts", "solutionnamespace": "alpineridge-integration"},
             "Create", "account", "account", None, True),
            ("Opportunity telemetry hub", {"contract": 7, "authtype": 3, "namespaceaddress": _EH_NAMESPACE,
                                           "path": "crm-opportunities", "solutionnamespace": "alpineridge-telemetry"},
             "Update", "opportunity", "opportunity", "stepname,estimatedvalue,statecode", True),
            ("Finance won-deal function", {"contract": 8, "authtype": 5,
                                           "url": "https://alpineridge-finance.azurewebsites.net/api/wondeal"},
             "Update", "opportunity", "opportunity", "statecode", True),
        ]
        if d:
            specs += [
                ("Legacy ERP webhook", {"contract": 8, "authtype": 5,
                                        "url": "http://erp.alpineridge.example/crm/hook"},
                 "Update", "account", "account", "name,accountnumber,address1_city", False),
                ("Partner portal function", {"contract": 8, "authtype": 4,
                                             "url": "https://alpineridge-portal.azurewebsites.net/api/contact"},
                 "Create", "contact", "contact", None, True),
            ]
        for name, values, msg, table, _reg, filt, managed in specs:
            eid = g.guid()
            self.endpoint_ids[name] = eid
            base = {"name": name, "description": f"{name} ({table} {msg.lower()}s)", "connectionmode": 1,
                    "messageformat": 2, "userclaim": 1, "url": None, "namespaceaddress": None, "path": None,
                    "solutionnamespace": None, "saskeyname": None,
                    "solutionid": self.integration_solution if managed else None, "ismanaged": managed}
            base.update(values)
            self.row("serviceendpoint", eid, base)
            sid = self.step(f"{name}: {msg} of {table}", msg, table, eid, "serviceendpoint", mode=1, stage=40,
                            filtering=filt, managed=managed)
            self.endpoint_steps[sid] = eid
        e = self.endpoint_ids
        self.plant("endpoints_plain_http", [e["Legacy ERP webhook"]] if d else [],
                   "serviceendpoint url or namespaceaddress over http://")
        self.plant("endpoints_key_in_url", [e["Partner portal function"]] if d else [],
                   "serviceendpoint authtype 4 (Webhook Key) or 6 (Http Query String), or a key in the url's query")
        self.plant("endpoints_shared_key", [e["Contact sync queue"]],
                   "serviceendpoint authtype 2 (SAS Key), 7 (Connection String) or 8 (Access Key)")
        if d:
            self.unmanaged = [e["Legacy ERP webhook"],
                              next(s for s, x in self.endpoint_steps.items() if x == e["Legacy ERP webhook"])]
        else:
            self.unmanaged = []

    def roles_and_users(self) -> None:
        g, d = self.g, self.defects
        root_bu = g.bu_ids[next(iter(g.bu_ids))]
        roles: dict[str, str] = {}
        for name, template, managed in (("System Administrator", SYSTEM_ADMINISTRATOR_TEMPLATE, True),
                                        ("System Customizer", "119f245c-3cc8-4b62-b31c-d1a046ced15d", True),
                                        ("Basic User", "d9d20f66-2ddc-4ac2-8c8c-e6d4f7d2b3d0", True),
                                        ("Salesperson", "a0d8e5b4-4f1c-4a83-9c0d-1b0c3f4b6a71", True),
                                        ("Sales Manager", "7e5a2f43-9a3c-4f0e-9d43-58c1f1a2b6c9", True),
                                        ("Integration Service", None, True)):
            rid = g.guid()
            roles[name] = rid
            self.row("role", rid, {"name": name, "_businessunitid_value": root_bu, "roletemplateid": template,
                                   "iscustomizable": True, "ismanaged": managed,
                                   "solutionid": self.integration_solution if template is None else None})
        # The integration's application user: an app registration acting in Dataverse (accessmode 4).
        app_user = g.guid()
        rec = dict(g.tpl["systemuser"])
        rec.update(systemuserid=app_user, fullname="# Alpine Ridge Integration", firstname="#",
                   lastname="Alpine Ridge Integration", domainname=f"integration@{_domain()}",
                   internalemailaddress=f"integration@{_domain()}",
                   azureactivedirectoryobjectid=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
                   applicationid=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)), isdisabled=False,
                   islicensed=False, accessmode=4, _businessunitid_value=root_bu, title="Application user",
                   _ownerid_value=app_user)
        rec["@emu._ownerid_value.type"] = "systemuser"
        rec.update(createdon=g.iso(self.setup), modifiedon=g.iso(self.setup), _createdby_value=g.admin_sys,
                   _modifiedby_value=g.admin_sys)
        self.rows["systemuser"].append((app_user, rec))
        self.app_user = app_user
        for u in g.users:
            if u.sys_id is None:
                continue
            role = {"admin": "System Administrator", "manager": "Sales Manager", "rep": "Salesperson"}.get(
                u.role, "Basic User")
            self.row("systemuserroles", g.guid(), {"systemuserid": u.sys_id, "roleid": roles[role]})
        self.row("systemuserroles", g.guid(), {
            "systemuserid": app_user, "roleid": roles["System Administrator" if d else "Integration Service"]})
        self.plant("app_user_system_administrator", [app_user],
                   "an application user (systemuser.applicationid set) holding the System Administrator role")

    def flows(self) -> None:
        g, d, rng = self.g, self.defects, self.rng
        users = [u for u in g.users if u.sys_id]
        enabled = [u for u in users if u.enabled and not u.crm_disabled]

        def pick(role: str) -> Any:
            return next((u for u in enabled if u.role == role), enabled[0])

        refs: dict[str, str] = {}
        for key, display, bound in (("dataverse", "Dataverse (current environment)", True),
                                    ("outlook", "Office 365 Outlook", True), ("teams", "Microsoft Teams", True),
                                    ("sharepoint", "SharePoint", not d), ("entra_http", "HTTP with Microsoft Entra ID",
                                                                           not d)):
            rid = g.guid()
            logical = f"ar_{key}"
            refs[key] = logical
            self.row("connectionreference", rid, {
                "connectionreferencedisplayname": display, "connectionreferencelogicalname": logical,
                "connectorid": _CONNECTORS[key], "description": f"{display} connection of the integration flows.",
                "connectionid": (uuid.UUID(int=rng.getrandbits(128)).hex if bound else None), "ismanaged": True,
                "statecode": 0, "statuscode": 1})
            if not bound:
                self.planted.setdefault("_unbound", []).append(rid)
        self.plant("connection_references_unbound", self.planted.pop("_unbound", []),
                   "connectionreference with no connectionid")
        admin = pick("admin")
        flows: list[dict[str, Any]] = [
            {"name": "Welcome email for new contacts", "owner": pick("marketing"), "table": "contact", "message": 1,
             "filterexpression": "statecode eq 0 and emailaddress1 ne null",
             "actions": [("outlook", "SendEmailV2", None)]},
            {"name": "Won opportunity to Teams", "owner": pick("manager"), "table": "opportunity", "message": 3,
             "filteringattributes": "statecode", "actions": [("teams", "PostMessageToConversation", None)]},
            {"name": "Nightly account export", "owner": admin, "recurrence": True,
             "actions": [("http", None, "https://api.alpineridge.example/erp/accounts")]},
        ]
        if d:
            departed = [g.users[i] for i in g.departed if g.users[i].sys_id]
            flows += [
                {"name": "My deal alerts", "owner": departed[0], "table": "opportunity", "message": 3,
                 "filteringattributes": "stepname", "actions": [("outlook", "SendEmailV2", None)],
                 "defect": "owner", "managed": False},
                {"name": "Quarter-end reminders", "owner": pick("manager"), "recurrence": True, "state": (0, 1),
                 "actions": [("outlook", "SendEmailV2", None)], "defect": "off"},
                {"name": "Export leads to marketing list", "owner": pick("marketing"), "table": "lead", "message": 1,
                 "filterexpression": "statecode eq 0", "state": (2, 3),
                 "actions": [("sharepoint", "PostItem", None)], "defect": "off"},
                {"name": "Log every email to SharePoint", "owner": pick("success"), "table": "email", "message": 4,
                 "actions": [("sharepoint", "PostItem", None)], "defect": "unfiltered"},
                {"name": "Push orders to ERP", "owner": admin, "table": "opportunity", "message": 3,
                 "filteringattributes": "statecode",
                 "actions": [("http", None, "http://erp.alpineridge.example/api/orders")], "defect": "http",
                 "managed": False},
                {"name": "Notify partner Logic App", "owner": admin, "table": "account", "message": 1,
                 "filterexpression": "accountcategorycode eq 1",
                 "actions": [("http", None, "https://prod-27.westeurope.logic.azure.com:443/workflows/"
                                            "5c8e1f0a9b7d4e2f8a6c3b1d0e9f7a5c/triggers/manual/paths/invoke?"
                                            "api-version=2016-10-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&"
                                            "sig=Zx3vQn8K2mLp0aR7tYw5uJc1eF4hB6dG9sN2kX8qV0o")], "defect": "http"},
            ]
        by_defect: dict[str, list[str]] = {}
        for f in flows:
            fid = g.guid()
            state, status = f.get("state", (1, 2))
            self.row("workflow", fid, {
                "name": f["name"], "description": f["name"], "category": 5, "type": 1, "mode": 0, "scope": 4,
                "primaryentity": f.get("table", "none"), "triggeroncreate": False, "triggerondelete": False,
                "clientdata": json.dumps(_flow_definition(f, refs), separators=(",", ":")),
                "solutionid": self.integration_solution if f.get("managed", True) else None,
                "ismanaged": f.get("managed", True), "statecode": state, "statuscode": status},
                owner=f["owner"].sys_id)
            if "defect" in f:
                by_defect.setdefault(f["defect"], []).append(fid)
            if not f.get("managed", True):
                self.unmanaged.append(fid)
        self.plant("flows_owned_by_disabled_users", by_defect.get("owner", []),
                   "cloud flow (workflow category 5) owned by a user whose Entra account is disabled",
                   entra_ids=[u.graph_id for u in g.users if u.sys_id in {
                       r[1]["_ownerid_value"] for r in self.rows["workflow"] if r[0] in by_defect.get("owner", [])}])
        self.plant("flows_off_or_suspended", by_defect.get("off", []),
                   "cloud flow with statecode 0 (Draft: turned off) or 2 (Suspended)")
        self.plant("flows_unfiltered_triggers", by_defect.get("unfiltered", []),
                   "Dataverse-triggered cloud flow on a high-volume table with neither filteringattributes nor "
                   "filterexpression")
        self.plant("flows_insecure_http", by_defect.get("http", []),
                   "cloud flow with an HTTP action to an http:// URL or to a URL carrying a signature (sig=)")
        # Classic workflows and business rules.
        self.workflows: dict[str, str] = {}
        for name, cat, table, mode in (("Notify account manager of new opportunity", 0, "opportunity", 0),
                                       ("Set account category from revenue", 0, "account", 0),
                                       ("Require phone for key accounts", 2, "account", 1),
                                       ("Lead topic is required", 2, "lead", 1)):
            wid = g.guid()
            self.workflows[name] = wid
            self.row("workflow", wid, {
                "name": name, "description": name, "category": cat, "type": 1, "mode": mode, "scope": 4,
                "primaryentity": table, "triggeroncreate": cat == 0, "triggerondelete": False,
                "triggeronupdateattributelist": "revenue" if "revenue" in name else None,
                "clientdata": None, "solutionid": self.integration_solution, "ismanaged": True,
                "statecode": 1, "statuscode": 2})

    def environment(self) -> None:
        g, d = self.g, self.defects
        missing: list[str] = []
        for schema, display, typ, default, value in (
                ("ar_ServiceBusNamespace", "Service Bus namespace", 100000000, None, _SB_NAMESPACE),
                ("ar_ErpBaseUrl", "ERP base URL", 100000000, "https://api.alpineridge.example/erp", None),
                ("ar_FinanceApprovalThreshold", "Finance approval threshold", 100000001, "50000", "75000"),
                ("ar_PartnerPortalKey", "Partner portal key", 100000005, None, None if d else "ar-kv/portal-key"),
                ("ar_TelemetryEnabled", "Telemetry enabled", 100000002, None, None if d else "yes")):
            did = g.guid()
            self.row("environmentvariabledefinition", did, {
                "schemaname": schema, "displayname": display, "type": typ, "defaultvalue": default,
                "isrequired": default is None, "ismanaged": True, "statecode": 0, "statuscode": 1})
            if value is not None:
                self.row("environmentvariablevalue", g.guid(), {
                    "schemaname": schema, "value": value, "_environmentvariabledefinitionid_value": did,
                    "ismanaged": False, "statecode": 0, "statuscode": 1})
            elif default is None:
                missing.append(did)
        self.plant("environment_variables_without_value", missing,
                   "environmentvariabledefinition with no defaultvalue and no environmentvariablevalue")

    def jobs_and_traces(self) -> None:
        g, d, rng = self.g, self.defects, self.rng
        per_step = max(20, g.counts["accounts"] // 8)
        steps = {sid: rec for sid, rec in self.rows["sdkmessageprocessingstep"]}
        failing_endpoint = self.endpoint_ids["Account events topic"]
        kept_forever = ({next(s for s, e in self.endpoint_steps.items() if e == self.endpoint_ids["Contact sync queue"]),
                         self.unfiltered_update} if d else set())
        failed: list[str] = []
        retained_steps: set[str] = set()
        errors = {
            "Account events topic": [
                (-2147204720, "The messaging entity 'sb://alpineridge-integration.servicebus.windows.net/crm-accounts' "
                              "could not be found."),
                (-2147220970, "Unauthorized. The SAS token has expired."),
                (-2147204723, "The operation did not complete within the allotted timeout of 00:01:00.")],
        }
        for sid, rec in steps.items():
            if rec["mode"] != 1:
                continue
            endpoint = self.endpoint_steps.get(sid)
            msg = next(n for n, m in self.messages.items() if m == rec["_sdkmessageid_value"])
            table = next(t for (m, t), f in self.filters.items() if f == rec["_sdkmessagefilterid_value"])
            window = 180 if sid in kept_forever else 25
            n = per_step * (3 if sid in kept_forever else 1)
            for _ in range(n):
                created = self.now - rng.randint(60, window * DAY - 60)
                fail = d and endpoint == failing_endpoint and rng.random() < 0.3
                jid = g.guid()
                code, text = rng.choice(errors["Account events topic"]) if fail else (None, None)
                self.row("asyncoperation", jid, {
                    "name": rec["name"], "operationtype": 1, "statecode": 3, "statuscode": 31 if fail else 30,
                    "messagename": msg, "primaryentitytype": table, "_owningextensionid_value": sid,
                    "errorcode": code, "message": text, "friendlymessage": text,
                    "retrycount": 3 if fail else 0, "depth": 1, "startedon": g.iso(created + 2),
                    "completedon": g.iso(created + 3 + rng.randint(0, 5)), "postponeuntil": None},
                    created=created, owner=self.app_user)
                if fail:
                    failed.append(jid)
                if created < self.now - 30 * DAY:
                    retained_steps.add(sid)
        # The classic workflow's jobs (operationtype 10); planted: a share fails, some wait forever.
        backlog: list[str] = []
        wf = self.workflows["Notify account manager of new opportunity"]
        for _ in range(per_step):
            # Within 25 days of the anchor, so a 30-day window read a few days later still holds them all.
            created = self.now - rng.randint(60, 25 * DAY)
            roll = rng.random()
            fail = d and roll < 0.4
            wait = d and 0.4 <= roll < 0.55 and created < self.now - 2 * DAY
            jid = g.guid()
            self.row("asyncoperation", jid, {
                "name": "Notify account manager of new opportunity", "operationtype": 10,
                "statecode": 1 if wait else 3, "statuscode": 10 if wait else (31 if fail else 30),
                "messagename": "Create", "primaryentitytype": "opportunity", "_workflowactivationid_value": wf,
                "errorcode": -2147220891 if fail else None,
                "message": "The user with SystemUserId was not found or is disabled." if fail else None,
                "friendlymessage": "The process owner is disabled." if fail else None,
                "retrycount": 1 if (fail or wait) else 0, "depth": 1, "startedon": g.iso(created + 1),
                "completedon": None if wait else g.iso(created + 4),
                "postponeuntil": g.iso(created + HOUR) if wait else None}, created=created, owner=self.app_user)
            if fail:
                failed.append(jid)
            if wait:
                backlog.append(jid)
        self.plant("failed_system_jobs", failed,
                   "asyncoperation statuscode 31 (Failed) created in the last 30 days")
        self.plant("endpoints_failing_jobs", [failing_endpoint],
                   "service endpoint whose system jobs in the last 30 days failed at 5% or more")
        self.plant("system_job_backlog", backlog,
                   "asyncoperation waiting (statecode 0 or 1, statuscode 0 or 10) for more than 24 hours")
        self.plant("succeeded_jobs_retained", sorted(retained_steps),
                   "steps whose succeeded system jobs are kept beyond 30 days (nothing deletes them)")
        # Trace log (plugintracelogsetting All; Dataverse deletes trace rows after 24 hours).
        traces = max(10, g.counts["contacts"] // 40)
        for sid, (typ, mode) in self.plugin_steps.items():
            rec = steps[sid]
            msg = next(n for n, m in self.messages.items() if m == rec["_sdkmessageid_value"])
            table = next(t for (m, t), f in self.filters.items() if f == rec["_sdkmessagefilterid_value"])
            slow = sid in self.hot_sync and d
            for _ in range(traces):
                start = self.now - rng.randint(60, 24 * HOUR - 60)
                ms = int(rng.lognormvariate(7.2, 0.5)) if slow else int(rng.lognormvariate(3.4, 0.6))
                boom = slow and rng.random() < 0.08
                self.row("plugintracelog", g.guid(), {
                    "typename": f"AlpineRidge.Plugins.{typ}", "messagename": msg, "primaryentity": table,
                    "mode": mode, "operationtype": 1, "pluginstepid": sid,
                    "correlationid": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "depth": 1,
                    "performanceexecutionduration": ms, "performanceexecutionstarttime": g.iso(start),
                    "exceptiondetails": ("System.TimeoutException: The plug-in execution exceeded the time limit."
                                         if boom else None),
                    "messageblock": f"{typ} handled {msg} of {table} in {ms} ms"}, created=start)

    def organization(self) -> None:
        g, d = self.g, self.defects
        oid = g.guid()
        self.row("organization", oid, {
            "name": g_company(), "isauditenabled": not d, "isuseraccessauditenabled": True,
            "isreadauditenabled": False, "auditretentionperiodv2": 365, "plugintracelogsetting": 2,
            "expirechangetrackingindays": 2 if d else 7, "expiresubscriptionsindays": 90,
            "_basecurrencyid_value": g.currency_ids[0] if g.currency_ids else None})
        self.plant("auditing_off", [oid], "organization.isauditenabled false")
        self.plant("change_tracking_retention_short", [oid],
                   "organization.expirechangetrackingindays shorter than the sync gap to tolerate (3 days)",
                   days=2)

    def finish(self) -> None:
        self.plant("unmanaged_customisations", self.unmanaged,
                   "unmanaged (ismanaged false) plug-in steps, service endpoints and cloud flows in production")
        for table, rows in self.rows.items():
            if rows:
                self.g.load(table, rows)
        self.g.defects.update(self.planted)


def _domain() -> str:
    from bridgekit.emulator.synth import COMPANY_DOMAIN

    return COMPANY_DOMAIN


def g_company() -> str:
    """The company name (from the generator, imported late: synth imports this module)."""
    from bridgekit.emulator.synth import COMPANY_NAME

    return COMPANY_NAME


def _flow_definition(f: dict[str, Any], refs: dict[str, str]) -> dict[str, Any]:
    """A cloud flow's ``clientdata``: ``properties.connectionReferences`` and the Logic Apps ``definition``."""
    used: dict[str, Any] = {}
    if f.get("recurrence"):
        triggers: dict[str, Any] = {"Recurrence": {"type": "Recurrence",
                                                   "recurrence": {"frequency": "Day", "interval": 1}}}
    else:
        params: dict[str, Any] = {"subscriptionRequest/message": f["message"],
                                  "subscriptionRequest/entityname": f["table"], "subscriptionRequest/scope": 4}
        if f.get("filteringattributes"):
            params["subscriptionRequest/filteringattributes"] = f["filteringattributes"]
        if f.get("filterexpression"):
            params["subscriptionRequest/filterexpression"] = f["filterexpression"]
        used["shared_commondataserviceforapps"] = refs["dataverse"]
        triggers = {"When_a_row_is_added,_modified_or_deleted": {
            "type": "OpenApiConnectionWebhook",
            "inputs": {"host": {"connectionName": "shared_commondataserviceforapps",
                                "operationId": "SubscribeWebhookTrigger",
                                "apiId": _CONNECTORS["dataverse"]}, "parameters": params,
                       "authentication": "@parameters('$authentication')"}}}
    actions: dict[str, Any] = {}
    for i, (conn, op, uri) in enumerate(f["actions"]):
        if conn == "http":
            actions[f"HTTP_{i}"] = {"type": "Http", "inputs": {"method": "POST", "uri": uri,
                                                              "body": "@triggerOutputs()?['body']"},
                                    "runAfter": {}}
            continue
        api = _CONNECTORS[conn].rsplit("/", 1)[1]
        used[api] = refs[conn]
        actions[f"{op}_{i}"] = {"type": "OpenApiConnection", "inputs": {
            "host": {"connectionName": api, "operationId": op, "apiId": _CONNECTORS[conn]},
            "parameters": {}, "authentication": "@parameters('$authentication')"}, "runAfter": {}}
    return {"properties": {
        "connectionReferences": {api: {"runtimeSource": "embedded", "connection": {"connectionReferenceLogicalName":
                                                                                   logical},
                                       "api": {"name": api}} for api, logical in used.items()},
        "definition": {"$schema": "https://schema.management.azure.com/providers/Microsoft.Logic/schemas/"
                                  "2016-06-01/workflowdefinition.json#", "contentVersion": "1.0.0.0",
                       "parameters": {"$connections": {"defaultValue": {}, "type": "Object"},
                                      "$authentication": {"defaultValue": {}, "type": "SecureObject"}},
                       "triggers": triggers, "actions": actions}},
        "schemaVersion": "1.0.0.0"}


def generate_platform(g: _Gen, *, defects: bool = True) -> None:
    """Generate the integration layer of ``g``'s company into its store (and its planted defects into ``g.defects``).

    Args:
        g: The generation run (after the business data).
        defects: Plant the integration defects (False: the clean tenant).
    """
    p = _Platform(g, defects)
    p.solutions()
    p.plugins()
    p.endpoints()
    p.roles_and_users()
    p.flows()
    p.environment()
    p.jobs_and_traces()
    p.organization()
    p.finish()
