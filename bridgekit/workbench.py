"""The Workbench facade: one way in for notebooks, runbooks and the CLI (wiring only)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from bridgekit.config import EMULATOR_RUNTIME_SOURCE, Profile, load_profile
from bridgekit.errors import ConfigError

if TYPE_CHECKING:  # the clients, DuckDB and Arrow load on first use, so `import bridgekit` stays light
    import pandas as pd

    from bridgekit.dataverse import DataverseClient
    from bridgekit.emulator.process import EmulatorInfo
    from bridgekit.graph import GraphClient
    from bridgekit.lake import Lake, LakeCommit
    from bridgekit.sources import Source
    from bridgekit.sync import SyncEngine, SyncReport
    from bridgekit.warehouse import Warehouse

__all__ = ["Workbench", "resolve_runtime", "with_emulator"]


def resolve_runtime(profile: Profile) -> Profile:
    """Fill in what only a running emulator knows (URLs, tenant, demo app, CA) for an emulator profile.

    For any other profile this returns the profile unchanged. Starts the emulator when it is not running.
    """
    if profile.auth != "emulator":
        return profile  # a real tenant, or an emulator profile that is already resolved
    from bridgekit.emulator.process import ensure_running

    return with_emulator(profile, ensure_running(home=profile.emulator_home))


def with_emulator(profile: Profile, info: EmulatorInfo) -> Profile:
    """``profile`` with the values of the running emulator ``info`` (each sourced to the running emulator)."""
    src = EMULATOR_RUNTIME_SOURCE
    values: dict[str, Any] = {
        "auth": "certificate",
        "tenant_id": info.tenant_id,
        "client_id": info.client_id,
        "certificate_path": str(info.certificate_path),
        "dataverse_url": info.dataverse_url,
        "graph_url": info.graph_url,
        "authority_host": info.authority_host,
        "ca_bundle": str(info.ca_bundle),
        "emulator_home": str(info.home),
    }
    sources = dict(profile.sources) | dict.fromkeys(values, src)
    return profile.with_values(sources=sources, **values)


class Workbench:
    """bridgekit's facade over one profile: clients, warehouse, sync, SQL.

    Example:
        >>> wb = bridgekit.connect("emulator")  # doctest: +SKIP
        >>> wb.sync()                           # doctest: +SKIP
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._others: dict[str, Workbench] = {}

    @classmethod
    def open(cls, profile: str | Profile | None = None, **options: Any) -> Workbench:
        """Resolve ``profile`` (a name, a Profile, or None for the default) and return a Workbench."""
        if options:
            raise ConfigError(f"unknown option(s) for connect(): {', '.join(sorted(options))}",
                              hint="pass only a profile name or a Profile")
        prof = profile if isinstance(profile, Profile) else load_profile(profile)
        return cls(resolve_runtime(prof))

    @cached_property
    def dataverse(self) -> DataverseClient:
        """The Dataverse Web API client for this profile."""
        from bridgekit.dataverse import DataverseClient

        return DataverseClient(self.profile)

    @cached_property
    def graph(self) -> GraphClient:
        """The Microsoft Graph client for this profile."""
        from bridgekit.graph import GraphClient

        return GraphClient(self.profile)

    @cached_property
    def warehouse(self) -> Warehouse:
        """The DuckDB warehouse of this profile (``profile.warehouse_path``)."""
        from bridgekit.warehouse import Warehouse

        return Warehouse(self.profile.warehouse_path)

    def sync_engine(self, *, progress: bool | None = None, untracked: str = "reload",
                    tables: list[str] | None = None) -> SyncEngine:
        """A :class:`~bridgekit.sync.SyncEngine` over this profile's sync plan (or ``tables``: qualified
        table ids such as ``dataverse.account``, planned or not) and clients."""
        from bridgekit.sync import SyncEngine

        tables = self.planned_tables() if tables is None else tables
        concurrency = max(1, min(self.profile.max_concurrency, 4))
        return SyncEngine(self.warehouse, tables, self.source, concurrency=concurrency,
                          partitions=self.profile.sync.partitions_for(self.profile, concurrency),
                          progress=progress, untracked=untracked, label=self.profile.name)

    def planned_tables(self) -> list[str]:
        """The qualified ids of the tables in the profile's sync plan (``dataverse.account``, ``graph.users``)."""
        plan = self.profile.sync
        return [f"dataverse.{t}" for t in plan.dataverse] + [f"graph.{r}" for r in plan.graph]

    def source(self, table: str) -> Source:
        """The sync :class:`~bridgekit.sources.Source` of a qualified table id, over this profile's clients."""
        from bridgekit.sources import DataverseSource, GraphSource

        schema, _, name = table.partition(".")
        if schema == "dataverse":
            return DataverseSource(self.dataverse, name, page_size=self.profile.sync.page_size)
        return GraphSource(self.graph, name)

    def sync(self, only: str | list[str] | None = None, full: bool = False, *,
             progress: bool | None = None) -> SyncReport:
        """Mirror the profile's tables into the warehouse (deltas after the first run); returns a SyncReport.

        Example:
            >>> report = wb.sync(only=["account", "graph.users"])  # doctest: +SKIP
            >>> report.to_frame()                                  # doctest: +SKIP
        """
        report = self.sync_engine(progress=progress).run(only, full=full)
        self.publish_lake()
        return report

    @cached_property
    def lake(self) -> Lake | None:
        """The profile's Delta Lake copy (``[profiles.X.lake]``), or None when it has none."""
        if self.profile.lake is None:
            return None
        from bridgekit.lake import Lake

        def storage_token() -> str:
            from bridgekit.auth import TokenProvider

            return TokenProvider(self.profile).token("https://storage.azure.com/.default")

        return Lake(self.profile.lake, token=storage_token)

    def publish_lake(self) -> list[LakeCommit]:
        """Bring the lake copy up to the warehouse (what every merge since the lake's watermark changed), if
        the profile has one; :meth:`sync` and ``bridgekit sync`` call it after each merge."""
        if self.lake is None or not self.warehouse.exists():
            return []
        return self.lake.publish(self.warehouse)

    def other(self, profile: str) -> Workbench:
        """The Workbench of another profile (a migration's source environment, a lookup's warehouse), opened
        once per name and kept."""
        if profile == self.profile.name:
            return self
        if profile not in self._others:
            self._others[profile] = Workbench.open(profile)
        return self._others[profile]

    def emulator_truth(self) -> dict[str, Any] | None:
        """For an emulator profile, what its synthetic company was generated with (``planted_defects``,
        ``generating_model``, ``company``), from the emulator's admin API; None for a real tenant."""
        home = self.profile.emulator_home
        if not home:
            return None
        from bridgekit.emulator.process import admin, status

        info = status(home)
        if info is None:
            return None
        truth: dict[str, Any] = admin(info, "truth")
        return truth

    def sql(self, query: str, params: Any = None) -> pd.DataFrame:
        """Run a read-only SQL query on the warehouse; returns a pandas DataFrame.

        Example:
            >>> wb.sql("select name from dataverse.account limit 5")  # doctest: +SKIP
        """
        return self.warehouse.sql(query, params)

    def __repr__(self) -> str:
        return f"Workbench(profile={self.profile.name!r})"
