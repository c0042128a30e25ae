"""The bridgekit exception tree: every error bridgekit raises, with structured fields and a hint.

::

    BridgekitError                      base; .hint says what to do, .transient drives retry/resume
    ├── ConfigError                     bad or missing profile / bridgekit.toml content
    ├── AuthError                       token acquisition failed (AADSTS code in .service_code)
    ├── ApiError                        a service answered with an error (.status, .service_code, .request_id)
    │   ├── NotFoundError               404
    │   ├── PermissionDeniedError       403 (missing role / privilege)
    │   ├── ConflictError               412 / duplicate / concurrency mismatch
    │   └── TransientError              5xx, dropped connection (transient=True)
    │       └── ThrottledError          429 / service-protection budget exhausted (.retry_after)
    ├── ResyncRequired                  a delta/change-tracking token is no longer valid: full reload needed
    ├── ChangeTrackingNotEnabled        the table does not have change tracking on
    ├── WarehouseError                  DuckDB file locked, corrupt or unwritable
    ├── SyncError                       the sync engine could not complete (e.g. already running)
    │   └── SyncInterrupted             Ctrl-C / SIGINT stopped the run; nothing of it was merged (exit 130)
    ├── RunbookError                    runner problems: unknown runbook, bad parameter
    │   └── RunbookFailed               the notebook ran and failed (.exit_code)
    └── EmulatorError                   the local tenant emulator cannot start / answer

No message ever contains a secret or token: :func:`redact` scrubs anything token-shaped from text that
came from outside (service messages, URLs) before it is stored on an error.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Any

__all__ = [
    "ApiError",
    "AuthError",
    "BridgekitError",
    "ChangeTrackingNotEnabled",
    "ConfigError",
    "ConflictError",
    "EmulatorError",
    "ExitCode",
    "NotFoundError",
    "PermissionDeniedError",
    "ResyncRequired",
    "RunbookError",
    "RunbookFailed",
    "SyncError",
    "SyncInterrupted",
    "ThrottledError",
    "TransientError",
    "WarehouseError",
    "redact",
]

class ExitCode(IntEnum):
    """The process exit codes of ``bridgekit`` and ``bridgekit run`` (documented in the README)."""

    OK = 0
    ERROR = 1  # anything not listed below
    USAGE = 2  # bad command line, profile, bridgekit.toml or runbook parameter
    AUTH = 3  # authentication or authorisation failed
    TRANSIENT = 4  # throttled out or another transient failure: retry later
    NOTEBOOK_ERROR = 5  # a runbook cell raised
    CHECK_FAILED = 6  # the run worked and a check found a problem (SLO breached, red finding)
    KERNEL_DIED = 7  # the kernel died or the run timed out
    SECRET_LEAK = 8  # a secret or token-shaped string was found in an output; outputs quarantined


# JWTs (three base64url segments), bearer headers, and secret-ish query/form parameters.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
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
    text = _JWT.sub("***", text)
    text = _BEARER.sub(r"\1***", text)
    return _SECRET_PARAM.sub(r"\1=***", text)


class BridgekitError(Exception):
    """Base of every bridgekit error.

    Attributes:
        message: What went wrong, in one line, with no secret in it.
        hint: What the user can do about it (an environment variable to set, a command to run).
        transient: True when retrying later may succeed (drives retries and sync resume).
        exit_code: The CLI exit code this error maps to (see README, "Exit codes").
    """

    transient: bool = False
    exit_code: int = 1
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

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, key: str | None = None,
                 path: str | None = None, profile: str | None = None) -> None:
        super().__init__(message, hint=hint, key=key, path=path, profile=profile)
        self.key, self.path, self.profile = key, path, profile


class AuthError(BridgekitError):
    """Could not get a token. ``service_code`` holds the AADSTS code (e.g. ``AADSTS7000215``)."""

    exit_code = 3

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

    exit_code = 3
    default_hint = "grant the application the missing role (API permission) and admin-consent it"


class ConflictError(ApiError):
    """412 or duplicate: a concurrency or uniqueness check failed."""


class TransientError(ApiError):
    """A failure that may pass if retried later (5xx, dropped connection, timeout)."""

    transient = True
    exit_code = 4
    default_hint = "the service is temporarily unavailable; retry later (bridgekit resumes where it stopped)"


class ThrottledError(TransientError):
    """429 or the service-protection budget is exhausted. ``retry_after`` is in seconds."""

    default_hint = ("the service-protection limit is exhausted; wait for the Retry-After period or lower "
                    "the concurrency in the profile")

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        self.fields["retry_after"] = retry_after


class ResyncRequired(BridgekitError):
    """A delta or change-tracking token expired or was invalidated; a full reload is needed."""

    transient = True
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


class SyncError(BridgekitError):
    """The sync engine could not complete (another sync holds the lock, bad plan, ...)."""

    def __init__(self, message: str, *, hint: str | None = None, table: str | None = None) -> None:
        super().__init__(message, hint=hint, table=table)
        self.table = table


class SyncInterrupted(SyncError):
    """Ctrl-C (SIGINT) stopped a sync; its merge was rolled back, its staged pages resume next run."""

    exit_code = 130  # 128 + SIGINT, the shell's convention
    default_hint = "run the sync again: it resumes from the pages staged so far"


class RunbookError(BridgekitError):
    """A runbook cannot be run: unknown name, unknown or mistyped parameter."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, runbook: str | None = None,
                 parameter: str | None = None) -> None:
        super().__init__(message, hint=hint, runbook=runbook, parameter=parameter)
        self.runbook, self.parameter = runbook, parameter


class RunbookFailed(RunbookError):
    """The runbook ran and did not succeed; ``exit_code`` is the documented code for the cause."""

    def __init__(self, message: str, *, exit_code: int = 5, hint: str | None = None,
                 runbook: str | None = None, run_dir: str | None = None) -> None:
        super().__init__(message, hint=hint, runbook=runbook)
        self.exit_code = exit_code
        self.run_dir = run_dir
        self.fields.update(exit_code=exit_code, run_dir=run_dir)


class EmulatorError(BridgekitError):
    """The local tenant emulator could not start, stop or answer."""

    default_hint = "run `bridgekit emulator status` and see the emulator log under its data directory"
