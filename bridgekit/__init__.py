"""bridgekit: a Jupyter runbook and analytics workbench for Dynamics 365 (Dataverse) and Microsoft 365 (Graph).

Example:
    >>> import bridgekit
    >>> wb = bridgekit.connect()          # doctest: +SKIP  (the built-in emulator profile)
    >>> wb.sync()                         # doctest: +SKIP
    >>> wb.sql("select count(*) from dataverse.account")  # doctest: +SKIP

Importing bridgekit does no I/O; ``connect`` resolves a profile and wires the clients lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from bridgekit.config import Profile, load_profile
from bridgekit.errors import (
    ApiError,
    AuthError,
    BridgekitError,
    ChangeTrackingNotEnabled,
    CheckFailed,
    ConfigError,
    ConflictError,
    EmulatorError,
    ExitCode,
    InsufficientDataError,
    LakeError,
    MigrationIncomplete,
    MissingCredentialError,
    NotFoundError,
    PermissionDeniedError,
    QueryError,
    ResyncRequired,
    RunbookError,
    RunbookFailed,
    SyncError,
    SyncInterrupted,
    ThrottledError,
    TransientError,
    UnknownTableError,
    WarehouseError,
)

if TYPE_CHECKING:
    from os import PathLike

    from bridgekit.runbooks.runner import RunResult
    from bridgekit.workbench import Workbench

__all__ = [
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
    "Profile",
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
    "Workbench",
    "__version__",
    "connect",
    "load_profile",
    "run_runbook",
]


def connect(profile: str | Profile | None = None, **options: Any) -> Workbench:
    """Open a :class:`Workbench` on a profile (default: the resolved profile, usually ``emulator``).

    Example:
        >>> wb = bridgekit.connect("emulator")  # doctest: +SKIP
    """
    from bridgekit.workbench import Workbench

    return Workbench.open(profile, **options)


def run_runbook(name: str, parameters: dict[str, Any] | None = None, *, profile: str | None = None,
                out: str | PathLike[str] | None = None, **options: Any) -> RunResult:
    """Run a runbook headless (as ``bridgekit run``): executed notebook, HTML report and manifest under ``out``.

    Parameters are checked against the runbook's ``parameters`` cell before the kernel starts; a failed run
    raises :class:`RunbookFailed` (``.exit_code``, ``.run_dir``) after writing its outputs. See
    :func:`bridgekit.runbooks.runner.run_runbook` for every option.

    Example:
        >>> result = bridgekit.run_runbook("sync", {"full": False}, profile="emulator")  # doctest: +SKIP
        >>> result.manifest["data_watermark"]                                           # doctest: +SKIP
    """
    from bridgekit.runbooks.runner import run_runbook as _run_runbook

    return _run_runbook(name, parameters, profile=profile, out=out, **options)


def __getattr__(name: str) -> Any:
    if name == "record":  # bridgekit.record.result(...) in runbooks, without importing the module first
        import importlib

        return importlib.import_module("bridgekit.record")
    if name == "Workbench":
        from bridgekit.workbench import Workbench

        return Workbench
    raise AttributeError(f"module 'bridgekit' has no attribute {name!r}")
