"""Helpers for the runbook end-to-end tests: output scanning and rendering HTML reports in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridgekit.runbooks.secrets import find_secrets

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = ROOT / "runbooks"
CHROMIUM = Path("/usr/bin/chromium")


def manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest.json."""
    return json.loads((run_dir / "manifest.json").read_text())


def leaks(root: Path, secrets: list[str]) -> list[str]:
    """``file: kinds`` for every file under ``root`` holding a secret value or a token-shaped string."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            found = find_secrets(p.read_text(errors="replace"), literals=secrets)
            if found:
                out.append(f"{p.name}: {', '.join(found)}")
    return out


def profile_toml(name: str, values: dict[str, str]) -> str:
    """A ``[profiles.NAME]`` table (string values only)."""
    lines = [f"[profiles.{name}]"] + [f'{k} = "{v}"' for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class RenderedPage:
    """What headless Chromium saw on a page: plotly chart divs, how many drew, their titles, and errors."""

    charts: int = 0
    rendered: int = 0
    titles: list[str | None] = field(default_factory=list)
    axis_titles: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    text: str = ""
    tables: int = 0
    tables_before_summary: int | None = None  # None: the page has no executive summary (#summary)


_PROBE = """(() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return JSON.stringify({
    charts: divs.length,
    rendered: divs.filter(d => d.querySelector('.plotly .main-svg')).length,
    titles: divs.map(d => { const t = d.querySelector('.gtitle'); return t ? t.textContent : null; }),
    axis_titles: divs.map(d => d.querySelectorAll('.xtitle, .ytitle').length),
    text: document.body.innerText,
    tables: document.querySelectorAll('table').length,
    tables_before_summary: (() => {
      const s = document.getElementById('summary');
      if (!s) return null;
      return [...document.querySelectorAll('table')].filter(
        t => s.compareDocumentPosition(t) & Node.DOCUMENT_POSITION_PRECEDING).length;
    })(),
  });
})()"""


def render(html: Path, *, timeout: float = 60.0, screenshot: Path | None = None) -> RenderedPage:
    """Open ``html`` in headless Chromium over the DevTools protocol; wait until every chart has drawn.

    With ``screenshot``, the first screen (1280 x 1600) is saved there as a PNG.

    Errors are uncaught exceptions, ``console.error`` calls and browser log entries at level error (a failed
    resource load, a blocked script).
    """
    import websocket

    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: run `make browser` (as root) or `apt-get install -y chromium`")
    profile_dir = tempfile.mkdtemp(prefix="bk-chromium-")
    args = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile_dir}", "--remote-debugging-port=0", "about:blank"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        port_file = Path(profile_dir) / "DevToolsActivePort"
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout, suppress_origin=True)
        events: list[dict[str, Any]] = []
        counter = iter(range(1, 1_000_000))

        def send(method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
            ident = next(counter)
            msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            ws.send(json.dumps(msg))
            while True:
                reply = json.loads(ws.recv())
                if reply.get("id") == ident:
                    assert "error" not in reply, reply
                    return reply.get("result", {})
                events.append(reply)

        target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            send(method, session=session)
        send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1600, "deviceScaleFactor": 1,
                                                    "mobile": False}, session=session)
        send("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            if time.monotonic() > deadline:
                raise AssertionError(f"{html.name} did not finish loading")
            events.append(json.loads(ws.recv()))
        while True:
            seen = json.loads(send("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True},
                                   session=session)["result"]["value"])
            if seen["rendered"] == seen["charts"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if screenshot is not None:
            shot = send("Page.captureScreenshot", {"format": "png"}, session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        ws.close()
        errors = []
        for e in events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(f"log: {params['entry'].get('text')}")
        return RenderedPage(seen["charts"], seen["rendered"], seen["titles"], seen["axis_titles"], errors,
                            seen["text"], seen["tables"], seen["tables_before_summary"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile_dir, ignore_errors=True)


def assert_readable_report(html: Path, screenshot: Path, *, no_axes: int = 0) -> RenderedPage:
    """Open a report in headless Chromium as its reader would and assert what #18 asks of every report.

    The first screen is saved to ``screenshot`` (keep it in the test's ``tmp_path``: pytest's artefacts). The
    executive summary (``#summary``) precedes every table; no text reads ``NaN``, ``nan``, ``None`` or a raw float;
    every chart draws with a title, and with x and y axis titles unless it is one of ``no_axes`` charts without
    axes (a Sankey); the page logs no error.
    """
    page = render(html, screenshot=screenshot)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    assert page.errors == []
    assert not re.findall(r"\b(?:NaN|nan|None)\b", page.text)
    assert not re.findall(r"\d+\.\d{5,}", page.text)
    assert page.tables_before_summary == 0, "no executive summary (#summary) ahead of the tables"
    assert page.rendered == page.charts
    assert all(page.titles), page.titles
    assert sorted(page.axis_titles) == [0] * no_axes + [2] * (page.charts - no_axes), page.axis_titles
    return page
