"""Headless runbooks: discover, inspect parameters, execute through Papermill, write manifest and report, map exit codes.

This module is the only one that imports Papermill (and nbconvert); both are imported inside functions so
``import bridgekit`` stays light. :func:`run_runbook` reads top to bottom as the whole algorithm:

1. find the runbook and parse its ``parameters`` cell (``name: type = value  # help``, one per line);
2. refuse unknown, mistyped or secret-looking parameters and a bad profile, before any kernel starts
   (:class:`~bridgekit.errors.RunbookError`, exit 2);
3. execute with Papermill into ``<out>/<UTC timestamp>-<name>/``, with a whole-run deadline, a kernel
   environment carrying the profile name, the record file and an offline Plotly renderer;
4. translate what happened into one documented exit code (README, "Exit codes"): the exception class
   a cell raised (``PapermillExecutionError.ename``), a dead kernel, a timeout, a red check;
5. write the executed notebook (failing cell marked), an HTML report with inputs hidden, and
   ``manifest.json`` (parameters, profile, versions, times, status, error, data watermark, results, checks);
6. scan all three for the secret values in play and token-shaped strings; on a hit, replace them with a
   quarantine notice and exit 8.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import functools
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import signal
import tempfile
import time
import tokenize
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bridgekit.errors import (
    EXIT_CODES,
    ExitCode,
    RunbookError,
    RunbookFailed,
    error_class,
    exit_code_for,
    redact,
    shown,
)
from bridgekit.record import RECORD_ENV, read_records
from bridgekit.report import RUN_DIR_ENV
from bridgekit.runbooks.secrets import find_secrets
from bridgekit.runbooks.shipped import default_dirs

__all__ = [
    "DEFAULT_OUT",
    "RUNBOOKS_DIR",
    "Parameter",
    "RunResult",
    "Runbook",
    "check_parameters",
    "coerce_text_parameters",
    "discover",
    "find_runbook",
    "load_runbook",
    "run_runbook",
]

log = logging.getLogger(__name__)

RUNBOOKS_DIR = "runbooks"
DEFAULT_OUT = "runs"
# Plotly's "notebook" renderer embeds plotly.js once per kernel (first figure) and draws each figure with
# it, so the executed notebook and its HTML report render offline; "notebook_connected" (the usual
# default) loads plotly.js from a CDN instead. The mimetype renderer keeps figures interactive in
# JupyterLab, which does not run scripts in an untrusted notebook's HTML outputs.
PLOTLY_RENDERER = "plotly_mimetype+notebook"
SECRET_ENVS_ALWAYS = ("BRIDGEKIT_EMULATOR_CLIENT_SECRET",)
# Parameter names that announce a secret: parameters carry names (a profile, an env var), never values.
_SECRET_NAME = re.compile(r"(?i)(secret|passw(or)?d|passwd|pwd|token|api_?key|credential|private_?key|"
                          r"assertion|connection_?string|sas_?key|account_?key)")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?$")
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}
_TYPING_ALIASES = {"List": "list", "Dict": "dict"}
_ERROR_TAG = "papermill-error-cell-tag"  # papermill's own marker tag: it removes these cells on a re-run
_ERROR_STYLE = 'style="color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:2em;"'


# --------------------------------------------------------------------------------------------------
# Discovery and inspection
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parameter:
    """One line of a runbook's ``parameters`` cell: ``name: type = value  # help``.

    Attributes:
        name: The variable name.
        type: The annotation as written (``int``, ``list[str]``, ``str | None``).
        default: The literal value in the cell.
        help: The trailing comment.
        kind: The base type checked against: int, float, str, bool, list, dict (``?`` when unsupported).
        optional: ``None`` is accepted (``T | None`` or ``Optional[T]``).
        iso_date: A ``str`` holding an ISO date (default looks like one, or the help says "ISO date").
        default_text: The default as written in the cell.
    """

    name: str
    type: str
    default: Any
    help: str = ""
    kind: str = "str"
    optional: bool = False
    iso_date: bool = False
    default_text: str = ""

    def describe(self) -> str:
        """``name: type = value  # help`` (the line as a user would write it)."""
        text = f"{self.name}: {self.type} = {self.default_text or repr(self.default)}"
        return f"{text}  # {self.help}" if self.help else text

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``bridgekit runbooks --json``."""
        return {"name": self.name, "type": self.type, "default": self.default, "help": self.help,
                "iso_date": self.iso_date}


@dataclass(frozen=True)
class Runbook:
    """A runbook notebook and what its cells declare.

    Attributes:
        name: The file stem (``sync`` for ``runbooks/sync.ipynb``), used by ``bridgekit run NAME``.
        path: The notebook file.
        title: The first heading of the first markdown cell.
        description: The first paragraph after it.
        parameters: The parameters cell, in order.
        problems: Why the parameters cell cannot be used (the runner refuses to run such a runbook).
    """

    name: str
    path: Path
    title: str = ""
    description: str = ""
    parameters: tuple[Parameter, ...] = ()
    problems: tuple[str, ...] = ()

    def parameter(self, name: str) -> Parameter | None:
        """The declared parameter called ``name``, if any."""
        return next((p for p in self.parameters if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``bridgekit runbooks --json``."""
        return {"name": self.name, "path": str(self.path), "title": self.title,
                "description": self.description, "parameters": [p.to_dict() for p in self.parameters],
                "problems": list(self.problems)}


def _cell_source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _annotation(node: ast.expr) -> tuple[str, bool]:
    """(base kind, optional) of an annotation; kind ``?`` when it is not one of the supported types."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [node.left, node.right]
        nones = [p for p in parts if isinstance(p, ast.Constant) and p.value is None]
        others = [p for p in parts if p not in nones]
        if len(nones) == 1 and len(others) == 1:
            return _annotation(others[0])[0], True
        return "?", False
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if node.value.id == "Optional":
            return _annotation(node.slice)[0], True
        base = _TYPING_ALIASES.get(node.value.id, node.value.id)
        return (base, False) if base in ("list", "dict") else ("?", False)
    if isinstance(node, ast.Name):
        base = _TYPING_ALIASES.get(node.id, node.id)
        return (base, False) if base in _TYPES else ("?", False)
    return "?", False


def _parse_parameters(source: str) -> tuple[list[Parameter], list[str]]:
    params: list[Parameter] = []
    problems: list[str] = []
    try:
        tree = ast.parse(source)
        comments = {tok.start[0]: tok.string[1:].strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
    except (SyntaxError, tokenize.TokenError) as exc:
        return [], [f"parameters cell is not valid Python: {exc}"]
    for stmt in tree.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            name, value_node = stmt.target.id, stmt.value
            type_text = ast.unparse(stmt.annotation)
            kind, optional = _annotation(stmt.annotation)
        elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name)):
            name, value_node = stmt.targets[0].id, stmt.value
            type_text = kind = ""
            optional = False
        else:
            problems.append(f"parameters cell line {stmt.lineno}: not a `name: type = value  # help` line")
            continue
        try:
            default = ast.literal_eval(value_node)
        except (ValueError, SyntaxError):
            problems.append(f"parameter '{name}': the default must be a literal (a number, string, list, dict)")
            continue
        if not type_text:  # a bare `x = 3`: the type is the default's
            kind = type(default).__name__ if type(default).__name__ in _TYPES else "?"
            type_text, optional = kind, default is None
        if kind == "?":
            problems.append(f"parameter '{name}': type '{type_text}' is not one of int, float, str, bool, "
                            "list, dict (dates are ISO strings: str)")
        end = stmt.end_lineno or stmt.lineno
        help_text = comments.get(end) or comments.get(stmt.lineno) or ""
        iso = kind == "str" and ((isinstance(default, str) and bool(_ISO_DATE.match(default)))
                                 or "iso date" in help_text.lower())
        written = ast.get_source_segment(source, value_node) or repr(default)
        params.append(Parameter(name, type_text, default, help_text, kind, optional, iso, written))
    return params, problems


def load_runbook(path: str | Path) -> Runbook:
    """Read a runbook notebook: its title, description and ``parameters`` cell.

    Raises:
        RunbookError: the file is missing or not a notebook.
    """
    p = Path(path)
    try:
        nb = json.loads(p.read_text(encoding="utf-8"))
        cells = list(nb.get("cells", []))
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise RunbookError(f"{p} is not a readable notebook: {exc}", runbook=p.stem,
                           hint="check the path; runbooks are .ipynb files") from exc
    title = description = ""
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            lines = [ln.strip() for ln in _cell_source(cell).splitlines()]
            heads = [ln for ln in lines if ln.startswith("#")]
            title = heads[0].lstrip("#").strip() if heads else ""
            body = [ln for ln in lines if ln and not ln.startswith("#")]
            description = body[0] if body else ""
            break
    tagged = [c for c in cells if "parameters" in (c.get("metadata", {}).get("tags") or [])]
    problems: list[str] = []
    params: list[Parameter] = []
    if len(tagged) > 1:
        problems.append(f"{len(tagged)} cells are tagged 'parameters' (exactly one is allowed)")
    if tagged:
        params, problems2 = _parse_parameters(_cell_source(tagged[0]))
        problems += problems2
    return Runbook(p.stem, p, title, description, tuple(params), tuple(problems))


def _runbook_dirs(path: str | Path | None) -> list[Path]:
    return [Path(path)] if path is not None else default_dirs()


def discover(path: str | Path | None = None) -> list[Runbook]:
    """The runbooks in ``path`` (a directory or one ``.ipynb`` file), by name.

    Without ``path``: ``./runbooks`` when there is one, then the runbooks and notebooks shipped with bridgekit
    (a name found earlier hides the same name later).

    Raises:
        RunbookError: the directory does not exist.
    """
    found: dict[str, Runbook] = {}
    for root in _runbook_dirs(path):
        if root.is_file():
            return [load_runbook(root)]
        if not root.is_dir():
            raise RunbookError(f"no runbooks directory at {root}",
                               hint="pass --path the folder holding your runbooks (.ipynb files)")
        for p in sorted(root.glob("*.ipynb")):
            if not p.name.startswith(".") and p.stem not in found:
                found[p.stem] = load_runbook(p)
    return list(found.values())


def find_runbook(name: str, path: str | Path | None = None) -> Runbook:
    """The runbook called ``name`` in ``path`` (default: see :func:`discover`); ``name`` may also be a notebook path.

    Raises:
        RunbookError: no such runbook (the message lists the known ones).
    """
    direct = Path(name)
    if name.endswith(".ipynb") and direct.is_file():
        return load_runbook(direct)
    roots = _runbook_dirs(path)
    for root in roots:
        candidate = (root if root.is_file() else root / f"{name}.ipynb")
        if candidate.is_file() and candidate.stem == name:
            return load_runbook(candidate)
    known = ", ".join(r.name for r in discover(path)) if all(r.exists() for r in roots) else ""
    where = f" in {path}" if path is not None else ""
    raise RunbookError(f"unknown runbook '{shown(name)}'{where}", runbook=shown(name),
                       hint=f"known runbooks: {known}" if known else "pass --path the folder holding your runbooks")


# --------------------------------------------------------------------------------------------------
# Parameters: coercion from text, type checks, secret checks
# --------------------------------------------------------------------------------------------------

def _bad(runbook: Runbook, name: str, message: str, hint: str | None = None) -> RunbookError:
    return RunbookError(f"runbook '{runbook.name}': parameter '{shown(name)}' {message}", runbook=runbook.name,
                        parameter=shown(name), hint=hint)


def _declared(runbook: Runbook, name: str) -> Parameter:
    p = runbook.parameter(name)
    if p is None:
        known = ", ".join(q.name for q in runbook.parameters) or "none"
        raise _bad(runbook, name, "is not declared by the runbook", hint=f"its parameters are: {known}")
    return p


def coerce_text_parameters(runbook: Runbook, values: Mapping[str, str]) -> dict[str, Any]:
    """Turn command-line text (``-p name value``) into values of each parameter's declared type.

    ``int``/``float`` parse numbers, ``bool`` takes true/false/yes/no/1/0, ``list``/``dict`` take JSON or
    YAML flow syntax (``[a, b]``), ``str`` is kept as written; ``null`` is None for optional parameters.

    Raises:
        RunbookError: an unknown parameter or a value that does not parse (exit 2), naming the parameter.
    """
    out: dict[str, Any] = {}
    for name, text in values.items():
        p = _declared(runbook, name)
        t = text.strip()
        if p.optional and t.lower() in ("null", "none", "~"):
            out[name] = None
            continue
        try:
            if p.kind == "int":
                out[name] = int(t, 10)
            elif p.kind == "float":
                f = float(t)
                if not math.isfinite(f):
                    raise ValueError(t)
                out[name] = f
            elif p.kind == "bool":
                low = t.lower()
                if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(t)
                out[name] = low in ("true", "yes", "1", "on")
            elif p.kind in ("list", "dict"):
                import yaml  # JSON is YAML, and YAML flow syntax ([a, b]) is friendlier on a command line

                out[name] = yaml.safe_load(t)
            else:
                out[name] = text
        except Exception as exc:  # ValueError, or yaml.YAMLError (no common base)
            raise _bad(runbook, name, f"expects {p.type}; the value given does not parse as one",
                       hint=f"declared as: {p.describe()}") from exc
    return out


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value; a list of strings (nbformat's multi-line text) comes out joined."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        if value and all(isinstance(v, str) for v in value):
            yield "".join(value)
            return
        for v in value:
            yield from _strings(v)


def _check_value(runbook: Runbook, p: Parameter, value: Any) -> Any:
    if value is None:
        if p.optional:
            return None
        raise _bad(runbook, p.name, f"expects {p.type}, not None", hint=f"declared as: {p.describe()}")
    if isinstance(value, _dt.datetime | _dt.date) and p.kind == "str":
        value = value.isoformat()
    kind_ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list | tuple),
        "dict": isinstance(value, Mapping) and all(isinstance(k, str) for k in value),
    }.get(p.kind, False)
    if not kind_ok:
        raise _bad(runbook, p.name, f"expects {p.type}, got {type(value).__name__}",
                   hint=f"declared as: {p.describe()}")
    if p.kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise _bad(runbook, p.name, "must be a finite number")
    if p.kind == "list":
        value = list(value)
    if p.kind == "dict":
        value = dict(value)
    if p.iso_date:
        try:
            _dt.datetime.fromisoformat(value) if "T" in value or " " in value else _dt.date.fromisoformat(value)
        except ValueError as exc:
            raise _bad(runbook, p.name, "expects an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ)",
                       hint=f"declared as: {p.describe()}") from exc
    try:
        json.dumps(value, allow_nan=False)  # parameters travel as JSON-able literals (STYLE: runbooks)
    except (TypeError, ValueError) as exc:
        raise _bad(runbook, p.name, "must hold only JSON values (numbers, strings, booleans, lists, dicts)") from exc
    return value


def check_parameters(runbook: Runbook, values: Mapping[str, Any], *,
                     secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Validate parameter values against the runbook's declarations; returns the checked values.

    Refuses, naming the parameter and never echoing its value: a name the runbook does not declare, a
    value of the wrong type (``int`` is accepted for ``float``, dates may be ``date`` objects for an ISO
    ``str``), a name that announces a secret (``client_secret``, ``password``, ``token`` ...), and a value
    that looks like a secret (token-shaped, or equal to one of ``secrets``).

    Raises:
        RunbookError: exit code 2, before any kernel starts.
    """
    if runbook.problems:
        raise RunbookError(f"runbook '{runbook.name}' has an unusable parameters cell: {runbook.problems[0]}",
                           runbook=runbook.name, hint="write one `name: type = value  # help` line per parameter")
    literals = [s for s in secrets if s]
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if _SECRET_NAME.search(name):
            raise _bad(runbook, name, "is named like a secret; parameters carry names, never secrets",
                       hint="pass a profile name and let the profile name the environment variable that "
                            "holds the secret (client_secret_env)")
        p = _declared(runbook, name)
        for text in _strings(value):
            found = find_secrets(text, literals=literals)
            if found:
                raise _bad(runbook, name, f"looks like it holds a secret ({', '.join(found)}); refused",
                           hint="parameters carry names (a profile, an environment variable), never secret values")
        checked[name] = _check_value(runbook, p, value)
    return checked


# --------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What a run produced. ``manifest`` is the content of ``manifest.json``.

    Attributes:
        runbook: The runbook name.
        run_dir: ``<out>/<UTC timestamp>-<name>/``.
        exit_code: The documented exit code (``bridgekit.errors.ExitCode``).
        status: ``succeeded``, ``failed`` or ``quarantined``.
        notebook: The executed notebook (a quarantine notice if exit code 8).
        report: The HTML report, or None if it could not be rendered.
        manifest_path: ``run_dir / "manifest.json"``.
        manifest: The manifest as a dict.
    """

    runbook: str
    run_dir: Path
    exit_code: int
    status: str
    notebook: Path
    report: Path | None
    manifest_path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the run succeeded (exit code 0)."""
        return self.exit_code == 0

    @property
    def error(self) -> dict[str, Any] | None:
        """The manifest's error entry (type, message, cell index), if the run failed."""
        err = self.manifest.get("error")
        return err if isinstance(err, dict) else None


@dataclass
class _Outcome:
    exit_code: int = 0
    error: dict[str, Any] | None = None


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _iso(t: _dt.datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


#: Where a run executes before its outputs are scanned: owner-only (0700), inside --out.
_PRIVATE = ".running"


def _make_run_dir(out: Path, name: str, started: _dt.datetime) -> Path:
    """Reserve ``<out>/<UTC time>-<name>`` and create its private twin ``<out>/.running/<same>`` (0700).

    A run writes only into the private directory; :func:`_publish` moves it to ``out`` once its outputs
    have been scanned, so nothing a cell printed is readable by others, or sits in ``out``, before that.
    """
    private_root = out / _PRIVATE
    private_root.mkdir(parents=True, exist_ok=True)
    private_root.chmod(0o700)
    stem = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{name}"
    for i in range(1, 1000):
        leaf = stem if i == 1 else f"{stem}-{i}"
        if (out / leaf).exists():
            continue
        try:
            (private_root / leaf).mkdir(mode=0o700)  # atomic: two runs in the same second get different names
        except FileExistsError:
            continue
        (private_root / leaf / ".pid").write_text(str(os.getpid()))
        return private_root / leaf
    raise RunbookError(f"could not create a run directory under {out}", runbook=name)


def _publish(private: Path) -> Path:
    """Move a scanned run directory from ``<out>/.running/`` to ``<out>/``; its files stay owner-only."""
    (private / ".pid").unlink(missing_ok=True)
    for f in private.iterdir():
        with contextlib.suppress(OSError):
            f.chmod(0o600)
    final = private.parent.parent / private.name
    private.rename(final)
    final.chmod(0o755)
    with contextlib.suppress(OSError):
        private.parent.rmdir()  # only when no other run is in progress
    return final


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _recover_leftovers(out: Path, literals: list[str]) -> list[Path]:
    """Scan, quarantine and publish what runs killed outright (SIGKILL, power loss) left in ``<out>/.running``.

    A directory whose process still runs is another run in progress and is left alone.
    """
    recovered: list[Path] = []
    private_root = out / _PRIVATE
    if not private_root.is_dir():
        return recovered
    for leftover in sorted(p for p in private_root.iterdir() if p.is_dir()):
        if _pid_alive(leftover / ".pid"):
            continue
        for stray in leftover.glob(".records*"):
            stray.unlink(missing_ok=True)
        files = [f for f in leftover.iterdir() if f.is_file() and f.name != ".pid"]
        findings = _scan(files, literals)
        for f in files:
            if _scan([f], literals):
                f.write_text("Quarantined: this killed run's output held a secret-shaped string.\n", encoding="utf-8")
        manifest = {"status": "killed", "exit_code": None, "recovered_at": _iso(_utcnow()),
                    "error": {"type": "Killed", "message": "the run was killed before it ended; its partial "
                              "outputs were scanned when the next run started"},
                    "quarantine": {"findings": findings} if findings else None}
        _write_manifest(leftover / "manifest.json", manifest)
        with contextlib.suppress(OSError):
            recovered.append(_publish(leftover))
            log.warning("a killed run's outputs were found, scanned%s and kept in %s",
                        f" ({len(findings)} finding(s) quarantined)" if findings else "", recovered[-1])
    return recovered


def _choose_profile(runbook: Runbook, values: Mapping[str, Any], explicit: str | None) -> tuple[str, str]:
    from bridgekit.config import resolve_profile_name

    given = values.get("profile") if runbook.parameter("profile") else None
    if explicit and given is not None and given != explicit:
        raise _bad(runbook, "profile", "disagrees with --profile", hint="give the profile once")
    if explicit:
        return explicit, "argument"
    if isinstance(given, str) and given:
        return given, "parameter"
    name, origin = resolve_profile_name(None)
    declared = runbook.parameter("profile")
    if origin == "built-in" and declared is not None and isinstance(declared.default, str) and declared.default:
        return declared.default, "runbook default"
    return name, origin


def _secret_values(profile: Any, extra: Iterable[str]) -> list[str]:
    names = [getattr(profile, "client_secret_env", None), getattr(profile, "certificate_password_env", None),
             *SECRET_ENVS_ALWAYS]
    values = [os.environ.get(n, "") for n in names if n]
    return [v for v in [*values, *extra] if v]


def _kernel_manager_class(env: Mapping[str, str], status: dict[str, Any], log_file: IO[str]) -> type:
    """A kernel manager that launches the kernel with ``env`` added and its own stdout/stderr in
    ``log_file`` (a cron job's mail stays clean; a dying kernel's last words are kept), and that remembers
    how the kernel process exited."""
    from jupyter_client.manager import AsyncKernelManager, KernelManager

    class RunbookKernelManager(AsyncKernelManager):  # type: ignore[misc]
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            kw["env"] = {**os.environ, **(kw.get("env") or {}), **env}
            kw["stdout"] = kw["stderr"] = log_file
            await KernelManager._async_start_kernel(self, **kw)

        async def cleanup_resources(self, restart: bool = False) -> None:  # type: ignore[override]
            proc = getattr(self.provisioner, "process", None)
            if proc is not None:
                status["returncode"] = proc.poll()
            await KernelManager._async_cleanup_resources(self, restart=restart)

    return RunbookKernelManager


def _meaning(code: Any) -> str:
    try:
        return EXIT_CODES[ExitCode(int(code))]
    except (ValueError, TypeError):
        return ""


# What a cell's exception can mean for the run; any other exception is "a cell raised" (5).
_CELL_CODES = (ExitCode.USAGE, ExitCode.AUTH, ExitCode.TRANSIENT, ExitCode.CHECK_FAILED)


def _exit_code_for_ename(ename: str) -> int:
    """The exit code for the class name of an exception a cell raised (``PapermillExecutionError.ename``),
    found by walking bridgekit's error tree (:func:`bridgekit.errors.exit_code_for`)."""
    cls = error_class(ename)
    if cls is None or issubclass(cls, RunbookError):
        return int(ExitCode.NOTEBOOK_ERROR)
    code = exit_code_for(cls)
    return int(code) if code in _CELL_CODES else int(ExitCode.NOTEBOOK_ERROR)


def _read_nb(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_nb(path: Path, nb: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _runbook_cell_index(nb: Mapping[str, Any], index: int) -> int:
    """The index in the source runbook of executed-notebook cell ``index`` (skips injected and marker cells)."""
    skip = 0
    for cell in nb.get("cells", [])[:index]:
        tags = cell.get("metadata", {}).get("tags") or []
        if "injected-parameters" in tags or _ERROR_TAG in tags:
            skip += 1
    return index - skip


def _mark_failed_cell(nb_path: Path, message: str) -> tuple[int | None, int | None]:
    """Mark the cell that was running when the kernel died or the deadline passed, as papermill marks a
    cell that raised: a red banner on top and an anchor just before the cell. Returns (cell index in the
    written notebook, execution count)."""
    nb = _read_nb(nb_path)
    if nb is None:
        return None, None
    cells = nb.setdefault("cells", [])
    started = [i for i, c in enumerate(cells)
               if c.get("cell_type") == "code" and (c.get("metadata", {}).get("papermill") or {}).get("start_time")]
    idx = started[-1] if started else None
    count = cells[idx].get("execution_count") if idx is not None else None

    def marker(text: str, anchor: bool = False) -> dict[str, Any]:
        ident = 'id="papermill-error-cell" ' if anchor else ""
        span = f"<span {ident}{_ERROR_STYLE}>{html.escape(text)}</span>"
        return {"cell_type": "markdown", "id": f"bk-error-{'anchor' if anchor else 'banner'}",
                "metadata": {"tags": [_ERROR_TAG]}, "source": span}

    if idx is not None:
        cells.insert(idx, marker(f"{message} The run stopped here:", anchor=True))
    cells.insert(0, marker(message))
    _write_nb(nb_path, nb)
    return (idx + 2 if idx is not None else None), count


def _describe_returncode(rc: Any) -> str:
    if isinstance(rc, int) and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        why = " (sent by the operating system's out-of-memory killer, or by someone who killed it)" \
            if -rc == signal.SIGKILL else ""
        return f"the kernel process was killed by {name}{why}"
    if isinstance(rc, int):
        return f"the kernel process exited with status {rc}"
    return "the kernel process stopped answering"


class _ValidatedParameterNoise(logging.Filter):
    """Drops papermill's own parameter-cell warnings: the runner has already checked every parameter with
    a full Python parser, and papermill's line regex misreads valid cells (an apostrophe in a help comment
    opens a "string" for it), which would put a false "unknown parameter" warning in every cron mail."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Passed unknown parameter") or msg.startswith("Unable to parse line"))


@contextlib.contextmanager
def _quiet_papermill_parameter_warnings() -> Iterator[None]:
    noise = _ValidatedParameterNoise()
    loggers = [logging.getLogger("papermill"), logging.getLogger("papermill.translators")]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


def _where(index: int | None, count: Any) -> str:
    if index is None:
        return ""
    return f" while running cell {index}" + (f" (execution count {count})" if count is not None else "")


def _execute(runbook: Runbook, nb_path: Path, values: Mapping[str, Any], env: Mapping[str, str],
             timeout: float | None, kernel_log: Path) -> _Outcome:
    """Run the notebook with Papermill and translate every way it can end into an outcome (the seam)."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    kernel_status: dict[str, Any] = {}
    deadline = time.monotonic() + timeout if timeout else None

    def cell_timeout(_cell: Any) -> int | None:
        # nbclient asks per cell; handing each cell what is left of the whole-run budget makes --timeout a
        # deadline for the run rather than per cell (papermill's --execution-timeout). 0 would mean "none".
        if deadline is None:
            return None
        return max(1, math.ceil(deadline - time.monotonic()))

    try:
        with kernel_log.open("w", encoding="utf-8") as log_file, _quiet_papermill_parameter_warnings():
            pm.execute_notebook(
                str(runbook.path), str(nb_path), parameters=dict(values) or None,
                progress_bar=False, log_output=False, request_save_on_cell_execute=True,
                start_timeout=min(60, math.ceil(timeout)) if timeout else 60, timeout_func=cell_timeout,
                kernel_manager_class=_kernel_manager_class(env, kernel_status, log_file),
            )
        return _Outcome()
    except PapermillExecutionError as exc:
        # papermill wrote the notebook with a banner on top and an anchor before the failing cell.
        nb = _read_nb(nb_path) or {}
        marked = int(exc.cell_index) + 2
        return _Outcome(_exit_code_for_ename(str(exc.ename)), {
            "type": str(exc.ename), "message": redact(f"{exc.ename}: {exc.evalue}")[:2000],
            "cell_index": marked, "runbook_cell_index": _runbook_cell_index(nb, marked),
            "execution_count": exc.exec_count,
        })
    except DeadKernelError as exc:
        why = _describe_returncode(kernel_status.get("returncode"))
        msg = f"The kernel died: {why}."
        index, count = _mark_failed_cell(nb_path, msg)
        return _Outcome(int(ExitCode.KERNEL_DIED), {
            "type": "DeadKernelError", "message": f"the kernel died{_where(index, count)}: {why}",
            "hint": "check the runbook's memory use (large frames, unbounded queries) and the system log "
                    "for the OOM killer; outputs up to the failure are in the notebook",
            "cell_index": index, "runbook_cell_index": _runbook_cell_index(_read_nb(nb_path) or {}, index)
            if index is not None else None, "execution_count": count, "kernel_exit": kernel_status.get("returncode"),
            "detail": str(exc)[:200],
        })
    except (CellTimeoutError, TimeoutError) as exc:
        msg = f"The run exceeded its timeout of {timeout:g} s." if timeout else "A cell timed out."
        index, count = _mark_failed_cell(nb_path, msg)
        return _Outcome(int(ExitCode.KERNEL_DIED), {
            "type": "Timeout", "message": f"the run timed out{_where(index, count)} (timeout {timeout:g} s)"
            if timeout else f"timed out{_where(index, count)}: {str(exc)[:200]}",
            "hint": "raise --timeout, or make the runbook do less per run",
            "cell_index": index, "runbook_cell_index": _runbook_cell_index(_read_nb(nb_path) or {}, index)
            if index is not None else None, "execution_count": count,
        })
    except Exception as exc:  # the kernel could not start, papermill could not read or write ...
        log.debug("runbook %s: execution failed outside any cell", runbook.name, exc_info=True)
        is_start = isinstance(exc, RuntimeError) and "didn't respond" in str(exc)
        no_kernel = type(exc).__name__ == "NoSuchKernel"
        if not nb_path.exists():
            nb = _read_nb(runbook.path) or {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
            _write_nb(nb_path, nb)
        _mark_failed_cell(nb_path, "The runbook could not be executed.")
        return _Outcome(int(ExitCode.KERNEL_DIED) if is_start else int(ExitCode.ERROR), {
            "type": type(exc).__name__, "message": redact(str(exc))[:500],
            "hint": "install the notebook kernel: .venv/bin/python -m ipykernel install --sys-prefix --name python3"
            if no_kernel else "run with -v for details", "cell_index": None,
        })


# --------------------------------------------------------------------------------------------------
# Manifest, report, secret scan
# --------------------------------------------------------------------------------------------------

def _collect(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    results: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    watermark: dict[str, Any] = {}
    for r in records:
        if r["kind"] == "result":
            results[str(r.get("name"))] = r.get("value")
        elif r["kind"] == "check":
            checks.append({"name": r.get("name"), "status": r.get("status"), "detail": r.get("detail", "")})
        elif r["kind"] == "watermark":
            watermark[str(r.get("table"))] = {"sync_run_id": r.get("sync_run_id"), "position": r.get("position"),
                                              "rows": r.get("rows"), "recorded_at": r.get("at")}
    return results, checks, watermark


_REPORT_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{#- The report must render offline: no require.js or MathJax from a CDN (plotly.js is embedded). -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block extra_css -%}
{{ super() }}
<style>
/* bridgekit report style: one reading width, print-ready (a section per page, page numbers). */
body.jp-Notebook { max-width: 1100px; margin: 0 auto; padding: 0 24px;
  font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; }
.jp-RenderedHTMLCommon { font-size: 14px; line-height: 1.45; }
.jp-RenderedHTMLCommon table { table-layout: auto; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { white-space: normal; }
@page { size: A4; margin: 14mm 12mm 16mm 12mm;
  @bottom-right { content: "Page " counter(page) " of " counter(pages); font-size: 9pt; color: #555; } }
@media print {
  body.jp-Notebook { max-width: none; padding: 0; }
  .bk-page { break-before: page; }
  h3, .bk-badge { break-after: avoid; }
  tr, .plotly-graph-div { break-inside: avoid; }
  .modebar-container { display: none; }
}
</style>
{%- endblock extra_css -%}
"""
# Plotly's HTML for each figure references MathJax on a CDN; figures draw without it, so drop the tag.
_REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']https?://[^\"']*[\"'][^>]*>\s*</script>", re.I)
#: A cell with this tag is for the runbook's user (what it needs, its exit codes), not for the report's reader.
REPORT_HIDE_TAG = "report-hide"


def _outcome(manifest: Mapping[str, Any]) -> str:
    """The run's outcome in words: a red check is a completed run with red findings, not a failure."""
    code = int(manifest["exit_code"])
    checks = manifest.get("checks") or []
    red = sum(1 for c in checks if c.get("status") == "red")
    if code == 0:
        return "succeeded" + (f" ({len(checks)} checks, none red)" if checks else "")
    if code == int(ExitCode.CHECK_FAILED) and (manifest.get("error") or {}).get("type") == "CheckFailed" \
            and (manifest.get("error") or {}).get("cell_index") is None:
        return (f"completed with {red} red finding{'s' if red != 1 else ''} (exit code {code} for schedulers: "
                f"{_meaning(code)})")
    return f"did not complete: exit code {code} ({_meaning(code)})"


def _run_record_html(manifest: Mapping[str, Any], *, document: bool) -> str:
    """The report's last section: outcome, run metadata, parameters, data watermark (and, unless the
    notebook is a document that reports its own findings, the checks and results it recorded)."""
    from bridgekit import report

    err = manifest.get("error") or {}
    meta = [{"item": "outcome", "value": _outcome(manifest)},
            {"item": "runbook", "value": f"{manifest['runbook']} (sha256 {str(manifest.get('runbook_sha256', ''))[:12]})"},
            {"item": "profile", "value": manifest["profile"]},
            {"item": "started", "value": manifest["started_at"]},
            {"item": "ended", "value": manifest["ended_at"]},
            {"item": "duration", "value": report.duration(manifest.get("duration_s"))},
            {"item": "bridgekit", "value": manifest["bridgekit_version"]}]
    if err and err.get("type") != "CheckFailed":
        meta.append({"item": "error", "value": str(err.get("message", ""))})
    parts = [report.table(meta, labels={"item": "", "value": ""}, formats={"value": "text"})]
    if manifest.get("parameters"):
        parts += [report.heading("Parameters", 3), report.table(
            [{"parameter": k, "value": v} for k, v in manifest["parameters"].items()])]
    if manifest.get("data_watermark"):
        parts += [report.heading("Data watermark", 3), report.table(
            [{"table": t, "sync_run": w.get("sync_run_id"), "delta_position": w.get("position"), "rows": w.get("rows")}
             for t, w in manifest["data_watermark"].items()], formats={"sync_run": "text", "delta_position": "text"})]
    if not document and manifest.get("checks"):
        parts += [report.heading("Checks", 3), report.table(
            [{"status": c["status"], "check": c["name"], "detail": c.get("detail", "")} for c in manifest["checks"]],
            formats={"check": "text", "detail": "text"})]
    if not document and manifest.get("results"):
        parts += [report.heading("Results", 3), report.table(
            [{"result": k, "value": v} for k, v in manifest["results"].items()])]
    title = "Appendix: run record" if document else "Run record"
    return str(report.section(title, *parts, anchor="run-record"))


def _failure_banner(manifest: Mapping[str, Any]) -> str:
    from bridgekit import report

    err = manifest.get("error") or {}
    return str(report.join(
        '<div style="border:2px solid #c62828;background:#fde8e8;padding:8px 12px;margin:8px 0">',
        f"<b>This run {html.escape(_outcome(manifest))}.</b> ",
        html.escape(str(err.get("message", ""))), "</div>"))


def _html_cell(text: str) -> Any:
    import nbformat

    return nbformat.v4.new_code_cell(source="", outputs=[  # type: ignore[no-untyped-call]
        nbformat.v4.new_output("display_data", data={"text/html": text})])  # type: ignore[no-untyped-call]


def _is_document(nb: Any) -> bool:
    """A notebook whose metadata says ``"bridgekit": {"document": true}``: a deliverable (printed to PDF too)."""
    return bool((nb.get("metadata", {}).get("bridgekit") or {}).get("document"))


def _wants_pdf(nb: Any) -> bool:
    """A document is printed to PDF unless its metadata says ``"pdf": false`` (the analytics notebooks: read on
    screen, and printing costs a browser start per run)."""
    return _is_document(nb) and (nb.get("metadata", {}).get("bridgekit") or {}).get("pdf", True) is not False


def _write_report(nb_path: Path, html_path: Path, manifest: Mapping[str, Any]) -> None:
    """The executed notebook as HTML: code inputs hidden, the runbook's own notes (``report-hide`` cells)
    dropped, a banner on top when the run did not complete, the run record last; renderable offline."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(nb_path), as_version=4)  # type: ignore[no-untyped-call]
    document = _is_document(nb)
    nb.cells = [c for c in nb.cells if REPORT_HIDE_TAG not in (c.get("metadata", {}).get("tags") or [])]
    if int(manifest["exit_code"]) not in (0, int(ExitCode.CHECK_FAILED)) or \
            (manifest.get("error") or {}).get("type") not in (None, "CheckFailed"):
        nb.cells.insert(0, _html_cell(_failure_banner(manifest)))
    nb.cells.append(_html_cell(_run_record_html(manifest, document=document)))
    exporter = HTMLExporter(  # type: ignore[no-untyped-call]
        template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True,
                            extra_loaders=[DictLoader({"bridgekit_report.html.j2": _REPORT_TEMPLATE})],
                            template_file="bridgekit_report.html.j2")
    title = str(manifest.get("title") or manifest["runbook"])
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    html_path.write_text(_REMOTE_SCRIPT.sub("", body), encoding="utf-8")


#: Where the report's PDF printer is looked for (the first that exists), unless ``$BRIDGEKIT_CHROMIUM`` names one.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    import shutil

    named = os.environ.get("BRIDGEKIT_CHROMIUM")
    if named:
        return named if Path(named).is_file() else shutil.which(named)
    return next((found for n in CHROMIUM_NAMES if (found := shutil.which(n))), None)


def _write_pdf(html_path: Path, pdf_path: Path, *, timeout: float = 180.0) -> str | None:
    """Print the HTML report to PDF with headless Chromium (A4, a section per page, page numbers from the
    report's ``@page`` rules). Returns None when written, else a one-line note saying why not."""
    import shutil
    import subprocess

    exe = _chromium()
    if exe is None:
        return "no PDF: Chromium is not installed (apt-get install chromium, or set BRIDGEKIT_CHROMIUM)"
    profile_dir = tempfile.mkdtemp(prefix="bk-pdf-")
    args = [exe, "--headless=new", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-pdf-header-footer",
            "--run-all-compositor-stages-before-draw", "--virtual-time-budget=20000",
            f"--user-data-dir={profile_dir}", f"--print-to-pdf={pdf_path}", html_path.resolve().as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root (containers, CI)
    try:
        proc = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no PDF: Chromium did not print the report ({type(exc).__name__})"
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    if proc.returncode != 0 or not pdf_path.is_file() or pdf_path.stat().st_size == 0:
        pdf_path.unlink(missing_ok=True)
        return f"no PDF: Chromium exited with status {proc.returncode}"
    return None


@functools.cache
def _plotly_bundle() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:  # pragma: no cover - plotly is a dependency
        return ""
    return str(get_plotlyjs())


def _texts_of(path: Path) -> str:
    """A file's text in the forms a secret could be read in: JSON decoded (``\\u0022``), HTML unescaped
    (``&quot;``) and as written. The embedded plotly.js bundle is cut out first: it is the installed
    package's own file, byte for byte, and scanning its 5 MB per output would triple the run's overhead."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".ipynb", ".json"):
        try:
            parts = list(_strings(json.loads(raw)))
        except json.JSONDecodeError:
            parts = [raw]
    else:
        parts = [raw, html.unescape(raw)] if "&" in raw else [raw]
    bundle = _plotly_bundle()
    text = "\n".join(parts)
    return text.replace(bundle, "") if bundle and bundle in text else text


def _scan(paths: Iterable[Path], literals: list[str]) -> list[dict[str, Any]]:
    findings = []
    for p in paths:
        if p.is_file():
            kinds = find_secrets(_texts_of(p), literals=literals)
            if kinds:
                findings.append({"file": p.name, "kinds": kinds})
    return findings


def _clean(value: Any, literals: list[str]) -> bool:
    return not find_secrets(json.dumps(value, ensure_ascii=False), literals=literals)


def _quarantine(manifest: dict[str, Any], findings: list[dict[str, Any]], nb_path: Path, html_path: Path,
                literals: list[str]) -> None:
    """Replace the notebook and report with a notice and strip the manifest of anything secret-bearing."""
    where = "; ".join(f"{f['file']} ({', '.join(f['kinds'])})" for f in findings)
    notice = (f"This run's outputs were quarantined: a secret or token-shaped string was found in {where}. "
              "The executed notebook and report were replaced by this notice so the value is not left on disk. "
              "Find the cell that prints or displays a credential, fix the runbook, and run it again.")
    _write_nb(nb_path, {"cells": [{"cell_type": "markdown", "id": "bk-quarantined", "metadata": {},
                                   "source": f"# Quarantined\n\n{notice}"}],
                        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                    "language": "python"}},
                        "nbformat": 4, "nbformat_minor": 5})
    html_path.write_text("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Quarantined</title></head>"
                         f"<body><h1>Quarantined</h1><p>{html.escape(notice)}</p></body></html>\n",
                         encoding="utf-8")
    cause = manifest.get("error")
    manifest["status"] = "quarantined"
    manifest["exit_code"] = int(ExitCode.SECRET_LEAK)
    manifest["error"] = {"type": "SecretLeak", "message": f"a secret or token-shaped string was found in {where}",
                         "hint": "find the cell that prints or displays a credential and remove it",
                         "cell_index": None}
    if cause:
        # Keep where it failed, never what it said: the message itself may carry the secret.
        manifest["error"]["cause"] = {"type": cause.get("type"), "cell_index": cause.get("cell_index")}
    manifest["quarantine"] = {"findings": findings}
    manifest["results"] = {k: v for k, v in manifest.get("results", {}).items() if _clean([k, v], literals)}
    manifest["checks"] = [c for c in manifest.get("checks", []) if _clean(c, literals)]
    manifest["data_watermark"] = {k: v for k, v in manifest.get("data_watermark", {}).items()
                                  if _clean([k, v], literals)}


def _scrub_partial(paths: list[Path], literals: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            if _scan([p], literals):
                p.write_text("Quarantined: this interrupted run's output held a secret-shaped string.\n",
                             encoding="utf-8")


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def run_runbook(name: str, parameters: Mapping[str, Any] | None = None, *, profile: str | None = None,
                out: str | os.PathLike[str] | None = None, timeout: float | None = None,
                path: str | Path | None = None,
                secrets: Iterable[str] = (), raise_on_failure: bool = True) -> RunResult:
    """Run a runbook headless and write ``<out>/<UTC timestamp>-<name>/`` with notebook, report and manifest.

    Args:
        name: The runbook name (``sync`` for ``runbooks/sync.ipynb``) or a path to a notebook.
        parameters: Values for the runbook's declared parameters (checked before the kernel starts).
        profile: The profile name; it is passed to the kernel as ``$BRIDGEKIT_PROFILE`` and as the
            ``profile`` parameter when the runbook declares one.
        out: Where run directories go (default ``./runs``).
        timeout: A deadline in seconds for the whole run (kernel death and timeout both exit 7).
        path: Where runbooks are (default ``./runbooks``).
        secrets: More secret values that must never appear in an output (besides the profile's).
        raise_on_failure: Raise :class:`~bridgekit.errors.RunbookFailed` when the exit code is not 0
            (after writing every output); with False the result carries the exit code instead.

    Returns:
        The :class:`RunResult` (``exit_code`` 0 unless ``raise_on_failure`` is False).

    Raises:
        RunbookError: unknown runbook, unknown/mistyped/secret parameter (exit 2; nothing was run).
        ConfigError: the profile does not exist or is invalid (exit 2; nothing was run).
        RunbookFailed: the run did not succeed; ``.exit_code`` is the documented code, ``.run_dir`` the outputs.

    Example:
        >>> result = bridgekit.run_runbook("sync", {"full": True}, profile="emulator")  # doctest: +SKIP
        >>> result.manifest["data_watermark"]                                          # doctest: +SKIP
    """
    from bridgekit import __version__
    from bridgekit.config import load_profile

    runbook = find_runbook(name, path)
    values = dict(parameters or {})
    profile_name, profile_origin = _choose_profile(runbook, values, profile)
    prof = load_profile(profile_name)
    literals = _secret_values(prof, secrets)
    checked = check_parameters(runbook, values, secrets=literals)
    if runbook.parameter("profile") is not None:
        checked["profile"] = profile_name
    effective = {p.name: checked.get(p.name, p.default) for p in runbook.parameters}

    started = _utcnow()
    out_dir = Path(out) if out is not None else Path(DEFAULT_OUT)
    _recover_leftovers(out_dir, literals)
    run_dir = _make_run_dir(out_dir, runbook.name, started)
    nb_path = run_dir / f"{runbook.name}.ipynb"
    html_path = run_dir / f"{runbook.name}.html"
    manifest_path = run_dir / "manifest.json"
    kernel_log = run_dir / "kernel.log"
    record_file = run_dir / ".records.jsonl"
    record_file.touch(mode=0o600)
    env = {RECORD_ENV: str(record_file), "BRIDGEKIT_PROFILE": profile_name, "BRIDGEKIT_RUNBOOK": runbook.name,
           RUN_DIR_ENV: str(run_dir),
           "PLOTLY_RENDERER": PLOTLY_RENDERER,
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    log.info("runbook %s: running into %s (profile %s)", runbook.name, run_dir, profile_name)
    try:
        outcome = _execute(runbook, nb_path, checked, env, timeout, kernel_log)
        records = read_records(record_file)
    except BaseException:
        # Interrupted (Ctrl-C, or SIGTERM from a scheduler via the CLI): no manifest, but no unscanned
        # partial output either; what was scanned is published for the user to see.
        record_file.unlink(missing_ok=True)
        _scrub_partial([nb_path, kernel_log], literals)
        with contextlib.suppress(OSError):
            _publish(run_dir)
        raise
    finally:
        record_file.unlink(missing_ok=True)
    ended = _utcnow()

    results, checks, watermark = _collect(records)
    red = [c for c in checks if c["status"] == "red"]
    exit_code, error = outcome.exit_code, outcome.error
    if exit_code == 0 and red:
        exit_code = int(ExitCode.CHECK_FAILED)
        error = {"type": "CheckFailed", "cell_index": None,
                 "message": "; ".join(f"check '{c['name']}' is red" + (f": {c['detail']}" if c["detail"] else "")
                                      for c in red)}
    manifest: dict[str, Any] = {
        "runbook": runbook.name,
        "title": runbook.title,
        "runbook_path": str(runbook.path),
        "runbook_sha256": hashlib.sha256(runbook.path.read_bytes()).hexdigest(),  # the code that ran
        "parameters": effective,
        "parameters_given": checked,
        "profile": profile_name,
        "profile_origin": profile_origin,
        "bridgekit_version": __version__,
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "duration_s": round((ended - started).total_seconds(), 3),
        "status": "succeeded" if exit_code == 0 else "failed",
        "exit_code": exit_code,
        "error": error,
        "data_watermark": watermark,
        "results": results,
        "checks": checks,
        "outputs": {"notebook": nb_path.name, "report": html_path.name, "manifest": manifest_path.name},
    }
    if kernel_log.is_file() and kernel_log.stat().st_size == 0:
        kernel_log.unlink()
    if kernel_log.is_file():
        manifest["outputs"]["kernel_log"] = kernel_log.name
    try:
        _write_report(nb_path, html_path, manifest)
    except Exception as exc:  # a report that cannot render must not hide the run's own outcome
        log.warning("runbook %s: the HTML report could not be rendered: %s", runbook.name, exc)
        manifest["outputs"]["report"] = None
        manifest["report_error"] = redact(f"{type(exc).__name__}: {exc}")[:500]
    _write_manifest(manifest_path, manifest)

    # Files a runbook wrote beside its report (evidence CSV, JSON) are scanned too; a workbook holds the
    # same rows as its CSV twin.
    extra = sorted(p for p in run_dir.iterdir() if p.suffix in (".csv", ".json", ".txt") and p != manifest_path)
    findings = _scan([nb_path, html_path, manifest_path, kernel_log, *extra], literals)
    if findings:
        _quarantine(manifest, findings, nb_path, html_path, literals)
        for p in extra:
            if _scan([p], literals):
                p.write_text("Quarantined: see manifest.json.\n", encoding="utf-8")
        for p in run_dir.glob("*.xlsx"):
            p.unlink()  # built from the same rows as a CSV that held a secret: not kept
        if kernel_log.is_file():
            kernel_log.write_text("Quarantined: see manifest.json.\n", encoding="utf-8")
        if not _clean(manifest, literals):  # pragma: no cover - belt and braces: nothing recorded survives
            manifest["results"], manifest["checks"], manifest["data_watermark"] = {}, [], {}
        manifest["outputs"]["report"] = html_path.name
        _write_manifest(manifest_path, manifest)
    elif manifest["outputs"].get("report") and _wants_pdf(_read_nb(nb_path) or {}):
        # A deliverable is also printed to PDF, from the report that was just scanned.
        pdf_path = run_dir / f"{runbook.name}.pdf"
        note = _write_pdf(html_path, pdf_path)
        manifest["outputs"]["pdf"] = None if note else pdf_path.name
        if note:
            manifest["pdf_note"] = note
            log.warning("runbook %s: %s", runbook.name, note)
        _write_manifest(manifest_path, manifest)

    run_dir = _publish(run_dir)
    nb_path, html_path, manifest_path = (run_dir / p.name for p in (nb_path, html_path, manifest_path))
    result = RunResult(runbook.name, run_dir, int(manifest["exit_code"]), str(manifest["status"]), nb_path,
                       html_path if html_path.is_file() else None, manifest_path, manifest)
    log.info("runbook %s: %s (exit %d) in %s", runbook.name, result.status, result.exit_code, run_dir)
    if raise_on_failure and result.exit_code != 0:
        err = result.error or {}
        msg = str(err.get("message") or _meaning(result.exit_code) or "failed")
        failure = RunbookFailed(f"runbook '{runbook.name}' {result.status} (exit {result.exit_code}): {msg}",
                                exit_code=result.exit_code, runbook=runbook.name, run_dir=str(run_dir),
                                hint=str(err.get("hint") or f"see {manifest_path}"))
        failure.result = result  # type: ignore[attr-defined]
        raise failure
    return result
