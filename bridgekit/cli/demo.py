"""The ``bridgekit demo`` command: start the local emulator, run ``sync`` then ``assess`` headless, summarise the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bridgekit.errors import ExitCode

__all__ = ["COMMANDS", "demo", "ground_truth", "summary_lines"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_ICON = {"green": "ok   ", "amber": "AMBER", "red": "RED  "}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def ground_truth(assess: Any, truth: dict[str, Any] | None) -> dict[str, Any]:
    """The emulator's planted defects against what the assessment found, per defect (empty when unknown).

    The answer key stays out of the customer's report: it is printed in the terminal and written to
    ``ground_truth.json`` in the assess run's directory.
    """
    import json

    from bridgekit.assess import checks_from_run, compare_with_planted

    planted = (truth or {}).get("planted_defects")
    if not planted or not (assess.run_dir / "manifest.json").is_file():
        return {}
    table = compare_with_planted(checks_from_run(assess.run_dir), planted)
    out = {r["defect"]: {k: r[k] for k in ("check", "planted", "found", "matched", "missed", "extra")}
           for r in table.to_dict("records")}
    (assess.run_dir / "ground_truth.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def summary_lines(sync: Any, assess: Any, truth: dict[str, Any] | None = None) -> list[str]:
    """The one-screen summary of a demo: the two runs, the red and amber checks, the planted defects found."""
    sm, am = sync.manifest, assess.manifest
    res = sm.get("results", {})
    # Two durations, each named: the sync itself (as its report shows) and the runbook around it (kernel start,
    # report rendering).
    lines = [f"sync:    exit {sync.exit_code}  {res.get('tables', '?')} tables, {res.get('changed', 0):,} row changes, "
             f"{res.get('fetched', 0):,} rows fetched; sync {res.get('duration_s', 0):.1f} s "
             f"(runbook {sm.get('duration_s', 0):.1f} s with kernel start and report)"]
    if res.get("failed_tables"):
        lines.append(f"         FAILED: {', '.join(res['failed_tables'])} (see the sync report)")
    checks = am.get("checks", [])
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in ("red", "amber", "green")}
    meaning = ("no red check" if assess.exit_code == 0 else
               "red checks found: expected here, the demo tenant has planted defects" if assess.exit_code == 6 else
               "the assessment did not complete")
    lines.append(f"assess:  exit {assess.exit_code}  {counts['red']} red, {counts['amber']} amber, "
                 f"{counts['green']} green ({meaning})")
    lines.append("")
    for status in ("red", "amber"):
        for c in checks:
            if c["status"] == status:
                lines.append(_clip(f"  {_ICON[status]} {c['name']:<38} {c.get('detail', '')}", 118))
    if counts["green"]:
        lines.append(f"  ok    ... and {counts['green']} green checks (connectivity, TLS, change tracking, infrastructure)")
    planted = ground_truth(assess, truth)
    if planted:
        lines += ["", f"planted defects (emulator ground truth, also in {assess.run_dir.name}/ground_truth.json) "
                  "found by the assessment:",
                  f"  {'defect':<32} {'planted':>7} {'found':>6} {'matched':>8}"]
        for name, row in planted.items():
            lines.append(f"  {name:<32} {row.get('planted', 0):>7} {row.get('found', 0):>6} {row.get('matched', 0):>8}")
    return lines


@click.command("demo", context_settings=_CONTEXT)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="Directory for the run outputs (notebook, HTML report, manifest per run).")
@click.option("--scale", type=click.Choice(["tiny", "small", "medium", "large"]), default="small", show_default=True,
              help="Size of the synthetic company when the emulator starts for the first time.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=1800.0, show_default=True,
              metavar="SECONDS", help="Deadline for each of the two runs.")
@click.pass_context
def demo(ctx: click.Context, out: Path, scale: str, timeout: float) -> None:
    """Start the local tenant emulator, sync it, assess it, and print the report path and a summary.

    Runs the `sync` and `assess` runbooks headless through the runner with the built-in `emulator` profile
    (no account, no network). The assessment exits 6 on the demo tenant because the emulator plants data
    defects on purpose; the demo itself succeeds when both runbooks ran. When some tables fail to sync, the
    assessment still runs on the others and the demo exits with the sync's code.
    """
    from bridgekit.emulator import process
    from bridgekit.runbooks.runner import run_runbook

    running = process.status()
    if running is None:
        click.echo("==> starting the local tenant emulator (first start generates the synthetic company)")
        info = process.start(scale=scale)
        click.echo(f"    emulator at {info.base_url} (data in {info.home})")
    else:
        info = running
        click.echo(f"==> the local tenant emulator is already running at {info.base_url} (data in {info.home})")
    where = None  # ./runbooks when there is one, else the runbooks shipped with bridgekit
    click.echo("==> running the sync runbook (first run loads everything; later runs apply changes)")
    sync = run_runbook("sync", profile="emulator", out=out, path=where, timeout=timeout, raise_on_failure=False)
    click.echo(f"    {sync.status} (exit {sync.exit_code}): {sync.run_dir}")
    failed_tables = sync.manifest.get("results", {}).get("failed_tables") or []
    if sync.exit_code != ExitCode.OK:
        err = sync.error or {}
        click.echo(f"{'warning' if failed_tables else 'error'}: the sync did not succeed: {err.get('message', '')}",
                   err=True)
        click.echo(f"hint: see {sync.manifest_path} and {sync.report}", err=True)
        if not (sync.exit_code == ExitCode.CHECK_FAILED and failed_tables):
            ctx.exit(sync.exit_code)
        # Some tables failed but the rest were mirrored: assess what is there, and exit with the sync's code.
    click.echo("==> running the assess runbook (integration readiness assessment)")
    assess = run_runbook("assess", profile="emulator", out=out, path=where, timeout=timeout,
                         raise_on_failure=False)
    click.echo(f"    {assess.status} (exit {assess.exit_code}): {assess.run_dir}")
    click.echo("")
    try:
        truth = process.admin(info, "truth")
    except Exception:  # the answer key is a bonus of the demo: without it the summary just omits it
        truth = None
    for line in summary_lines(sync, assess, truth):
        click.echo(line)
    click.echo("")
    click.echo(f"sync report:    {sync.report}")
    click.echo(f"assess report:  {assess.report}")
    click.echo(f"open it with:   xdg-open {assess.report}   (or any browser; it works offline)")
    if assess.exit_code not in (ExitCode.OK, ExitCode.CHECK_FAILED):
        err = assess.error or {}
        click.echo(f"error: the assessment did not complete: {err.get('message', '')}", err=True)
        ctx.exit(assess.exit_code)
    if failed_tables:
        click.echo(f"error: the sync failed for {', '.join(failed_tables)}: the assessment ran without them",
                   err=True)
        ctx.exit(sync.exit_code)


COMMANDS: list[click.Command] = [demo]
