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
    ConfigError,
    ResyncRequired,
    RunbookFailed,
    SyncError,
    ThrottledError,
    TransientError,
)

if TYPE_CHECKING:
    from bridgekit.workbench import Workbench

__all__ = [
    "ApiError",
    "AuthError",
    "BridgekitError",
    "ConfigError",
    "Profile",
    "ResyncRequired",
    "RunbookFailed",
    "SyncError",
    "ThrottledError",
    "TransientError",
    "Workbench",
    "__version__",
    "connect",
    "load_profile",
]


def connect(profile: str | Profile | None = None, **options: Any) -> Workbench:
    """Open a :class:`Workbench` on a profile (default: the resolved profile, usually ``emulator``).

    Example:
        >>> wb = bridgekit.connect("emulator")  # doctest: +SKIP
    """
    from bridgekit.workbench import Workbench

    return Workbench.open(profile, **options)


def __getattr__(name: str) -> Any:
    if name == "Workbench":
        from bridgekit.workbench import Workbench

        return Workbench
    raise AttributeError(f"module 'bridgekit' has no attribute {name!r}")
