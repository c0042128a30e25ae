"""The bridgekit exception tree: every error bridgekit raises, with structured fields and a hint.

::

    BridgekitError                      base; .hint says what to do, .transient drives retry/resume
    ├── ConfigError                     bad or missing profile / bridgekit.toml content
    │   └── MissingCredentialError      the variable or file holding a credential is not there (an auth failure)
    ├── AuthError                       token acquisition failed (AADSTS code in .service_code)
    ├── ApiError                        a service answered with an error (.status, .service_code, .request_id)
    │   ├── NotFoundError               404
    │   ├── PermissionDeniedError       403 (missing role / privilege)
    │   ├── ConflictError               412 / duplicate / concurrency mismatch
    │   └── TransientError              5xx, dropped connection (transient=True)
    │       ├── ThrottledError          429 / service-protection budget exhausted (.retry_after)
    │       └── MigrationIncomplete     some planned rows were not written: run again with the same run id
    ├── ResyncRequired                  a delta/change-tracking token is no longer valid: full reload needed
    ├── ChangeTrackingNotEnabled        the table does not have change tracking on
    ├── WarehouseError                  DuckDB file locked, corrupt or unwritable
    │   └── QueryError                  a query failed or was refused (bad SQL, a write, a file outside it)
    ├── LakeError                       the Delta Lake copy could not be read or written
    ├── SyncError                       the sync engine could not complete (e.g. already running)
    │   ├── UnknownTableError           a table asked for is not in the sync plan (a usage error)
    │   └── SyncInterrupted             Ctrl-C / SIGINT stopped the run; nothing of it was merged (exit 130)
    ├── InsufficientDataError           an analysis needs tables or rows the warehouse lacks
    ├── CheckFailed                     a runbook stopped on a red finding
    ├── RunbookError                    runner problems: unknown runbook, bad parameter
    │   └── RunbookFailed               the notebook ran and failed (.exit_code)
    └── EmulatorError                   the local tenant emulator cannot start / answer

Each class carries its :class:`ExitCode`; :func:`exit_code_for` resolves any exception (or, for a runbook
cell, the class name Papermill reports) by walking this tree, and :data:`EXIT_CODES` is the one table of
codes and meanings that the README, ``bridgekit run --help`` and the runner show.

No message ever contains a secret or token: :func:`redact` scrubs anything token-shaped from text that
came from outside (service messages, URLs) before it is stored on an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from enum import IntEnum
from typing import Any

__all__ = [
    "EXIT_CODES",
    "SECRET_PATTERNS",
    "ApiError",
    "AuthError",
    "BridgekitError",
    "ChangeTrackingNotEnabled",
    "CheckFailed",
    "ConfigError",
    "ConflictError",
    "EmulatorError",
    "ExitCode",
    "InsufficientDataError",
    "LakeError",
    "MigrationIncomplete",
    "MissingCredentialError",
    "NotFoundError",
    "PermissionDeniedError",
    "QueryError",
    "ResyncRequired",
    "RunbookError",
    "RunbookFailed",
    "SyncError",
    "SyncInterrupted",
    "ThrottledError",
    "TransientError",
    "UnknownTableError",
    "WarehouseError",
    "error_class",
    "exit_code_for",
    "looks_secret",
    "redact",
    "secrets_in_play",
    "shown",
]


class ExitCode(IntEnum):
    """The process exit codes of ``bridgekit`` and ``bridgekit run``; :data:`EXIT_CODES` says what each means."""

    OK = 0
    ERROR = 1
    USAGE = 2
    AUTH = 3
    TRANSIENT = 4
    NOTEBOOK_ERROR = 5
    CHECK_FAILED = 6
    KERNEL_DIED = 7
    SECRET_LEAK = 8
    INTERRUPTED = 130
    TERMINATED = 143

    @property
    def meaning(self) -> str:
        """What the code tells a user or a scheduler (the README's exit-code table)."""
        return EXIT_CODES[self]


#: The one exit-code table: the README, ``bridgekit run --help`` and the runner's manifest show it from here.
EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "an unexpected error, or a file or folder that cannot be read or written (the message names "
                    "it)",
    ExitCode.USAGE: "bad usage: unknown command, option, table or column, a query the warehouse refuses, bad "
                    "profile or bridgekit.toml, unknown or mistyped runbook parameter (nothing ran)",
    ExitCode.AUTH: "authentication or authorisation failed (missing or wrong secret, unknown tenant, missing role "
                   "or consent)",
    ExitCode.TRANSIENT: "throttled out, or the service or identity provider did not answer: retry later; syncs "
                        "resume where they stopped",
    ExitCode.NOTEBOOK_ERROR: "a runbook cell raised an error (the executed notebook marks the failing cell)",
    ExitCode.CHECK_FAILED: "a check found a problem (an SLO breached, a red finding)",
    ExitCode.KERNEL_DIED: "the notebook kernel died or the run timed out",
    ExitCode.SECRET_LEAK: "a secret or token-shaped string was found in an output; the outputs are quarantined",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGINT): nothing of the interrupted run was merged; run again to "
                          "resume",
    ExitCode.TERMINATED: "stopped by SIGTERM (a scheduler's stop): nothing of the interrupted run was merged; run "
                         "again to resume",
}


# Shapes of secrets and tokens: never in a message, notebook, report, manifest or log. The scan of run
# outputs (bridgekit.runbooks.secrets) looks for these; redact() replaces them in text from outside.
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "jwt": re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
    "bearer header": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{20,}"),
    "secret assignment": re.compile(
        r"(?i)\b(client_secret|secret|password|passwd|api_key|access_token|refresh_token)\b\s*[:=]\s*"
        r"[\"'][^\"'\s]{6,}[\"']"
    ),
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----"),
    # Entra client secrets: 40 chars with a '~' in the 4th position (the format since 2021).
    "entra client secret": re.compile(r"\b[A-Za-z0-9_.-]{3}[78]Q~[A-Za-z0-9_.~-]{31,34}\b"),
    "connection string key": re.compile(r"(?i)(AccountKey|SharedAccessKey|ClientSecret)=[A-Za-z0-9+/=]{16,}"),
}
_BEARER_VALUE = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
# Secret-ish query or form parameters in URLs and service messages (redacted, not scanned for: too common).
_SECRET_PARAM = re.compile(
    r"(?i)\b(client_secret|client_assertion|access_token|refresh_token|id_token|password|code|"
    r"device_code|sig|signature)=([^&\s\"']+)"
)


def redact(text: str) -> str:
    """Return ``text`` with anything token- or secret-shaped replaced by ``***``.

    Example:
        >>> redact("Authorization: Bearer abc.def.ghi-123456")
        'Authorization: Bearer ***'
    """
    text = _BEARER_VALUE.sub(r"\1***", text)
    for name, pattern in SECRET_PATTERNS.items():
        if name != "bearer header":
            text = pattern.sub("***", text)
    return _SECRET_PARAM.sub(r"\1=***", text)


# Names of environment variables that hold secrets by convention (their values are secrets in play).
_SECRET_ENV_NAME = re.compile(r"(?i)(secret|passw(or)?d|pwd|token|api_?key|access_?key|account_?key|credential|"
                              r"private_?key|sas|connection_?string)")


def secrets_in_play(extra: Iterable[str] = ()) -> list[str]:
    """The secret values this process can see: environment variables named like secrets (``*_SECRET``,
    ``*_PASSWORD``, ``*_TOKEN`` ...), plus ``extra`` (the variables a profile names, for instance)."""
    names = {n for n in os.environ if _SECRET_ENV_NAME.search(n)} | set(extra)
    return [v for v in (os.environ.get(n, "") for n in names) if len(v) >= 6]


def looks_secret(value: str, secrets: Iterable[str] | None = None) -> bool:
    """True when ``value`` holds a secret in play (:func:`secrets_in_play` when ``secrets`` is None) or has
    a secret's shape: a token, a key, or a long random-looking string.

    Used before a value the user typed is echoed in an error message (it may be a secret pasted in the
    wrong place, and the message goes to a CI log).
    """
    known = secrets_in_play() if secrets is None else list(secrets)
    if any(secret and len(secret) >= 6 and secret in value for secret in known):
        return True
    if any(p.search(value) for p in SECRET_PATTERNS.values()) or redact(value) != value:
        return True
    # Random-looking: long, no spaces, and letters, digits and symbols mixed (a profile name is not).
    classes = sum(bool(re.search(c, value)) for c in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9\s]"))
    return len(value) >= 20 and " " not in value and classes >= 3


def shown(value: object) -> str:
    """``value`` as an error message may quote it: itself, or a placeholder when it looks like a secret."""
    text = str(value)
    return "<a value that looks like a secret, not shown>" if looks_secret(text) else text


class BridgekitError(Exception):
    """Base of every bridgekit error.

    Attributes:
        message: What went wrong, in one line, with no secret in it.
        hint: What the user can do about it (an environment variable to set, a command to run).
        transient: True when retrying later may succeed (drives retries and sync resume).
        exit_code: The CLI exit code this error maps to (see README, "Exit codes").
    """

    transient: bool = False
    exit_code: int = ExitCode.ERROR
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None, **fields: Any) -> None:
        self.message = redact(message)
        self.hint = redact(hint) if hint else self.default_hint
        self.fields: dict[str, Any] = fields
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, Any]:
        """Structured form for manifests and JSON output."""
        data: dict[str, Any] = {"type": type(self).__name__, "message": self.message, "hint": self.hint}
        data["transient"] = self.transient
        data.update({k: v for k, v in self.fields.items() if isinstance(v, str | int | float | bool | None)})
        return data


class ConfigError(BridgekitError):
    """A profile or ``bridgekit.toml`` is wrong; ``key`` and ``path`` say where."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, hint: str | None = None, key: str | None = None,
                 path: str | None = None, profile: str | None = None) -> None:
        super().__init__(message, hint=hint, key=key, path=path, profile=profile)
        self.key, self.path, self.profile = key, path, profile


class MissingCredentialError(ConfigError):
    """The environment variable (or file) that should hold the profile's credential is not there.

    A configuration problem of the machine that runs bridgekit, and for a scheduler an authentication failure.
    """

    exit_code = ExitCode.AUTH


class AuthError(BridgekitError):
    """Could not get a token. ``service_code`` holds the AADSTS code (e.g. ``AADSTS7000215``)."""

    exit_code = ExitCode.AUTH

    def __init__(self, message: str, *, hint: str | None = None, service_code: str | None = None,
                 error: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint=hint, service_code=service_code, error=error, status=status)
        self.service_code, self.error, self.status = service_code, error, status


class ApiError(BridgekitError):
    """A Dataverse or Graph call answered with an error.

    Attributes:
        status: HTTP status code.
        service_code: The service's own code (``0x80040217`` for Dataverse, ``Request_ResourceNotFound``
            for Graph).
        request_id: The service's request id, for support tickets.
        service: ``dataverse``, ``graph`` or ``identity``.
    """

    def __init__(self, message: str, *, hint: str | None = None, status: int | None = None,
                 service_code: str | None = None, request_id: str | None = None,
                 service: str | None = None, method: str | None = None, url: str | None = None) -> None:
        super().__init__(message, hint=hint, status=status, service_code=service_code,
                         request_id=request_id, service=service, method=method,
                         url=redact(url) if url else None)
        self.status, self.service_code, self.request_id = status, service_code, request_id
        self.service, self.method = service, method
        self.url = redact(url) if url else None


class NotFoundError(ApiError):
    """404: the record, table or resource does not exist."""


class PermissionDeniedError(ApiError):
    """403: the app lacks the role or privilege for this call."""

    exit_code = ExitCode.AUTH
    default_hint = "grant the application the missing role (API permission) and admin-consent it"


class ConflictError(ApiError):
    """412 or duplicate: a concurrency or uniqueness check failed."""


class TransientError(ApiError):
    """A failure that may pass if retried later (5xx, dropped connection, timeout)."""

    transient = True
    exit_code = ExitCode.TRANSIENT
    default_hint = "the service is temporarily unavailable; retry later (bridgekit resumes where it stopped)"


class ThrottledError(TransientError):
    """429 or the service-protection budget is exhausted. ``retry_after`` is in seconds."""

    default_hint = ("the service-protection limit is exhausted; wait for the Retry-After period or lower "
                    "the concurrency in the profile")

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        self.fields["retry_after"] = retry_after


class MigrationIncomplete(TransientError):
    """Some planned rows were not written (throttled out, service unavailable); run again with the same run id."""

    default_hint = "run the migration again with the same run id: it resumes where it stopped"


class ResyncRequired(BridgekitError):
    """A delta or change-tracking token expired or was invalidated; a full reload is needed."""

    transient = True
    exit_code = ExitCode.TRANSIENT
    default_hint = "run the sync again: bridgekit reloads the table in full, then resumes deltas"

    def __init__(self, message: str, *, hint: str | None = None, table: str | None = None,
                 service_code: str | None = None) -> None:
        super().__init__(message, hint=hint, table=table, service_code=service_code)
        self.table, self.service_code = table, service_code


class ChangeTrackingNotEnabled(BridgekitError):
    """The Dataverse table does not have change tracking enabled (0x80072491)."""

    default_hint = ("enable change tracking on the table (Power Apps > Tables > Properties > Track changes) "
                    "or sync it with --full")

    def __init__(self, message: str, *, hint: str | None = None, table: str | None = None) -> None:
        super().__init__(message, hint=hint, table=table)
        self.table = table


class WarehouseError(BridgekitError):
    """The DuckDB warehouse cannot be opened, written or migrated."""

    def __init__(self, message: str, *, hint: str | None = None, path: str | None = None) -> None:
        super().__init__(message, hint=hint, path=path)
        self.path = path


class QueryError(WarehouseError):
    """A query on the warehouse failed or was refused (bad SQL, a write, a file outside the warehouse)."""

    exit_code = ExitCode.USAGE


class LakeError(BridgekitError):
    """The Delta Lake copy could not be read or written; the warehouse is unaffected and the next sync
    catches the lake up."""

    def __init__(self, message: str, *, hint: str | None = None, table: str | None = None) -> None:
        super().__init__(message, hint=hint, table=table)
        self.table = table


class SyncError(BridgekitError):
    """The sync engine could not complete (another sync holds the lock, bad plan, ...)."""

    def __init__(self, message: str, *, hint: str | None = None, table: str | None = None) -> None:
        super().__init__(message, hint=hint, table=table)
        self.table = table


class InsufficientDataError(BridgekitError):
    """The warehouse lacks the tables or rows an analysis needs (not synced yet, or too few closed deals)."""

    default_hint = "run `bridgekit sync` for the profile first (opportunity, account, activities, Graph mail)"


class CheckFailed(BridgekitError):
    """Raise in a runbook to stop it on a red finding; ``bridgekit run`` exits 6 (CHECK_FAILED).

    ``bridgekit.record.check(..., status="red", stop=True)`` records the check and raises this.
    """

    exit_code = ExitCode.CHECK_FAILED
    default_hint = "the runbook ran and found a problem; see the checks in the run's manifest.json and report"


class UnknownTableError(SyncError):
    """A table asked for (``--only``, ``only=``) is not in the profile's sync plan, or is ambiguous."""

    exit_code = ExitCode.USAGE


class SyncInterrupted(SyncError):
    """Ctrl-C (SIGINT) stopped a sync; its merge was rolled back, its staged pages resume next run."""

    exit_code = ExitCode.INTERRUPTED
    default_hint = "run the sync again: it resumes from the pages staged so far"


class RunbookError(BridgekitError):
    """A runbook cannot be run: unknown name, unknown or mistyped parameter."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, hint: str | None = None, runbook: str | None = None,
                 parameter: str | None = None) -> None:
        super().__init__(message, hint=hint, runbook=runbook, parameter=parameter)
        self.runbook, self.parameter = runbook, parameter


class RunbookFailed(RunbookError):
    """The runbook ran and did not succeed; ``exit_code`` is the documented code for the cause."""

    def __init__(self, message: str, *, exit_code: int = ExitCode.NOTEBOOK_ERROR, hint: str | None = None,
                 runbook: str | None = None, run_dir: str | None = None) -> None:
        super().__init__(message, hint=hint, runbook=runbook)
        self.exit_code = ExitCode(exit_code)
        self.run_dir = run_dir
        self.fields.update(exit_code=exit_code, run_dir=run_dir)


class EmulatorError(BridgekitError):
    """The local tenant emulator could not start, stop or answer."""

    default_hint = "run `bridgekit emulator status` and see the emulator log under its data directory"


def _error_classes(root: type[BridgekitError] = BridgekitError) -> Iterable[type[BridgekitError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _error_classes(sub)


def error_class(name: str) -> type[BridgekitError] | None:
    """The bridgekit error class called ``name`` (as Papermill reports a cell's exception), None if none is."""
    return next((cls for cls in _error_classes() if cls.__name__ == name), None)


def exit_code_for(error: BaseException | type[BaseException] | str) -> ExitCode:
    """The documented exit code of an exception, an exception class, or an exception class's name.

    A bridgekit error exits with its class's code (the nearest class in the tree that sets one); anything
    else is an unexpected error (1).
    """
    if isinstance(error, str):
        found = error_class(error)
        return ExitCode(found.exit_code) if found is not None else ExitCode.ERROR
    cls = error if isinstance(error, type) else type(error)
    if isinstance(error, BridgekitError):
        return ExitCode(error.exit_code)  # RunbookFailed carries the code of what happened
    if issubclass(cls, BridgekitError):
        return ExitCode(cls.exit_code)
    return ExitCode.ERROR
