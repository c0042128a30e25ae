"""The public API: a sorted, complete __all__, and an import that does no I/O."""

from __future__ import annotations

import json
import subprocess
import sys

import bridgekit


def test_all_is_sorted_and_complete() -> None:
    assert list(bridgekit.__all__) == sorted(bridgekit.__all__)
    for name in bridgekit.__all__:
        assert getattr(bridgekit, name) is not None, name
    assert callable(bridgekit.connect)


def test_import_does_no_io() -> None:
    # An audit hook records sockets and every file opened that is not Python code being imported.
    code = r"""
import json, sys
events = []
def hook(event, args):
    if event == "socket.connect" or event == "socket.bind":
        events.append([event, str(args[1])])
    elif event == "open" and isinstance(args[0], str):
        p = args[0]
        if not p.endswith((".py", ".pyc", ".so", ".pth", ".typed")) and "/__pycache__/" not in p \
                and not p.endswith("/") and "site-packages" not in p and "/lib/python3" not in p:
            events.append([event, p])
sys.addaudithook(hook)
import bridgekit, bridgekit.config, bridgekit.errors
print(json.dumps(events))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_emulator_imports_nothing_from_the_client_side() -> None:
    import ast
    import pathlib

    client_side = {"auth", "http", "odata", "dataverse", "graph", "sync", "warehouse", "workbench", "runbooks"}
    root = pathlib.Path(bridgekit.__file__).parent / "emulator"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "bridgekit" and len(parts) > 1 and parts[1] in client_side:
                    offenders.append(f"{path.name}: {node.module}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "bridgekit" and len(parts) > 1 and parts[1] in client_side:
                        offenders.append(f"{path.name}: {alias.name}")
    assert offenders == []
