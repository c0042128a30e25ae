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
    "ACTIVITY_TYPES", "GRAPH_RESOURCES", "INDUSTRY", "REGARDING_TARGETS", "TABLES", "Column", "GraphResource",
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

#: Every table the emulator serves, by logical name.
TABLES: dict[str, Table] = {t.logical_name: t for t in (
    _ACCOUNT, _CONTACT, _LEAD, _OPPORTUNITY, _SYSTEMUSER, _TEAM, _BUSINESSUNIT, _TRANSACTIONCURRENCY,
    _ACTIVITYPOINTER, _EMAIL, _APPOINTMENT, _PHONECALL, _TASK,
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
