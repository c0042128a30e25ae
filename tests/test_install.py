"""What a new user meets first: what the package carries and needs, `make lab`, and a checkout git keeps clean.

The installed wheel itself (core dependencies only, run from outside the repository) is checked by
``make package-test`` (``.ci/package-test``), which ``make test`` runs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bridgekit.cli.main import cli
from bridgekit.runbooks.runner import find_runbook
from bridgekit.runbooks.shipped import shipped_dir

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = sorted((ROOT / "runbooks").glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*.ipynb"))


def _git_checkout() -> bool:
    return shutil.which("git") is not None and subprocess.run(
        ["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode == 0


# -- item 10: the runbooks and notebooks ship in the package ------------------------------------------------


def test_the_shipped_runbooks_and_notebooks_are_the_repository_folders() -> None:
    # One copy: the package's folders are links to runbooks/ and notebooks/, which the wheel then carries.
    assert shipped_dir("runbooks").resolve() == (ROOT / "runbooks").resolve()
    assert shipped_dir("notebooks").resolve() == (ROOT / "notebooks").resolve()
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["bridgekit"]
    assert {"shipped/runbooks/*.ipynb", "shipped/notebooks/*.ipynb"} <= set(globs)


def test_run_finds_a_shipped_runbook_or_notebook_from_any_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./runbooks here
    assert find_runbook("assess").path.resolve() == (ROOT / "runbooks" / "assess.ipynb").resolve()
    assert find_runbook("win_probability").path.resolve() == (ROOT / "notebooks" / "win_probability.ipynb").resolve()
    listed = CliRunner().invoke(cli, ["runbooks"])
    assert listed.exit_code == 0, listed.output
    assert "shipped with bridgekit" in listed.output
    assert "\n  assess\n" in listed.output and "\n  win_probability\n" in listed.output
    unknown = CliRunner().invoke(cli, ["run", "asess"])
    assert unknown.exit_code == 2
    assert "unknown runbook 'asess'" in unknown.output and "known runbooks: assess" in unknown.output


def test_a_copied_out_runbook_runs_instead_of_the_shipped_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = CliRunner().invoke(cli, ["runbooks", "--copy-to", "runbooks"])
    assert first.exit_code == 0, first.output
    assert first.output.startswith(f"copied {len(SHIPPED)} runbooks and notebooks to runbooks")
    assert sorted(p.name for p in (tmp_path / "runbooks").iterdir()) == sorted(p.name for p in SHIPPED)
    assert find_runbook("assess").path == Path("runbooks/assess.ipynb")
    # A second copy keeps the user's edits.
    (tmp_path / "runbooks" / "sync.ipynb").write_text("{}")
    again = CliRunner().invoke(cli, ["runbooks", "--copy-to", "runbooks"])
    assert "copied 0 " in again.output and "kept 8 already there" in again.output
    assert (tmp_path / "runbooks" / "sync.ipynb").read_text() == "{}"


# -- item 1: a core install runs every runbook and notebook and renders its report ----------------------------


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require (extras and markers not taken: what pip installs here)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def _imported_modules() -> set[str]:
    """Top-level modules imported by the library (the emulator too) and by the shipped notebooks' code cells."""
    sources = [p.read_text() for p in (ROOT / "bridgekit").rglob("*.py")]
    for nb in SHIPPED:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                if re.search(r"^%(load_ext|sql)\b|^%%sql", src, flags=re.M):
                    sources.append("import sql, duckdb_engine")  # jupysql's magic, and its DuckDB dialect
                if not src.lstrip().startswith("%%"):  # a cell magic's body is not Python (%%sql: SQL)
                    sources.append("\n".join(ln for ln in src.splitlines()
                                              if not ln.lstrip().startswith(("%", "!"))))
    mods: set[str] = set()
    for text in sources:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"bridgekit"}


def test_core_dependencies_cover_every_import_of_the_library_and_the_shipped_notebooks() -> None:
    core = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    installed = _closure(core)
    dists = metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_modules()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if names and not names & installed:
            missing[module] = sorted(names)
    # The report needs nbconvert, the analytics scikit-learn, explore.ipynb's %sql jupysql: all core.
    assert missing == {}, "imported but not installed by a core install (add to [project] dependencies)"
    assert {"nbconvert", "ipykernel", "scikit-learn", "jupysql", "duckdb-engine"} <= core
    assert PYPROJECT["project"]["optional-dependencies"]["lab"] == ["jupyterlab>=4"]


def test_environment_yml_installs_the_extras_of_pyproject_not_a_list_of_its_own() -> None:
    text = (ROOT / "environment.yml").read_text()
    pip_lines = [ln.strip() for ln in text.split("- pip:", 1)[1].splitlines() if ln.strip().startswith("-")]
    assert pip_lines == ['- -e ".[dev,lab]"']


def test_the_license_is_an_spdx_string_so_the_build_prints_no_deprecation_warning() -> None:
    # A TOML table here made setuptools print a deprecation warning per build step (make package-test checks
    # the real build log).
    assert PYPROJECT["project"]["license"] == "MIT"


# -- item 2: make lab ----------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_starts_as_root_or_a_user_and_shows_notebooks_and_runbooks(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "jupyter-lab").exists():
        pytest.fail(f"jupyter-lab is missing from {bin_dir}: the lab extra is part of make's environment")
    port, token = _free_port(), "bk-lab-test"
    env = os.environ | {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
                        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    # The environment make would have created is this one: -o keeps make from reinstalling it.
    stamp = Path(sys.prefix) / ".installed"
    args = ["make", "--no-print-directory", "lab", f"VENV={sys.prefix}", f"BIN={bin_dir}", "-o", str(stamp),
            f"LAB_ARGS=--no-browser --ServerApp.port={port} --ServerApp.port_retries=0 "
            f"--IdentityProvider.token={token}"]
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        names: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/contents?token={token}"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    names = [c["name"] for c in json.load(resp)["content"]]
                break
            except OSError:
                time.sleep(0.5)
        output = (tmp_path / "lab.log").read_text()
        assert "Running as root is not recommended" not in output
        assert {"notebooks", "runbooks"} <= set(names), output[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# -- item 3: git status stays clean ---------------------------------------------------------------------------


@pytest.mark.skipif(not _git_checkout() or shutil.which("make") is None, reason="needs a git checkout and make")
def test_git_status_is_clean_after_the_demo_on_a_fresh_clone(demo_runs: Any, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    # The git filter as `make` installs it (nbstripout, keeping cell ids), in the clone's own config.
    subprocess.run(["make", "--no-print-directory", "git-filter", f"BIN={Path(sys.executable).parent}"],
                   cwd=clone, check=True)
    # Touched notebooks make git run the filter on each rather than trust the index's timestamps.
    future = time.time() + 5
    for nb in [*clone.glob("runbooks/*.ipynb"), *clone.glob("notebooks/*.ipynb")]:
        os.utime(nb, (future, future))
    # The demo on a copy of the session's synced warehouse (its sync is then incremental, and quick).
    warehouse = tmp_path / "emulator.duckdb"
    shutil.copyfile(demo_runs.warehouse, warehouse)
    config = tmp_path / "bridgekit.toml"
    config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{warehouse}"\n')
    env = {k: v for k, v in os.environ.items() if k != "BRIDGEKIT_PROFILE"} | {"BRIDGEKIT_CONFIG": str(config)}
    demo = subprocess.run([sys.executable, "-m", "bridgekit", "demo"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert list((clone / "runs").glob("*-assess/assess.html"))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == ""

