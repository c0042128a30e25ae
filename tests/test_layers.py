"""The architecture as a test: each layer of bridgekit imports only from the layers below it.

errors <- catalog <- config <- the seams (odata <- http <- auth) <- clients (dataverse, graph) <- warehouse <- lake <- sources
<- sync <- workbench <- record <- report <- checks <- integration <- features (assess, monitor, migration, analytics) <- runbooks <- cli.
The emulator is an independent implementation: it imports nothing of the client side but ``errors``.
"""

from __future__ import annotations

import ast
import pathlib

import bridgekit

ROOT = pathlib.Path(bridgekit.__file__).parent

LAYERS: list[set[str]] = [
    {"errors"},
    {"catalog"},
    {"config"},
    {"odata"},
    {"http"},
    {"auth"},
    {"dataverse", "graph"},
    {"warehouse"},
    {"lake"},
    {"sources"},
    {"sync"},
    {"workbench"},
    {"record"},
    {"report"},
    {"checks"},
    {"integration"},
    {"assess", "monitor", "migration", "analytics"},
    {"runbooks"},
    {"cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# The package itself (``bridgekit/__init__.py``: the facade's re-exports) sits above every layer; only the
# runner and the CLI take from it (its version).


def _unit(module: str) -> str:
    """``bridgekit.sources.graph`` -> ``sources``; ``bridgekit`` -> ``bridgekit`` (the package's __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bridgekit"


def _imports(path: pathlib.Path) -> list[str]:
    """Every bridgekit module imported anywhere in ``path`` (top level, in functions, under TYPE_CHECKING)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "bridgekit"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bridgekit":
                # `from bridgekit import record` names a module; `from bridgekit import __version__` the package
                out += [f"bridgekit.{a.name}" if (ROOT / f"{a.name}.py").exists() or (ROOT / a.name).is_dir()
                        else "bridgekit" for a in node.names]
            elif node.module.split(".")[0] == "bridgekit":
                out.append(node.module)
    return out


def _client_files() -> list[pathlib.Path]:
    return [p for p in sorted(ROOT.rglob("*.py"))
            if p.relative_to(ROOT).parts[0] != "emulator" and p.name != "__main__.py"
            and p.relative_to(ROOT) != pathlib.Path("__init__.py")]


def test_every_module_of_the_library_belongs_to_a_layer() -> None:
    units = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _client_files()}
    assert units - set(LEVEL) == set(), "a new module needs a place in LAYERS (and in README's Layout)"


def test_each_layer_imports_only_from_the_layers_below_it() -> None:
    offenders = []
    for path in _client_files():
        unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for module in _imports(path):
            target = _unit(module)
            if target == unit:
                continue
            if target == "emulator":
                # Starting, stopping and asking a local emulator is the facade's job (and the CLI's).
                ok = LEVEL[unit] >= LEVEL["workbench"]
            elif target == "bridgekit":
                ok = unit in ("runbooks", "cli")
            else:
                ok = LEVEL[target] < LEVEL[unit]
            if not ok:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


def test_the_emulator_imports_nothing_of_the_client_side_but_errors() -> None:
    offenders = []
    for path in sorted((ROOT / "emulator").rglob("*.py")):
        for module in _imports(path):
            if _unit(module) not in ("emulator", "errors"):
                offenders.append(f"emulator/{path.relative_to(ROOT / 'emulator')} imports {module}")
    assert offenders == []
