"""The ``bridgekit runbooks`` and ``bridgekit run`` commands: thin translators over bridgekit.runbooks."""

from __future__ import annotations

import inspect
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import click

from bridgekit.errors import EXIT_CODES, ExitCode, RunbookError

__all__ = ["COMMANDS", "run", "runbooks"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.command("runbooks", context_settings=_CONTEXT)
@click.option("--path", "path", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Where runbooks are (a directory or one .ipynb; default ./runbooks when there is one, "
                   "then the runbooks and notebooks shipped with bridgekit).")
@click.option("--json", "as_json", is_flag=True, help="Print the runbooks and their parameters as JSON.")
@click.option("--copy-to", "copy_to", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Copy the shipped runbooks and notebooks into DIR to customise them (existing files are kept); "
                   "a copy in ./runbooks runs instead of the shipped one.")
def runbooks(path: Path | None, as_json: bool, copy_to: Path | None) -> None:
    """List runbooks with their parameters (type, default, help) from each tagged `parameters` cell."""
    from bridgekit.runbooks.runner import discover

    if copy_to is not None:
        _copy_out(copy_to)
        return
    found = discover(path)
    if as_json:
        click.echo(json.dumps([rb.to_dict() for rb in found], indent=2, default=str))
        return
    if not found:
        click.echo(f"no runbooks in {path}")
        return
    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    folder = None
    for rb in found:
        if rb.path.parent != folder:
            folder = rb.path.parent
            click.echo(f"{_where(folder)}:")
        click.echo(f"  {rb.name}")
        about = " - ".join(t for t in (rb.title, rb.description) if t)
        for line in textwrap.wrap(about, width=width - 4, max_lines=3, placeholder=" ..."):
            click.echo(f"    {line}")
        for line in _parameter_lines(rb, width):
            click.echo(f"    {line}")
        for problem in rb.problems:
            click.echo(f"    ! {problem}")


# A declaration wider than this puts its help comment on the next line instead of pushing every comment right.
_DECL_WIDTH = 36


def _parameter_lines(rb: Any, width: int) -> list[str]:
    """``decl  # help`` per parameter, the comments in one column and wrapped to ``width`` (less the indent)."""
    if not rb.parameters:
        return ["(no parameters)"]
    decls = [p.describe().split("  # ")[0] for p in rb.parameters]
    column = max((len(d) for d in decls if len(d) <= _DECL_WIDTH), default=0)
    room = max(width - 4 - column - 4, 30)
    lines = []
    for p, decl in zip(rb.parameters, decls, strict=True):
        if not p.help:
            lines.append(decl)
            continue
        if len(decl) > column:
            lines.append(decl)
            decl = ""
        for i, part in enumerate(textwrap.wrap(p.help, room)):
            lines.append(f"{decl if i == 0 else '':<{column}}  {'#' if i == 0 else ' '} {part}")
    return lines


def _where(folder: Path) -> str:
    """A folder as the user would name it: relative to here when below it; the shipped ones say so."""
    from bridgekit.runbooks.shipped import shipped_dirs

    shipped = any(folder.resolve() == d.resolve() for d in shipped_dirs())
    try:
        shown = str(folder.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        shown = str(folder)
    return f"{shown} (shipped with bridgekit)" if shipped else shown


def _copy_out(dest: Path) -> None:
    from bridgekit.runbooks.shipped import copy_shipped

    done = copy_shipped(dest)
    click.echo(f"copied {len(done.written)} runbooks and notebooks to {dest}"
               + (f"; kept {len(done.kept)} already there ({', '.join(p.name for p in done.kept)})"
                  if done.kept else ""))
    click.echo(f"run one with: bridgekit run assess --path {dest}"
               + ("" if dest == Path("runbooks") else "  (a copy in ./runbooks runs without --path)"))


def _load_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RunbookError(f"cannot read parameters file {path}: {exc}",
                           hint="write one `name: value` per line (YAML or JSON)") from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise RunbookError(f"parameters file {path} must hold a mapping of names to values",
                           hint="write one `name: value` per line (YAML or JSON)")
    return data


@click.command("run", context_settings=_CONTEXT)
@click.argument("name")
@click.option("-p", "--parameter", "params", nargs=2, multiple=True, metavar="NAME VALUE",
              help="Set a parameter (repeatable); VALUE is parsed as the declared type (lists/dicts as JSON).")
@click.option("-f", "--parameters-file", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Parameters from a YAML/JSON file; -p values override it.")
@click.option("--profile", "profile", metavar="NAME", default=None,
              help="Profile the runbook uses (default: bridgekit --profile, $BRIDGEKIT_PROFILE, bridgekit.toml, "
                   "then the runbook's own default).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Directory for run outputs; each run writes <out>/<UTC time>-<name>/.")
@click.option("--timeout", "timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Deadline for the whole run; past it the run stops with exit code 7.")
@click.option("--path", "path", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Where runbooks are (default ./runbooks when there is one, then the shipped ones).")
@click.option("--json", "as_json", is_flag=True, help="Print the run's manifest as JSON instead of a summary.")
@click.pass_context
def run(ctx: click.Context, name: str, params: tuple[tuple[str, str], ...], params_file: Path | None,
        profile: str | None, out: Path, timeout: float | None, path: Path | None, as_json: bool) -> None:
    """Run runbook NAME headless: executed notebook, HTML report and manifest.json under --out.

    The exit code says what happened (the table below, also in the README and each manifest).
    """
    from bridgekit.runbooks.runner import coerce_text_parameters, find_runbook, run_runbook

    rb = find_runbook(name, path)
    values: dict[str, Any] = _load_file(params_file) if params_file else {}
    values.update(coerce_text_parameters(rb, dict(params)))
    chosen = profile or (ctx.obj or {}).get("profile")
    result = run_runbook(str(rb.path), values, profile=chosen, out=out, timeout=timeout,
                         raise_on_failure=False)
    m = result.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2, default=str))
    else:
        click.echo(f"runbook:  {result.runbook}")
        click.echo(f"status:   {result.status} (exit {result.exit_code})")
        click.echo(f"profile:  {m.get('profile')}")
        click.echo(f"run dir:  {result.run_dir}")
        if result.report is not None:
            click.echo(f"report:   {result.report}")
        for c in m.get("checks", []):
            click.echo(f"check:    {c['status']:<5} {c['name']}" + (f"  {c['detail']}" if c.get("detail") else ""))
        for table, w in m.get("data_watermark", {}).items():
            click.echo(f"data:     {table} sync {w.get('sync_run_id')} position {w.get('position')} "
                       f"rows {w.get('rows')}")
    err = result.error
    if err:
        click.echo(f"error: {err.get('message', '')}", err=True)
        if err.get("hint"):
            click.echo(f"hint: {err['hint']}", err=True)
    if result.exit_code != ExitCode.OK:
        ctx.exit(result.exit_code)


def exit_code_help() -> str:
    """The exit-code table as help text (from :data:`bridgekit.errors.EXIT_CODES`, the one source)."""
    return "\b\nExit codes:\n" + "\n".join(f"  {int(code):>3}  {meaning}" for code, meaning in EXIT_CODES.items())


run.help = f"{inspect.cleandoc(run.help or '')}\n\n{exit_code_help()}"

COMMANDS: list[click.Command] = [runbooks, run]
