"""Profiles: precedence, the built-in emulator profile, and the refusals a user relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridgekit.config import list_profiles, load_profile, resolve_profile_name
from bridgekit.errors import ConfigError

GOOD = """
default_profile = "contoso"

[profiles.contoso]
tenant_id = "11111111-1111-1111-1111-111111111111"
client_id = "22222222-2222-2222-2222-222222222222"
auth = "client_secret"
client_secret_env = "CONTOSO_SECRET"
dataverse_url = "https://contoso.crm.dynamics.com"
warehouse = "contoso.duckdb"

[profiles.contoso.sync]
dataverse = ["account", "contact"]
graph = ["users"]

[profiles.fabrikam]
tenant_id = "33333333-3333-3333-3333-333333333333"
client_id = "44444444-4444-4444-4444-444444444444"
auth = "certificate"
certificate_path = "/etc/bridgekit/fabrikam.pem"
dataverse_url = "https://fabrikam.crm4.dynamics.com"
"""


@pytest.fixture
def in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    monkeypatch.delenv("BRIDGEKIT_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def write(dirpath: Path, text: str) -> Path:
    p = dirpath / "bridgekit.toml"
    p.write_text(text)
    return p


def test_builtin_emulator_profile_needs_no_file(in_dir: Path) -> None:
    prof = load_profile()
    assert prof.name == "emulator" and prof.is_emulator
    assert resolve_profile_name() == ("emulator", "built-in")


def test_precedence_argument_env_file_builtin(in_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(in_dir, GOOD)
    assert resolve_profile_name()[0] == "contoso"  # default_profile in the file
    monkeypatch.setenv("BRIDGEKIT_PROFILE", "fabrikam")
    assert resolve_profile_name()[0] == "fabrikam"  # env beats file
    assert resolve_profile_name("emulator")[0] == "emulator"  # argument beats env
    assert load_profile().name == "fabrikam"


def test_profile_values_and_sources(in_dir: Path) -> None:
    path = write(in_dir, GOOD)
    prof = load_profile("contoso")
    assert prof.auth == "client_secret" and prof.client_secret_env == "CONTOSO_SECRET"
    assert prof.sync.dataverse == ("account", "contact") and prof.sync.graph == ("users",)
    assert prof.graph_url == "https://graph.microsoft.com"  # default
    assert prof.authority_host == "https://login.microsoftonline.com"
    assert prof.sources["dataverse_url"] == str(path)
    rows = {k: (v, s) for k, v, s in prof.describe()}
    assert rows["graph_url"][1] == "default"
    assert rows["client_secret_env"][0] == "CONTOSO_SECRET (not set)"
    assert {n for n, _ in list_profiles()} == {"emulator", "contoso", "fabrikam"}


def test_user_config_dir_is_read(in_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = in_dir / "xdg" / "bridgekit"
    cfg.mkdir(parents=True)
    (cfg / "bridgekit.toml").write_text(GOOD)
    monkeypatch.chdir(in_dir / "xdg")  # no bridgekit.toml in the working directory
    assert load_profile().name == "contoso"


def test_literal_secret_is_refused_naming_the_env_var(in_dir: Path) -> None:
    write(in_dir, GOOD.replace('client_secret_env = "CONTOSO_SECRET"', 'client_secret = "abc~123secretvalue"'))
    with pytest.raises(ConfigError) as err:
        load_profile("contoso")
    assert err.value.key == "client_secret"
    assert "client_secret_env" in err.value.hint
    assert "abc~123secretvalue" not in str(err.value)


def test_unknown_key_is_named(in_dir: Path) -> None:
    write(in_dir, GOOD.replace('warehouse = "contoso.duckdb"', 'warehous = "x.duckdb"'))
    with pytest.raises(ConfigError, match="unknown key 'warehous'") as err:
        load_profile("contoso")
    assert "warehouse" in err.value.hint


def test_unknown_sync_key_and_top_level_key(in_dir: Path) -> None:
    write(in_dir, GOOD.replace('graph = ["users"]', 'grph = ["users"]'))
    with pytest.raises(ConfigError, match="grph"):
        load_profile("contoso")
    write(in_dir, "defaultprofile = 'x'\n")
    with pytest.raises(ConfigError, match="defaultprofile"):
        load_profile()


def test_missing_required_key(in_dir: Path) -> None:
    write(in_dir, GOOD.replace('client_id = "22222222-2222-2222-2222-222222222222"\n', ""))
    with pytest.raises(ConfigError, match="missing required key 'client_id'") as err:
        load_profile("contoso")
    assert err.value.key == "client_id"


def test_bad_values(in_dir: Path) -> None:
    write(in_dir, GOOD.replace('auth = "client_secret"', 'auth = "password"'))
    with pytest.raises(ConfigError, match="not a known mode"):
        load_profile("contoso")
    write(in_dir, GOOD.replace("https://contoso.crm.dynamics.com", "http://contoso.crm.dynamics.com"))
    with pytest.raises(ConfigError, match="https"):
        load_profile("contoso")
    write(in_dir, GOOD.replace('client_secret_env = "CONTOSO_SECRET"', 'client_secret_env = "s3cr3t value!"'))
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        load_profile("contoso")


def test_graph_concurrency_is_its_own_setting_with_a_bounded_range(in_dir: Path) -> None:
    from bridgekit.http import build_session

    write(in_dir, GOOD)
    prof = load_profile("contoso")
    # Graph limits concurrency per mailbox only; Dataverse allows 52 per user: one number cannot serve both.
    assert build_session(prof, "graph").governor.max_concurrency == 32
    assert build_session(prof, "dataverse").governor.max_concurrency == prof.max_concurrency == 8
    write(in_dir, GOOD.replace('warehouse = "contoso.duckdb"', 'warehouse = "contoso.duckdb"\ngraph_concurrency = 12'))
    assert build_session(load_profile("contoso"), "graph").governor.max_concurrency == 12
    for bad in ("0", "65", '"32"', "true"):
        write(in_dir, GOOD.replace('warehouse = "contoso.duckdb"', f'warehouse = "contoso.duckdb"\ngraph_concurrency = {bad}'))
        with pytest.raises(ConfigError, match=r"graph_concurrency .* must be an integer from 1 to 64") as err:
            load_profile("contoso")
        assert err.value.key == "graph_concurrency"


def test_unknown_profile_lists_known_ones(in_dir: Path) -> None:
    write(in_dir, GOOD)
    with pytest.raises(ConfigError, match="'nope' not found") as err:
        load_profile("nope")
    assert "contoso" in err.value.hint


def test_invalid_toml(in_dir: Path) -> None:
    write(in_dir, "[profiles.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (('client_secret_env = "CONTOSO_SECRET"', 'client_secret = "hunter2hunter2"'), "client_secret_env"),
        (('warehouse = "contoso.duckdb"', 'colour = "blue"'), "colour"),
        (('tenant_id = "11111111-1111-1111-1111-111111111111"\n', ""), "tenant_id"),
    ],
)
def test_cli_one_line_errors(in_dir: Path, edit: tuple[str, str], needle: str) -> None:
    write(in_dir, GOOD.replace(*edit))
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "profiles", "show", "contoso"],
                          capture_output=True, text=True, cwd=in_dir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert needle in proc.stderr
    assert "hunter2hunter2" not in proc.stderr + proc.stdout


def test_a_resolved_emulator_profile_is_still_the_emulator(in_dir: Path) -> None:
    from bridgekit.config import EMULATOR_RUNTIME_SOURCE

    resolved = load_profile().with_values(auth="certificate", sources={"auth": EMULATOR_RUNTIME_SOURCE})
    assert resolved.is_emulator
    assert not load_profile().with_values(auth="certificate", sources={}).is_emulator


def test_full_load_partitions_by_profile(in_dir: Path) -> None:
    # A tenant reads large tables in concurrent ranges; the local emulator (one process on the same
    # machine) in one read; an explicit setting wins over both.
    write(in_dir, GOOD)
    tenant = load_profile("contoso")
    assert tenant.sync.partitions is None and tenant.sync.partitions_for(tenant, 4) == 4
    emulator = load_profile("emulator")
    assert emulator.sync.partitions_for(emulator, 4) == 1
    write(in_dir, GOOD.replace('graph = ["users"]', 'graph = ["users"]\npartitions = 2'))
    tenant = load_profile("contoso")
    assert tenant.sync.partitions == 2 and tenant.sync.partitions_for(tenant, 4) == 2
    for bad in ("0", "17", '"4"', "true"):
        write(in_dir, GOOD.replace('graph = ["users"]', f'graph = ["users"]\npartitions = {bad}'))
        with pytest.raises(ConfigError, match="partitions") as err:
            load_profile("contoso")
        assert err.value.hint and "partitions = 4" in err.value.hint
