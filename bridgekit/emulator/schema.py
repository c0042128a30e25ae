"""Definitions of the emulated Dataverse tables (columns, types, choices, lookups) and Graph resources.

This module is data: the Dataverse metadata endpoints, the OData query engine, the synthetic company
and the live-activity generator all read it, so a column exists in exactly one place.
Attribute type names follow Dataverse's ``AttributeTypeName`` values (``StringType``, ``LookupType``,
``PicklistType``, ``MoneyType``, ...) and ``AttributeType`` codes (``String``, ``Lookup``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "ACTIVITY_TYPES", "GRAPH_RESOURCES", "INDUSTRY", "PLATFORM_TABLES", "REGARDING_TARGETS", "TABLES", "Column", "GraphResource",
    "OptionSet", "Table", "table_by_set",
]


@dataclass(frozen=True)
class OptionSet:
    """A choice column's options: value -> label."""

    name: str
    options: dict[int, str]
    is_global: bool = False
    #: For a Status column: status value -> the state value it belongs to (StatusOptionMetadata.State).
    state_of: dict[int, int] = field(default_factory=dict)
    #: For a State column: state value -> its default status value (StateOptionMetadata.DefaultStatus).
    default_status: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    """One Dataverse attribute.

    ``type`` is the AttributeType (``String``, ``Memo``, ``Integer``, ``BigInt``, ``Decimal``, ``Double``,
    ``Money``, ``Boolean``, ``DateTime``, ``Lookup``, ``Customer``, ``Owner``, ``Picklist``, ``State``,
    ``Status``, ``Uniqueidentifier``, ``EntityName``). For lookups ``targets`` lists the target tables
    and the JSON property is ``_<name>_value``.
    """

    name: str
    type: str
    display: str = ""
    max_length: int | None = None
    required: bool = False
    targets: tuple[str, ...] = ()
    options: OptionSet | None = None
    read_only: bool = False
    #: Money/Decimal/Double precision (digits after the point).
    precision: int | None = None
    #: DateTime behaviour ``DateOnly`` (served as ``YYYY-MM-DD``); other DateTime columns are UTC
    #: ``YYYY-MM-DDTHH:MM:SSZ``.
    date_only: bool = False
    description: str = ""

    @property
    def is_lookup(self) -> bool:
        return self.type in ("Lookup", "Customer", "Owner")

    @cached_property
    def json_name(self) -> str:
        """The property name in Web API JSON (``_x_value`` for lookups)."""
        return f"_{self.name}_value" if self.is_lookup else self.name


@dataclass(frozen=True)
class Table:
    """One Dataverse table (EntityDefinition)."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    columns: tuple[Column, ...]
    change_tracking: bool = True
    alternate_keys: tuple[tuple[str, ...], ...] = ()
    ownership: str = "UserOwned"
    is_activity: bool = False
    display: str = ""
    display_collection: str = ""
    object_type_code: int = 0
    description: str = ""

    def column(self, name: str) -> Column | None:
        """Column by logical name or by JSON name (``_x_value``)."""
        return self._by_name.get(name)

    @cached_property
    def _by_name(self) -> dict[str, Column]:
        # Served rows look a column up for every key of every row: keep it a dict lookup.
        index: dict[str, Column] = {}
        for c in reversed(self.columns):  # first definition wins, as the linear scan did
            index[c.json_name] = c
            index[c.name] = c
        return index


@dataclass(frozen=True)
class GraphResource:
    """One Graph collection the emulator serves (stored as collection ``graph.<name>``)."""

    name: str
    max_top: int
    default_top: int
    delta: bool
    fields: tuple[str, ...] = field(default_factory=tuple)
    #: Properties served when the request has no ``$select`` (Graph returns a default set for users).
    default_select: tuple[str, ...] = ()
    #: True when the collection lives under a user (``/users/{id}/messages``); the owner's id is the
    #: record's internal ``@emu.user`` key.
    per_user: bool = False


# -- helpers to keep the definitions short ---------------------------------------------------------


def _s(name: str, display: str, max_length: int = 100, *, required: bool = False,
       read_only: bool = False) -> Column:
    return Column(name, "String", display, max_length=max_length, required=required, read_only=read_only)


def _memo(name: str, display: str, max_length: int = 2000) -> Column:
    return Column(name, "Memo", display, max_length=max_length)


def _int(name: str, display: str) -> Column:
    return Column(name, "Integer", display)


def _money(name: str, display: str) -> Column:
    return Column(name, "Money", display, precision=2)


def _dt(name: str, display: str, *, read_only: bool = False, date_only: bool = False) -> Column:
    return Column(name, "DateTime", display, read_only=read_only, date_only=date_only)


def _bool(name: str, display: str, no: str = "No", yes: str = "Yes") -> Column:
    # Boolean columns carry a two-option set (BooleanOptionSetMetadata FalseOption/TrueOption);
    # the labels feed FormattedValue annotations.
    return Column(name, "Boolean", display, options=OptionSet(name, {0: no, 1: yes}))


def _pick(name: str, display: str, options: dict[int, str], *, is_global: bool = False,
          set_name: str | None = None) -> Column:
    return Column(name, "Picklist", display, options=OptionSet(set_name or name, options, is_global))


def _lookup(name: str, display: str, *targets: str, read_only: bool = False) -> Column:
    return Column(name, "Lookup", display, targets=targets, read_only=read_only)


def _state(table: str, states: dict[int, tuple[str, int]]) -> Column:
    """statecode: value -> (label, default status)."""
    return Column("statecode", "State", "Status", required=True, options=OptionSet(
        f"{table}_statecode", {v: lab for v, (lab, _) in states.items()},
        default_status={v: d for v, (_, d) in states.items()}))


def _status(table: str, statuses: dict[int, tuple[str, int]]) -> Column:
    """statuscode: value -> (label, state it belongs to)."""
    return Column("statuscode", "Status", "Status Reason", options=OptionSet(
        f"{table}_statuscode", {v: lab for v, (lab, _) in statuses.items()},
        state_of={v: s for v, (_, s) in statuses.items()}))


def _system(*, owner: bool = True) -> tuple[Column, ...]:
    """Columns every standard table has (protocols.md §1.3: common system columns)."""
    cols = [
        _dt("createdon", "Created On", read_only=True),
        _dt("modifiedon", "Modified On", read_only=True),
        _lookup("createdby", "Created By", "systemuser", read_only=True),
        _lookup("modifiedby", "Modified By", "systemuser", read_only=True),
        Column("versionnumber", "BigInt", "Version Number", read_only=True),
    ]
    if owner:
        cols += [
            Column("ownerid", "Owner", "Owner", required=True, targets=("systemuser", "team")),
            _lookup("owningbusinessunit", "Owning Business Unit", "businessunit", read_only=True),
        ]
    return tuple(cols)


def _pk(name: str) -> Column:
    return Column(name, "Uniqueidentifier", "Unique identifier", read_only=True)


# Dataverse's global "Industry" choice as labelled on the account table.
INDUSTRY = {
    1: "Accounting", 2: "Agriculture and Non-petrol Natural Resource Extraction",
    3: "Broadcasting Printing and Publishing", 4: "Brokers", 5: "Building Supply Retail",
    6: "Business Services", 7: "Consulting", 8: "Consumer Services",
    9: "Design, Direction and Creative Management", 10: "Distributors, Dispatchers and Processors",
    11: "Doctor's Offices and Clinics", 12: "Durable Manufacturing", 13: "Eating and Drinking Places",
    14: "Entertainment Retail", 15: "Equipment Rental and Leasing", 16: "Financial",
    17: "Food and Tobacco Processing", 18: "Inbound Capital Intensive Processing",
    19: "Inbound Repair and Services", 20: "Insurance", 21: "Legal Services",
    22: "Non-Durable Merchandise Retail", 23: "Outbound Consumer Service",
    24: "Petrochemical Extraction and Distribution", 25: "Service Retail", 26: "SIG Affiliations",
    27: "Social Services", 28: "Special Outbound Trade Contractors", 29: "Specialty Realty",
    30: "Transportation", 31: "Utility Creation and Distribution", 32: "Vehicle Retail", 33: "Wholesale",
}

_ACTIVE_INACTIVE_STATE = {0: ("Active", 1), 1: ("Inactive", 2)}
_ACTIVE_INACTIVE_STATUS = {1: ("Active", 0), 2: ("Inactive", 1)}
_ADDRESS = (
    _s("address1_line1", "Address 1: Street 1", 250),
    _s("address1_city", "Address 1: City", 80),
    _s("address1_stateorprovince", "Address 1: State/Province", 50),
    _s("address1_postalcode", "Address 1: ZIP/Postal Code", 20),
    _s("address1_country", "Address 1: Country/Region", 80),
)
_PRIORITY = {0: "Low", 1: "Normal", 2: "High"}
REGARDING_TARGETS = ("account", "contact", "opportunity", "lead")


def _activity_common(table: str) -> tuple[Column, ...]:
    """Columns shared by activitypointer and every activity type."""
    return (
        _pk("activityid"),
        _s("subject", "Subject", 400, required=True),
        _memo("description", "Description", 100000),
        # Regarding is a polymorphic lookup (regardingobjectid_<target>_<activity> navigation
        # properties, protocols.md §1.4); stored values carry "@emu._regardingobjectid_value.type".
        _lookup("regardingobjectid", "Regarding", *REGARDING_TARGETS),
        _dt("scheduledstart", "Start Date"),
        _dt("scheduledend", "Due Date"),
        _dt("actualstart", "Actual Start"),
        _dt("actualend", "Actual End"),
        _int("actualdurationminutes", "Actual Duration"),
        _int("scheduleddurationminutes", "Duration"),
        _pick("prioritycode", "Priority", _PRIORITY, set_name=f"{table}_prioritycode"),
        _bool("isregularactivity", "Is Regular Activity"),
    )


# -- the tables --------------------------------------------------------------------------------------

_ACCOUNT = Table(
    "account", "accounts", "accountid", "name", display="Account", display_collection="Accounts",
    object_type_code=1, alternate_keys=(("accountnumber",),),
    description="Business that represents a customer or potential customer.",
    columns=(
        _pk("accountid"),
        _s("name", "Account Name", 160, required=True),
        _s("accountnumber", "Account Number", 20),
        _s("telephone1", "Main Phone", 50),
        _s("emailaddress1", "Email", 100),
        _s("websiteurl", "Website", 200),
        *_ADDRESS,
        _pick("industrycode", "Industry", INDUSTRY),
        _pick("customertypecode", "Relationship Type", {
            1: "Competitor", 2: "Consultant", 3: "Customer", 4: "Investor", 5: "Partner", 6: "Influencer",
            7: "Press", 8: "Prospect", 9: "Reseller", 10: "Supplier", 11: "Vendor", 12: "Other"}),
        _pick("accountcategorycode", "Category", {1: "Preferred Customer", 2: "Standard"}),
        _money("revenue", "Annual Revenue"),
        _int("numberofemployees", "Number of Employees"),
        _lookup("primarycontactid", "Primary Contact", "contact"),
        _lookup("parentaccountid", "Parent Account", "account"),
        _lookup("transactioncurrencyid", "Currency", "transactioncurrency"),
        _memo("description", "Description"),
        _bool("creditonhold", "Credit Hold"),
        _money("creditlimit", "Credit Limit"),
        _bool("donotemail", "Do not allow Emails", "Allow", "Do Not Allow"),
        _state("account", _ACTIVE_INACTIVE_STATE),
        _status("account", _ACTIVE_INACTIVE_STATUS),
        *_system(),
    ),
)

_CONTACT = Table(
    "contact", "contacts", "contactid", "fullname", display="Contact", display_collection="Contacts",
    object_type_code=2, alternate_keys=(("employeeid",),),
    description="Person with whom a business unit has a relationship.",
    columns=(
        _pk("contactid"),
        _s("firstname", "First Name", 50),
        _s("lastname", "Last Name", 50, required=True),
        # fullname is composed by the platform from first and last name.
        _s("fullname", "Full Name", 160, read_only=True),
        _s("emailaddress1", "Email", 100),
        _s("telephone1", "Business Phone", 50),
        _s("mobilephone", "Mobile Phone", 50),
        _s("jobtitle", "Job Title", 100),
        _s("department", "Department", 100),
        # Unique per contact in this tenant, so it serves as the alternate key (email is not unique).
        _s("employeeid", "Employee", 50),
        Column("parentcustomerid", "Customer", "Company Name", targets=("account", "contact")),
        _dt("birthdate", "Birthday", date_only=True),
        _pick("gendercode", "Gender", {1: "Male", 2: "Female"}),
        _pick("preferredcontactmethodcode", "Preferred Method of Contact",
              {1: "Any", 2: "Email", 3: "Phone", 4: "Fax", 5: "Mail"}),
        _bool("donotemail", "Do not allow Emails", "Allow", "Do Not Allow"),
        *_ADDRESS,
        _lookup("transactioncurrencyid", "Currency", "transactioncurrency"),
        _memo("description", "Description"),
        _state("contact", _ACTIVE_INACTIVE_STATE),
        _status("contact", _ACTIVE_INACTIVE_STATUS),
        *_system(),
    ),
)

_LEAD = Table(
    "lead", "leads", "leadid", "fullname", display="Lead", display_collection="Leads", object_type_code=4,
    description="Prospect or potential sales opportunity.",
    columns=(
        _pk("leadid"),
        _s("subject", "Topic", 300, required=True),
        _s("firstname", "First Name", 50),
        _s("lastname", "Last Name", 50, required=True),
        _s("fullname", "Name", 160, read_only=True),
        _s("companyname", "Company Name", 100),
        _s("jobtitle", "Job Title", 100),
        _s("emailaddress1", "Email", 100),
        _s("telephone1", "Business Phone", 50),
        *_ADDRESS,
        _pick("leadsourcecode", "Lead Source", {
            1: "Advertisement", 2: "Employee Referral", 3: "External Referral", 4: "Partner",
            5: "Public Relations", 6: "Seminar", 7: "Trade Show", 8: "Web", 9: "Word of Mouth", 10: "Other"}),
        _pick("leadqualitycode", "Rating", {1: "Hot", 2: "Warm", 3: "Cold"}),
        _pick("industrycode", "Industry", INDUSTRY, set_name="lead_industrycode"),
        _money("estimatedamount", "Est. Value"),
        _money("revenue", "Annual Revenue"),
        _int("numberofemployees", "No. of Employees"),
        _lookup("parentaccountid", "Existing Account", "account"),
        _lookup("parentcontactid", "Existing Contact", "contact"),
        Column("customerid", "Customer", "Customer", targets=("account", "contact")),
        _lookup("qualifyingopportunityid", "Qualifying Opportunity", "opportunity"),
        _lookup("transactioncurrencyid", "Currency", "transactioncurrency"),
        _memo("description", "Description"),
        _state("lead", {0: ("Open", 1), 1: ("Qualified", 3), 2: ("Disqualified", 4)}),
        _status("lead", {1: ("New", 0), 2: ("Contacted", 0), 3: ("Qualified", 1), 4: ("Lost", 2),
                         5: ("Cannot Contact", 2), 6: ("No Longer Interested", 2), 7: ("Canceled", 2)}),
        *_system(),
    ),
)

_OPPORTUNITY = Table(
    "opportunity", "opportunities", "opportunityid", "name", display="Opportunity",
    display_collection="Opportunities", object_type_code=3,
    description="Potential revenue-generating event, or sale to an account, which needs to be tracked.",
    columns=(
        _pk("opportunityid"),
        _s("name", "Topic", 300, required=True),
        _money("estimatedvalue", "Est. Revenue"),
        _money("actualvalue", "Actual Revenue"),
        _money("budgetamount", "Budget Amount"),
        # Date-only format with UserLocal behaviour: served as a full UTC timestamp at midnight.
        _dt("estimatedclosedate", "Est. Close Date"),
        _dt("actualclosedate", "Actual Close Date"),
        _int("closeprobability", "Probability"),
        _s("stepname", "Pipeline Phase", 200),
        _pick("salesstage", "Sales Stage", {0: "Qualify", 1: "Develop", 2: "Propose", 3: "Close"}),
        _pick("opportunityratingcode", "Rating", {1: "Hot", 2: "Warm", 3: "Cold"}),
        _pick("purchasetimeframe", "Purchase Timeframe", {
            0: "Immediate", 1: "This Quarter", 2: "Next Quarter", 3: "This Year", 4: "Unknown"}, is_global=True),
        _pick("prioritycode", "Priority", {1: "Default Value"}, set_name="opportunity_prioritycode"),
        _lookup("parentaccountid", "Account", "account"),
        _lookup("parentcontactid", "Contact", "contact"),
        Column("customerid", "Customer", "Potential Customer", targets=("account", "contact")),
        _lookup("originatingleadid", "Originating Lead", "lead"),
        _lookup("transactioncurrencyid", "Currency", "transactioncurrency"),
        _memo("description", "Description"),
        _state("opportunity", {0: ("Open", 1), 1: ("Won", 3), 2: ("Lost", 4)}),
        _status("opportunity", {1: ("In Progress", 0), 2: ("On Hold", 0), 3: ("Won", 1),
                                4: ("Canceled", 2), 5: ("Out-Sold", 2)}),
        *_system(),
    ),
)

_SYSTEMUSER = Table(
    "systemuser", "systemusers", "systemuserid", "fullname", display="User", display_collection="Users",
    object_type_code=8, ownership="BusinessOwned", alternate_keys=(("azureactivedirectoryobjectid",),),
    description="Person with access to the Microsoft CRM system and who owns objects in the database.",
    columns=(
        _pk("systemuserid"),
        _s("fullname", "Full Name", 200, read_only=True),
        _s("firstname", "First Name", 64),
        _s("lastname", "Last Name", 64),
        _s("domainname", "User Name", 1024, required=True),
        _s("internalemailaddress", "Primary Email", 100),
        # The Entra ID object id of the user: the join key to Graph /users.
        Column("azureactivedirectoryobjectid", "Uniqueidentifier", "Azure AD Object ID"),
        # Set for application users (an app registration acting in Dataverse), null for people.
        Column("applicationid", "Uniqueidentifier", "Application ID"),
        _bool("isdisabled", "Status", "Enabled", "Disabled"),
        _bool("islicensed", "User Licensed"),
        _pick("accessmode", "Access Mode", {
            0: "Read-Write", 1: "Administrative", 2: "Read", 3: "Support User", 4: "Non-interactive",
            5: "Delegated Admin"}),
        _lookup("businessunitid", "Business Unit", "businessunit"),
        _lookup("parentsystemuserid", "Manager", "systemuser"),
        _s("title", "Title", 128),
        _s("jobtitle", "Job Title", 100),
        _s("mobilephone", "Mobile Phone", 64),
        _s("address1_telephone1", "Main Phone", 64),
        _s("address1_city", "City", 128),
        _s("address1_country", "Country/Region", 128),
        # systemuser inherits from principal, so it carries an ownerid equal to itself (§1.3).
        Column("ownerid", "Owner", "Owner", read_only=True, targets=("systemuser",)),
        *_system(owner=False),
    ),
)

_TEAM = Table(
    "team", "teams", "teamid", "name", display="Team", display_collection="Teams", object_type_code=9,
    ownership="BusinessOwned",
    description="Collection of system users that routinely collaborate.",
    columns=(
        _pk("teamid"),
        _s("name", "Team Name", 160, required=True),
        _memo("description", "Description"),
        _s("emailaddress", "Email", 100),
        _pick("teamtype", "Team Type", {0: "Owner", 1: "Access", 2: "Security Group", 3: "Office Group"}),
        # For Entra-group teams the group's object id: the join key to Graph /groups.
        Column("azureactivedirectoryobjectid", "Uniqueidentifier", "Azure AD Object ID"),
        _bool("isdefault", "Is Default"),
        _lookup("businessunitid", "Business Unit", "businessunit"),
        _lookup("administratorid", "Administrator", "systemuser"),
        Column("ownerid", "Owner", "Owner", read_only=True, targets=("systemuser",)),
        *_system(owner=False),
    ),
)

_BUSINESSUNIT = Table(
    "businessunit", "businessunits", "businessunitid", "name", display="Business Unit",
    display_collection="Business Units", object_type_code=10, ownership="BusinessOwned",
    # Deliberately not enabled for change tracking, so the 0x80072491 path can be exercised (§1.11).
    change_tracking=False,
    description="Business, division, or department in the Microsoft Dynamics 365 database.",
    columns=(
        _pk("businessunitid"),
        _s("name", "Name", 160, required=True),
        _s("divisionname", "Division", 100),
        _s("emailaddress", "Email", 100),
        _s("websiteurl", "Website", 200),
        _s("address1_city", "City", 80),
        _s("address1_country", "Country/Region", 80),
        _lookup("parentbusinessunitid", "Parent Business", "businessunit"),
        _bool("isdisabled", "Is Disabled"),
        *_system(owner=False),
    ),
)

_TRANSACTIONCURRENCY = Table(
    "transactioncurrency", "transactioncurrencies", "transactioncurrencyid", "currencyname",
    display="Currency", display_collection="Currencies", object_type_code=9105,
    ownership="OrganizationOwned", alternate_keys=(("isocurrencycode",),),
    description="Currency in which a financial transaction is carried out.",
    columns=(
        _pk("transactioncurrencyid"),
        _s("currencyname", "Currency Name", 100, required=True),
        _s("isocurrencycode", "Currency Code", 5, required=True),
        _s("currencysymbol", "Currency Symbol", 13),
        Column("exchangerate", "Decimal", "Exchange Rate", precision=10),
        _int("currencyprecision", "Currency Precision"),
        _state("transactioncurrency", _ACTIVE_INACTIVE_STATE),
        _status("transactioncurrency", _ACTIVE_INACTIVE_STATUS),
        *_system(owner=False),
    ),
)

_EMAIL = Table(
    "email", "emails", "activityid", "subject", display="Email", display_collection="Email Messages",
    object_type_code=4202, is_activity=True,
    description="Activity that is delivered using email protocols.",
    columns=(
        *_activity_common("email"),
        _bool("directioncode", "Direction", "Incoming", "Outgoing"),
        _s("sender", "From", 250),
        _memo("torecipients", "To Recipients", 500),
        _s("messageid", "Message ID", 320),
        _int("attachmentcount", "Attachment Count"),
        _state("email", {0: ("Open", 1), 1: ("Completed", 3), 2: ("Canceled", 5)}),
        _status("email", {1: ("Draft", 0), 8: ("Failed", 0), 2: ("Completed", 1), 3: ("Sent", 1),
                          4: ("Received", 1), 6: ("Pending Send", 1), 7: ("Sending", 1), 5: ("Canceled", 2)}),
        *_system(),
    ),
)

_APPOINTMENT = Table(
    "appointment", "appointments", "activityid", "subject", display="Appointment",
    display_collection="Appointments", object_type_code=4201, is_activity=True,
    description="Commitment representing a time interval with start/end times and duration.",
    columns=(
        *_activity_common("appointment"),
        _s("location", "Location", 200),
        _bool("isalldayevent", "All Day Event"),
        _bool("isonlinemeeting", "Is Online Meeting"),
        _s("globalobjectid", "Outlook Appointment Id", 300),
        _state("appointment", {0: ("Open", 1), 1: ("Completed", 3), 2: ("Canceled", 4),
                               3: ("Scheduled", 5)}),
        _status("appointment", {1: ("Free", 0), 2: ("Tentative", 0), 3: ("Completed", 1), 4: ("Canceled", 2),
                                5: ("Busy", 3), 6: ("Out of Office", 3)}),
        *_system(),
    ),
)

_PHONECALL = Table(
    "phonecall", "phonecalls", "activityid", "subject", display="Phone Call", display_collection="Phone Calls",
    object_type_code=4210, is_activity=True,
    description="Activity to track a telephone call.",
    columns=(
        *_activity_common("phonecall"),
        _bool("directioncode", "Direction", "Incoming", "Outgoing"),
        _s("phonenumber", "Phone Number", 200),
        _state("phonecall", {0: ("Open", 1), 1: ("Completed", 2), 2: ("Canceled", 3)}),
        _status("phonecall", {1: ("Open", 0), 2: ("Made", 1), 4: ("Received", 1), 3: ("Canceled", 2)}),
        *_system(),
    ),
)

_TASK = Table(
    "task", "tasks", "activityid", "subject", display="Task", display_collection="Tasks",
    object_type_code=4212, is_activity=True,
    description="Generic activity representing work needed to be done.",
    columns=(
        *_activity_common("task"),
        _int("percentcomplete", "Percent Complete"),
        _s("category", "Category", 250),
        _state("task", {0: ("Open", 2), 1: ("Completed", 5), 2: ("Canceled", 6)}),
        _status("task", {2: ("Not Started", 0), 3: ("In Progress", 0), 4: ("Waiting on someone else", 0),
                         7: ("Deferred", 0), 5: ("Completed", 1), 6: ("Canceled", 2)}),
        *_system(),
    ),
)

ACTIVITY_TYPES = ("email", "appointment", "phonecall", "task")

_ACTIVITYPOINTER = Table(
    "activitypointer", "activitypointers", "activityid", "subject", display="Activity",
    display_collection="Activities", object_type_code=4200, is_activity=True,
    description=("Task performed, or to be performed, by a user. Every email, appointment, phonecall and "
                 "task row also appears here with the same activityid; its statuscode is the generic one "
                 "of its state (Open/Completed/Canceled/Scheduled)."),
    columns=(
        *_activity_common("activitypointer"),
        Column("activitytypecode", "EntityName", "Activity Type", read_only=True, required=True),
        _state("activitypointer", {0: ("Open", 1), 1: ("Completed", 2), 2: ("Canceled", 3),
                                   3: ("Scheduled", 4)}),
        _status("activitypointer", {1: ("Open", 0), 2: ("Completed", 1), 3: ("Canceled", 2), 4: ("Scheduled", 3)}),
        *_system(),
    ),
)

# -- the platform tables: the integration layer as data ---------------------------------------------
# Columns and option values follow the table/entity references on learn.microsoft.com (power-apps/developer/
# data-platform/reference/entities/<table>); docs/integration-surface.md lists the facts and their sources.
# Dataverse does not offer change tracking on these system tables, so none is tracked here.


def _ppick(table: str, name: str, display: str, options: dict[int, str]) -> Column:
    return _pick(name, display, options, set_name=f"{table}_{name}")


def _managed() -> Column:
    return _bool("ismanaged", "Is Managed", "Unmanaged", "Managed")


def _uid(name: str, display: str) -> Column:
    return Column(name, "Uniqueidentifier", display)


_SOLUTION = Table(
    "solution", "solutions", "solutionid", "friendlyname", display="Solution", display_collection="Solutions",
    object_type_code=7100, ownership="OrganizationOwned", change_tracking=False,
    description="A solution which contains CRM customizations.",
    columns=(
        _pk("solutionid"),
        _s("uniquename", "Name", 65, required=True),
        _s("friendlyname", "Display Name", 256, required=True),
        _s("version", "Version", 256, required=True),
        _bool("ismanaged", "Package Type", "Unmanaged", "Managed"),
        _bool("isvisible", "Is Visible Outside Platform"),
        _dt("installedon", "Installed On", read_only=True),
        _memo("description", "Description"),
        *_system(owner=False),
    ),
)

_PLUGINASSEMBLY = Table(
    "pluginassembly", "pluginassemblies", "pluginassemblyid", "name", display="Plug-in Assembly",
    display_collection="Plug-in Assemblies", object_type_code=4605, ownership="OrganizationOwned",
    change_tracking=False, description="Assembly that contains one or more plug-in types.",
    columns=(
        _pk("pluginassemblyid"),
        _s("name", "Name", 256),
        _s("version", "Version", 48),
        _s("publickeytoken", "Public Key Token", 32),
        _ppick("pluginassembly", "isolationmode", "Isolation Mode", {1: "None", 2: "Sandbox", 3: "External"}),
        _ppick("pluginassembly", "sourcetype", "Source Type", {0: "Database", 1: "Disk", 2: "Normal",
                                                              3: "AzureWebApp", 4: "File Store"}),
        _uid("solutionid", "Solution"),
        _managed(),
        *_system(owner=False),
    ),
)

_PLUGINTYPE = Table(
    "plugintype", "plugintypes", "plugintypeid", "name", display="Plug-in Type", display_collection="Plug-in Types",
    object_type_code=4602, ownership="OrganizationOwned", change_tracking=False,
    description="Type that inherits from the IPlugin interface and is contained within a plug-in assembly.",
    columns=(
        _pk("plugintypeid"),
        _s("name", "Name", 256),
        _s("typename", "Type Name", 256),
        _s("friendlyname", "Display Name", 256),
        _s("assemblyname", "Assembly Name", 100),
        _lookup("pluginassemblyid", "Plugin Assembly", "pluginassembly"),
        _bool("isworkflowactivity", "Is Workflow Activity"),
        _uid("solutionid", "Solution"),
        _managed(),
        *_system(owner=False),
    ),
)

_SDKMESSAGE = Table(
    "sdkmessage", "sdkmessages", "sdkmessageid", "name", display="Sdk Message", display_collection="Sdk Messages",
    object_type_code=4606, ownership="OrganizationOwned", change_tracking=False,
    description="Message that is supported by the SDK.",
    columns=(
        _pk("sdkmessageid"),
        _s("name", "Name", 256),
        _s("categoryname", "Category Name", 25),
        _bool("isprivate", "Is Private"),
        *_system(owner=False),
    ),
)

_SDKMESSAGEFILTER = Table(
    "sdkmessagefilter", "sdkmessagefilters", "sdkmessagefilterid", "name", display="Sdk Message Filter",
    display_collection="Sdk Message Filters", object_type_code=4607, ownership="OrganizationOwned",
    change_tracking=False, description="Filter that defines which SDK messages are valid for each type of entity.",
    columns=(
        _pk("sdkmessagefilterid"),
        _s("name", "Name", 256),
        _lookup("sdkmessageid", "SDK Message ID", "sdkmessage"),
        Column("primaryobjecttypecode", "EntityName", "Primary Object Type Code"),
        Column("secondaryobjecttypecode", "EntityName", "Secondary Object Type Code"),
        _bool("iscustomprocessingstepallowed", "Custom Processing Step Allowed"),
        *_system(owner=False),
    ),
)

_SDKMESSAGEPROCESSINGSTEP = Table(
    "sdkmessageprocessingstep", "sdkmessageprocessingsteps", "sdkmessageprocessingstepid", "name",
    display="Sdk Message Processing Step", display_collection="Sdk Message Processing Steps", object_type_code=4608,
    ownership="OrganizationOwned", change_tracking=False,
    description="Stage in the execution pipeline that a plug-in is to execute.",
    columns=(
        _pk("sdkmessageprocessingstepid"),
        _s("name", "Name", 256),
        _memo("description", "Description", 256),
        _lookup("sdkmessageid", "SDK Message", "sdkmessage"),
        _lookup("sdkmessagefilterid", "Sdk Message Filter", "sdkmessagefilter"),
        # The event handler is a plug-in type or a service endpoint (polymorphic lookup).
        _lookup("eventhandler", "Event Handler", "plugintype", "serviceendpoint"),
        _lookup("plugintypeid", "Plug-In Type", "plugintype"),
        _ppick("sdkmessageprocessingstep", "mode", "Execution Mode", {0: "Synchronous", 1: "Asynchronous"}),
        _ppick("sdkmessageprocessingstep", "stage", "Execution Stage", {
            5: "Initial Pre-operation (For internal use only)", 10: "Pre-validation",
            15: "Internal Pre-operation Before External Plugins (For internal use only)", 20: "Pre-operation",
            25: "Internal Pre-operation After External Plugins (For internal use only)", 30: "Main Operation",
            35: "Internal Post-operation Before External Plugins (For internal use only)", 40: "Post-operation",
            45: "Internal Post-operation After External Plugins (For internal use only)",
            50: "Post-operation (Deprecated)", 55: "Final Post-operation (For internal use only)",
            80: "Pre-Commit stage fired before transaction commit (For internal use only)",
            90: "Post-Commit stage fired after transaction commit (For internal use only)"}),
        _int("rank", "Execution Order"),
        _s("filteringattributes", "Filtering Attributes", 100000),
        _ppick("sdkmessageprocessingstep", "supporteddeployment", "Deployment",
               {0: "Server Only", 1: "Microsoft Dynamics 365 Client for Outlook Only", 2: "Both"}),
        _bool("asyncautodelete", "Asynchronous Automatic Delete"),
        _s("configuration", "Configuration", 100000),
        _uid("solutionid", "Solution"),
        _managed(),
        _state("sdkmessageprocessingstep", {0: ("Enabled", 1), 1: ("Disabled", 2)}),
        _status("sdkmessageprocessingstep", {1: ("Enabled", 0), 2: ("Disabled", 1)}),
        *_system(owner=False),
    ),
)

_SERVICEENDPOINT = Table(
    "serviceendpoint", "serviceendpoints", "serviceendpointid", "name", display="Service Endpoint",
    display_collection="Service Endpoints", object_type_code=4618, ownership="OrganizationOwned",
    change_tracking=False, description="Service endpoint that can be contacted.",
    columns=(
        _pk("serviceendpointid"),
        _s("name", "Name", 256),
        _memo("description", "Description"),
        _ppick("serviceendpoint", "contract", "Contract", {
            1: "OneWay", 2: "Queue", 3: "Rest", 4: "TwoWay", 5: "Topic", 6: "Queue_Persistent", 7: "EventHub",
            8: "Webhook", 9: "EventGrid", 10: "ManagedDataLake", 11: "Container Storage"}),
        _ppick("serviceendpoint", "connectionmode", "Connection Mode", {1: "Normal", 2: "Federated"}),
        _ppick("serviceendpoint", "authtype", "Specifies mode of authentication with SB", {
            1: "ACS", 2: "SAS Key", 3: "SAS Token", 4: "Webhook Key", 5: "Http Header", 6: "Http Query String",
            7: "Connection String", 8: "Access Key"}),
        _ppick("serviceendpoint", "messageformat", "Content type of the message", {
            1: ".NETBinary", 2: "Json", 3: "XML"}),
        _ppick("serviceendpoint", "userclaim", "User Information Sent to Service",
               {1: "None", 2: "UserId", 3: "UserInfo"}),
        _s("url", "Url Address", 2000),
        _s("namespaceaddress", "Namespace Address", 255),
        _s("path", "Path", 160),
        _s("solutionnamespace", "Solution Namespace", 160),
        _s("saskeyname", "SASKeyName", 256),
        _uid("solutionid", "Solution"),
        _managed(),
        *_system(owner=False),
    ),
)

_WORKFLOW = Table(
    "workflow", "workflows", "workflowid", "name", display="Process", display_collection="Processes",
    object_type_code=4703, change_tracking=False,
    description="Set of logical rules that define the steps necessary to automate a specific business process, task, "
                "or set of actions to be performed.",
    columns=(
        _pk("workflowid"),
        _s("name", "Process Name", 100, required=True),
        _memo("description", "Description"),
        _ppick("workflow", "category", "Category", {
            0: "Workflow", 1: "Dialog", 2: "Business Rule", 3: "Action", 4: "Business Process Flow",
            5: "Modern Flow", 6: "Desktop Flow", 7: "AI Flow"}),
        _ppick("workflow", "type", "Type", {1: "Definition", 2: "Activation", 3: "Template"}),
        _ppick("workflow", "mode", "Run As", {0: "Background", 1: "Real-time"}),
        _ppick("workflow", "scope", "Scope", {1: "User", 2: "Business Unit", 3: "Parent: Child Business Units",
                                              4: "Organization"}),
        Column("primaryentity", "EntityName", "Primary Entity"),
        _bool("triggeroncreate", "Trigger On Create"),
        _bool("triggerondelete", "Trigger On Delete"),
        _s("triggeronupdateattributelist", "Attributes", 1073741823),
        Column("clientdata", "Memo", "Client Data", max_length=1073741823),
        _uid("solutionid", "Solution"),
        _managed(),
        _state("workflow", {0: ("Draft", 1), 1: ("Activated", 2), 2: ("Suspended", 3)}),
        _status("workflow", {1: ("Draft", 0), 2: ("Activated", 1), 3: ("Company DLP Violation", 2)}),
        *_system(),
    ),
)

_CONNECTIONREFERENCE = Table(
    "connectionreference", "connectionreferences", "connectionreferenceid", "connectionreferencedisplayname",
    display="Connection Reference", display_collection="Connection References", object_type_code=10125,
    change_tracking=False, description="A reference to a connection used by flows and apps in a solution.",
    columns=(
        _pk("connectionreferenceid"),
        _s("connectionreferencedisplayname", "Display Name", 100, required=True),
        _s("connectionreferencelogicalname", "Connection Reference Logical Name", 100),
        _s("connectorid", "Connector ID", 1000),
        _s("connectionid", "Connection ID", 100),
        _memo("description", "Description"),
        _managed(),
        _state("connectionreference", _ACTIVE_INACTIVE_STATE),
        _status("connectionreference", _ACTIVE_INACTIVE_STATUS),
        *_system(),
    ),
)

_ENVIRONMENTVARIABLEDEFINITION = Table(
    "environmentvariabledefinition", "environmentvariabledefinitions", "environmentvariabledefinitionid",
    "schemaname", display="Environment Variable Definition", display_collection="Environment Variable Definitions",
    object_type_code=380, change_tracking=False, description="Contains information about the settable variable: "
    "its type, default value, and etc.",
    columns=(
        _pk("environmentvariabledefinitionid"),
        _s("schemaname", "Schema Name", 100, required=True),
        _s("displayname", "Display Name", 100),
        _ppick("environmentvariabledefinition", "type", "Type", {
            100000000: "String", 100000001: "Number", 100000002: "Boolean", 100000003: "JSON",
            100000004: "Data source", 100000005: "Secret"}),
        _memo("defaultvalue", "Default Value"),
        _bool("isrequired", "Is Required"),
        _managed(),
        _state("environmentvariabledefinition", _ACTIVE_INACTIVE_STATE),
        _status("environmentvariabledefinition", _ACTIVE_INACTIVE_STATUS),
        *_system(),
    ),
)

_ENVIRONMENTVARIABLEVALUE = Table(
    "environmentvariablevalue", "environmentvariablevalues", "environmentvariablevalueid", "schemaname",
    display="Environment Variable Value", display_collection="Environment Variable Values", object_type_code=381,
    change_tracking=False, description="Holds the value for the associated EnvironmentVariableDefinition entity.",
    columns=(
        _pk("environmentvariablevalueid"),
        _s("schemaname", "Schema Name", 100),
        _memo("value", "Value"),
        _lookup("environmentvariabledefinitionid", "Environment Variable Definition", "environmentvariabledefinition"),
        _managed(),
        _state("environmentvariablevalue", _ACTIVE_INACTIVE_STATE),
        _status("environmentvariablevalue", _ACTIVE_INACTIVE_STATUS),
        *_system(),
    ),
)

_ASYNCOPERATION = Table(
    "asyncoperation", "asyncoperations", "asyncoperationid", "name", display="System Job",
    display_collection="System Jobs", object_type_code=4700, change_tracking=False,
    description="Process whose execution can proceed independently or in the background.",
    columns=(
        _pk("asyncoperationid"),
        _s("name", "System Job Name", 256),
        _ppick("asyncoperation", "operationtype", "System Job Type", {
            1: "System Event", 2: "Bulk Email", 3: "Import File Parse", 4: "Transform Parse Data", 5: "Import",
            6: "Activity Propagation", 7: "Duplicate Detection Rule Publish", 8: "Bulk Duplicate Detection",
            9: "SQM Data Collection", 10: "Workflow", 11: "Quick Campaign", 12: "Matchcode Update",
            13: "Bulk Delete", 14: "Deletion Service", 15: "Index Management", 16: "Collect Organization Statistics",
            17: "Import Subprocess", 18: "Calculate Organization Storage Size", 19: "Collect Organization Database Statistics",
            20: "Collection Organization Size Statistics", 21: "Database Tuning", 22: "Calculate Organization Maximum Storage Size",
            23: "Bulk Delete Subprocess", 24: "Update Statistic Intervals", 25: "Organization Full Text Catalog Index",
            26: "Database log backup", 27: "Update Contract States", 28: "DBCC SHRINKDATABASE maintenance job",
            29: "DBCC SHRINKFILE maintenance job", 30: "Reindex all indices maintenance job",
            31: "Storage Limit Notification", 32: "Cleanup inactive workflow assemblies", 35: "Recurring Series Expansion",
            38: "Import Sample Data", 40: "Goal Roll Up", 41: "Audit Partition Creation",
            42: "Check For Language Pack Updates", 43: "Provision Language Pack", 44: "Update Organization Database",
            45: "Update Solution", 46: "Regenerate Entity Row Count Snapshot Data",
            47: "Regenerate Read Share Snapshot Data", 49: "Post to Yammer", 50: "Outgoing Activity",
            51: "Incoming Email Processing", 52: "Mailbox Test Access", 53: "Encryption Health Check",
            54: "Execute Async Request", 56: "Update Entitlement States", 57: "Calculate Rollup Field",
            58: "Mass Calculate Rollup Field", 59: "Import Translation", 62: "Convert Date And Time Behavior",
            63: "EntityKey Index Creation", 65: "Update Knowledge Article States", 68: "Resource Booking Sync",
            69: "Relationship Assistant Cards", 71: "Cleanup Solution Components", 72: "App Module Metadata Operation",
            73: "ALM Anomaly Detection Operation", 75: "Flow Notification", 76: "Ribbon Client Metadata Operation",
            79: "Callback Registration Expander Operation", 90: "CascadeAssign", 91: "CascadeDelete",
            92: "Event Expander Operation", 93: "Import Solution Metadata", 94: "Bulk Delete File Attachment",
            95: "Refresh Business Unit for Records Owned By Principal", 96: "Revoke Inherited Access",
            100: "Create Or Refresh Virtual Entity", 201: "Provision language for user",
            12801: "Cascade Grant or Revoke Access Version Tracking Async Operation",
            190690091: "AI Builder Training Events", 190690092: "AI Builder Prediction Events"}),
        _state("asyncoperation", {0: ("Ready", 0), 1: ("Suspended", 10), 2: ("Locked", 20), 3: ("Completed", 30)}),
        _status("asyncoperation", {0: ("Waiting For Resources", 0), 10: ("Waiting", 1), 20: ("In Progress", 2),
                                   21: ("Pausing", 2), 22: ("Canceling", 2), 30: ("Succeeded", 3),
                                   31: ("Failed", 3), 32: ("Canceled", 3)}),
        _s("messagename", "Message Name", 160),
        Column("primaryentitytype", "EntityName", "Entity Type"),
        _lookup("owningextensionid", "Owning Extension", "sdkmessageprocessingstep"),
        _lookup("workflowactivationid", "Process", "workflow"),
        _lookup("regardingobjectid", "Regarding", "account", "contact", "opportunity", "lead"),
        _memo("message", "Message", 1073741823),
        _memo("friendlymessage", "Friendly message", 1073741823),
        _int("errorcode", "Error Code"),
        _int("retrycount", "Retry Count"),
        _int("depth", "Depth"),
        _dt("startedon", "Started On", read_only=True),
        _dt("completedon", "Completed On", read_only=True),
        _dt("postponeuntil", "Postpone Until"),
        *_system(),
    ),
)

_PLUGINTRACELOG = Table(
    "plugintracelog", "plugintracelogs", "plugintracelogid", "typename", display="Plug-in Trace Log",
    display_collection="Plug-in Trace Logs", object_type_code=4619, ownership="OrganizationOwned",
    change_tracking=False, description="Trace and exception information generated by plug-ins and custom workflow "
    "activities.",
    columns=(
        _pk("plugintracelogid"),
        _s("typename", "Type Name", 1024),
        _s("messagename", "Message Name", 1024),
        _s("primaryentity", "Primary Entity", 1024),
        _ppick("plugintracelog", "mode", "Execution Mode", {0: "Synchronous", 1: "Asynchronous"}),
        _ppick("plugintracelog", "operationtype", "Operation Type", {0: "Unknown", 1: "Plug-in",
                                                                    2: "Workflow Activity"}),
        _uid("pluginstepid", "Plug-in Step Id"),
        _uid("correlationid", "Correlation Id"),
        _int("depth", "Depth"),
        _int("performanceexecutionduration", "Execution duration (ms)"),
        _dt("performanceexecutionstarttime", "Execution start time"),
        _memo("exceptiondetails", "Exception Details", 10240),
        _memo("messageblock", "Message Block", 10240),
        *_system(owner=False),
    ),
)

_ROLE = Table(
    "role", "roles", "roleid", "name", display="Security Role", display_collection="Security Roles",
    object_type_code=1036, ownership="BusinessOwned", change_tracking=False,
    description="Grouping of security privileges. Users are assigned roles that authorize their access to the "
    "Microsoft CRM system.",
    columns=(
        _pk("roleid"),
        _s("name", "Name", 100, required=True),
        _lookup("businessunitid", "Business Unit", "businessunit"),
        _uid("roletemplateid", "Role Template"),
        _bool("iscustomizable", "Customizable"),
        _uid("solutionid", "Solution"),
        _managed(),
        *_system(owner=False),
    ),
)

_SYSTEMUSERROLES = Table(
    "systemuserroles", "systemuserrolescollection", "systemuserroleid", "systemuserroleid",
    display="System User Roles", display_collection="System User Roles", object_type_code=15,
    ownership="None", change_tracking=False, description="Relationship between users and security roles.",
    columns=(
        _pk("systemuserroleid"),
        _uid("systemuserid", "System User"),
        _uid("roleid", "Role"),
        Column("versionnumber", "BigInt", "Version Number", read_only=True),
    ),
)

_ORGANIZATION = Table(
    "organization", "organizations", "organizationid", "name", display="Organization",
    display_collection="Organizations", object_type_code=1019, ownership="None", change_tracking=False,
    description="Top level of the Microsoft Dynamics 365 business hierarchy.",
    columns=(
        _pk("organizationid"),
        _s("name", "Organization Name", 160, read_only=True),
        _bool("isauditenabled", "Is Auditing Enabled"),
        _bool("isuseraccessauditenabled", "Is User Access Auditing Enabled"),
        _bool("isreadauditenabled", "Is Read Auditing Enabled"),
        _int("auditretentionperiodv2", "Audit Retention Period Settings"),
        _ppick("organization", "plugintracelogsetting", "Plug-in Trace Log Setting",
               {0: "Off", 1: "Exception", 2: "All"}),
        _int("expirechangetrackingindays", "Days to Expire Change Tracking Deleted Records"),
        _int("expiresubscriptionsindays", "Days to Expire Subscriptions"),
        _lookup("basecurrencyid", "Currency", "transactioncurrency"),
        *_system(owner=False),
    ),
)

#: The platform tables (the integration layer), served like any table; bridgekit syncs them as its ``platform`` group.
PLATFORM_TABLES = (
    "solution", "pluginassembly", "plugintype", "sdkmessage", "sdkmessagefilter", "sdkmessageprocessingstep",
    "serviceendpoint", "workflow", "connectionreference", "environmentvariabledefinition",
    "environmentvariablevalue", "asyncoperation", "plugintracelog", "role", "systemuserroles", "organization",
)

#: Every table the emulator serves, by logical name.
TABLES: dict[str, Table] = {t.logical_name: t for t in (
    _ACCOUNT, _CONTACT, _LEAD, _OPPORTUNITY, _SYSTEMUSER, _TEAM, _BUSINESSUNIT, _TRANSACTIONCURRENCY,
    _ACTIVITYPOINTER, _EMAIL, _APPOINTMENT, _PHONECALL, _TASK,
    _SOLUTION, _PLUGINASSEMBLY, _PLUGINTYPE, _SDKMESSAGE, _SDKMESSAGEFILTER, _SDKMESSAGEPROCESSINGSTEP,
    _SERVICEENDPOINT, _WORKFLOW, _CONNECTIONREFERENCE, _ENVIRONMENTVARIABLEDEFINITION, _ENVIRONMENTVARIABLEVALUE,
    _ASYNCOPERATION, _PLUGINTRACELOG, _ROLE, _SYSTEMUSERROLES, _ORGANIZATION,
)}

# Graph page sizes: protocols.md §2.1 (users/groups default 100, max 999; messages default 10, max 1000).
_USER_FIELDS = (
    "id", "displayName", "givenName", "surname", "mail", "userPrincipalName", "accountEnabled", "jobTitle",
    "department", "officeLocation", "businessPhones", "mobilePhone", "preferredLanguage", "createdDateTime",
)

#: Every Graph collection the emulator serves, by resource name (stored as ``graph.<name>``).
GRAPH_RESOURCES: dict[str, GraphResource] = {r.name: r for r in (
    GraphResource("users", 999, 100, True, _USER_FIELDS, default_select=(
        "businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone", "officeLocation",
        "preferredLanguage", "surname", "userPrincipalName", "id")),
    GraphResource("groups", 999, 100, True, (
        "id", "displayName", "description", "mail", "mailEnabled", "mailNickname", "securityEnabled",
        "groupTypes", "visibility", "createdDateTime")),
    GraphResource("messages", 1000, 10, True, (
        "id", "subject", "bodyPreview", "body", "from", "sender", "toRecipients", "ccRecipients",
        "receivedDateTime", "sentDateTime", "createdDateTime", "lastModifiedDateTime", "isRead", "isDraft",
        "importance", "conversationId", "internetMessageId", "parentFolderId", "hasAttachments",
        "categories"), per_user=True),
    GraphResource("events", 1000, 10, True, (
        "id", "subject", "bodyPreview", "body", "start", "end", "organizer", "attendees", "location",
        "isOnlineMeeting", "isCancelled", "isAllDay", "showAs", "importance", "iCalUId", "type",
        "createdDateTime", "lastModifiedDateTime"), per_user=True),
    GraphResource("contacts", 1000, 10, True, (
        "id", "displayName", "givenName", "surname", "emailAddresses", "companyName", "jobTitle",
        "businessPhones", "mobilePhone", "createdDateTime", "lastModifiedDateTime"), per_user=True),
)}


def table_by_set(entity_set: str) -> Table | None:
    """The table whose EntitySetName is ``entity_set``."""
    for t in TABLES.values():
        if t.entity_set == entity_set:
            return t
    return None
