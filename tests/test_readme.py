"""The README's examples, run as a new user would: every command in its fenced ``bash`` blocks, its Python and its
``bridgekit.toml`` example, against a private emulator with nothing else configured.

A comment ``# exits N`` after a command says the exit code it documents (0 otherwise). Commands this test does
not run are listed in ``COVERED_ELSEWHERE`` with what runs them instead, so none is skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridgekit import __version__
from bridgekit.emulator import process

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.M | re.S)

COVERED_ELSEWHERE = {
    "make demo": "tests/test_install.py (the demo on a fresh clone) and conftest.py's demo_runs",
    "make test": ".ci/run",
    "python -m pip wheel --no-deps --wheel-dir dist .": "make package-test (.ci/package-test)",
    f"python -m pip install dist/bridgekit-{__version__}-py3-none-any.whl": "make package-test (.ci/package-test)",
}


def blocks(lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(README) if tag == lang]


@dataclass(frozen=True)
class Example:
    line: str
    argv: list[str]
    exit_code: int


def examples() -> list[Example]:
    out = []
    for body in blocks("bash"):
        for line in body.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                documented = re.search(r"#\s*exits (\d+)", line)
                out.append(Example(line, argv, int(documented.group(1)) if documented else 0))
    return out


@dataclass(frozen=True)
class Sandbox:
    cwd: Path
    env: dict[str, str]
    home: Path


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A new user's machine: no bridgekit.toml, no profile chosen, a private emulator home and data directories."""
    root = tmp_path_factory.mktemp("readme")
    home = root / "emulator"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGEKIT_")} | {
        # A fixed port, as the default is: a warehouse's delta links name the emulator's origin, so a restart on
        # another port would make the next sync refuse them.
        "BRIDGEKIT_EMULATOR_HOME": str(home), "BRIDGEKIT_EMULATOR_PORT": str(_free_port()),
        "XDG_DATA_HOME": str(root / "data"), "XDG_CONFIG_HOME": str(root / "config"), "COLUMNS": "110"}
    (root / "work").mkdir()
    try:
        yield Sandbox(root / "work", env, home)
    finally:
        process.stop(home)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(sandbox: Sandbox, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridgekit", *argv[1:]], cwd=sandbox.cwd, env=sandbox.env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_examples_and_skips_none_silently() -> None:
    found = examples()
    assert len([e for e in found if e.argv[0] == "bridgekit"]) >= 10
    others = {" ".join(e.argv) for e in found if e.argv[0] != "bridgekit"}
    assert others == set(COVERED_ELSEWHERE)


def test_every_bridgekit_command_of_the_readme_runs_as_documented(sandbox: Sandbox) -> None:
    for example in (e for e in examples() if e.argv[0] == "bridgekit"):
        proc = _run(sandbox, example.argv)
        where = f"{example.line}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        assert proc.returncode == example.exit_code, where
        assert "Traceback" not in proc.stderr, where
        if proc.returncode:
            # An error is an error line and a hint line at most, with what to do.
            assert 1 <= len(proc.stderr.splitlines()) <= 2 and proc.stderr.startswith("error: "), where
        else:
            assert proc.stderr == "" or example.argv[1] == "emulator", where  # warnings only: none here
        _check(example.argv, proc, where, sandbox.cwd)


def _check(argv: list[str], proc: subprocess.CompletedProcess[str], where: str, cwd: Path) -> None:
    """What each kind of command must show (the issues a first user met)."""
    out = proc.stdout
    command = argv[1:3]
    if command[0] == "sync":
        tables = [ln.split()[0] for ln in out.splitlines() if ln.startswith(("dataverse.", "graph."))]
        assert tables and len(tables) == len(set(tables)), where  # every table once
        assert len(out.splitlines()) == len(tables) + 3, where  # header, rule, tables, one summary line
    elif command == ["sql", "select name, revenue from dataverse.account order by revenue desc limit 5"]:
        assert len(out.splitlines()) == 6 and max(map(len, out.splitlines())) <= 110, where
    elif command[0] == "sql":
        assert "Candidate bindings" in proc.stderr and "duckdb_tables" not in proc.stderr, where
    elif command == ["emulator", "mutate"]:
        assert len(out.splitlines()) == 1, where
        assert re.match(r"\d+ created, \d+ updated, \d+ deleted: \d+ records in \d+ tables; change version", out), where
    elif command == ["profiles", "show"]:
        assert "graph.microsoft.com" not in out and "login.microsoftonline.com" not in out, where
    elif command[0] == "runbooks" and len(argv) == 2:
        assert max(map(len, out.splitlines())) <= 110, where
        assert "assess" in out and "win_probability" in out, where
    elif command[0] == "run":
        name = argv[2]
        run_dir = next(ln.split(None, 2)[2] for ln in out.splitlines() if ln.startswith("run dir:"))
        expected = [f"{name}.ipynb", f"{name}.html", "manifest.json"]
        if name == "assess":  # the customer deliverable: evidence files, and a PDF where Chromium is installed
            from bridgekit.runbooks.runner import _chromium

            expected += ["evidence.csv", "evidence.xlsx"] + ([f"{name}.pdf"] if _chromium() else [])
        assert sorted(p.name for p in (cwd / run_dir).iterdir() if p.suffix != ".log") == sorted(expected), where


def test_mutate_prints_the_ids_only_with_json(sandbox: Sandbox) -> None:
    assert _run(sandbox, ["bridgekit", "emulator", "start"]).returncode == 0  # the README's examples end with stop
    proc = _run(sandbox, ["bridgekit", "emulator", "mutate", "--updates", "3", "--seed", "1", "--json"])
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout)
    assert ids["counts"]["updates"] == 3 and sum(len(v) for v in ids["updated"].values()) >= 3


def test_the_python_example_of_the_readme_runs(sandbox: Sandbox) -> None:
    (code,) = blocks("python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=sandbox.cwd, env=sandbox.env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("0 ") and last.endswith("sync.html"), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_toml_example_of_the_readme_is_a_valid_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.config import load_profile

    profile_toml, lake_toml = blocks("toml")  # the profile, then its lake copy
    config = tmp_path / "bridgekit.toml"
    config.write_text(profile_toml + "\n" + lake_toml)
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    profile = load_profile(None)
    assert profile.name == "contoso" and profile.auth == "client_secret"
    assert profile.sync.graph == ("users", "groups", "messages", "events")
    assert profile.lake is not None and profile.lake.url.startswith("abfss://")
    assert (profile.lake.auth, profile.lake.account_name) == ("key", "contosodata")


def test_the_readme_names_what_a_run_writes_and_what_the_default_plan_syncs() -> None:
    from bridgekit.catalog import DEFAULT_GRAPH_RESOURCES

    assert "report.html" not in README
    assert "`<name>.html`" in README and "`manifest.json`" in README
    listed = re.search(r"`graph` \(by default (.+?), with sender", README, flags=re.S)
    assert listed is not None
    assert re.findall(r"`(\w+)`", listed.group(1)) == list(DEFAULT_GRAPH_RESOURCES)
