"""Azurite (Microsoft's Azure Storage emulator, from npm) for the lake tests: started on loopback, stopped after.

``make test`` installs the pinned version with npm into a cache outside the checkout when it is missing
(``make azurite``); :func:`binary` finds it there, or where ``BRIDGEKIT_AZURITE`` points. A missing Azurite
fails the tests that need it with the command that installs it: they never skip.

Azurite 3.37.0 is pinned because 3.35.0 ignores List Blobs' ``startFrom`` parameter, which the Delta log
reader relies on: deltalake then failed every commit after the second with "Invalid table version: 1".
3.37.0 honours it (``test_azurite_lists_blobs_from_a_start_key`` in tests/test_lake.py checks it).

The account is Azurite's built-in development account (``devstoreaccount1``) with its documented, public
development key; the tests hand it to bridgekit through an environment variable as a real key would be.
The Blob REST calls made here (create a container, list blobs) are signed with Shared Key, per
https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import pytest

VERSION = "3.37.0"  # keep in step with AZURITE_VERSION in the Makefile
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development account key, published in its README (not a secret: it opens only the
# emulator on this machine).
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_API_VERSION = "2021-08-06"


def install_dir() -> Path:
    """Where ``make azurite`` installs the pinned version (outside the checkout, shared by every clone)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bridgekit" / f"azurite-{VERSION}"


def binary() -> Path:
    """The ``azurite-blob`` executable; fails the test (never skips it) when Azurite is not installed."""
    named = os.environ.get("BRIDGEKIT_AZURITE")
    candidates = [Path(named)] if named else [install_dir() / "node_modules" / ".bin" / "azurite-blob"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail(f"Azurite {VERSION} is not installed (looked for {candidates[0]}): run `make azurite` "
                f"(npm install azurite@{VERSION}) or set BRIDGEKIT_AZURITE to an azurite-blob executable",
                pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Azurite:
    """One Azurite Blob service on 127.0.0.1, its data in ``location``; ``stop()`` ends it."""

    def __init__(self, location: Path) -> None:
        exe = binary()
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not on PATH: Azurite needs Node.js (apt-get install nodejs npm)", pytrace=False)
        self.port = _free_port()
        self.location = location
        location.mkdir(parents=True, exist_ok=True)
        self._log = (location / "azurite.log").open("w")
        self.proc = subprocess.Popen(
            [str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(location),
             "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                self._log.flush()
                pytest.fail(f"Azurite exited with {self.proc.returncode} at start: "
                            f"{(location / 'azurite.log').read_text()[-800:]}", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("Azurite did not listen within 60 s", pytrace=False)
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        """The Blob endpoint for bridgekit's lake ``endpoint`` (path-style: the account is the first segment)."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def stop(self) -> None:
        """End Azurite (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    # -- Blob REST, Shared Key signed ------------------------------------------------------------------------

    def _request(self, method: str, path: str, query: Mapping[str, str], body: bytes = b"",
                 headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        date = dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
        sent = {"x-ms-date": date, "x-ms-version": _API_VERSION, **(headers or {})}
        # query parameter names lower-cased and sorted in the canonicalized resource
        resource = f"/{ACCOUNT}/{ACCOUNT}/{path}" + "".join(
            f"\n{k}:{v}" for k, v in sorted((k.lower(), v) for k, v in query.items()))
        # VERB, 11 standard headers (only Content-Length is ever set here; empty when 0), x-ms-*, the resource
        standard = ["", "", str(len(body)) if body else "", "", "", "", "", "", "", "", ""]
        ms = sorted((k.lower(), v) for k, v in sent.items() if k.lower().startswith("x-ms-"))
        to_sign = "\n".join([method, *standard, *[f"{k}:{v}" for k, v in ms], resource])
        mac = hmac.new(base64.b64decode(DEV_KEY), to_sign.encode(), hashlib.sha256).digest()
        sent["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            url = f"/{ACCOUNT}/{urllib.parse.quote(path)}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
            conn.request(method, url, body=body or None, headers=sent)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def put_blob(self, container: str, name: str, data: bytes) -> tuple[int, bytes]:
        """Upload ``data`` as block blob ``container/name``; (status, body)."""
        return self._request("PUT", f"{container}/{name}", {}, data, {"x-ms-blob-type": "BlockBlob"})

    def create_container(self, name: str) -> None:
        """Create Blob container ``name`` (the lake URL's file system)."""
        status, body = self._request("PUT", name, {"restype": "container"})
        assert status == 201, (status, body[:300])

    def list_blobs(self, container: str, prefix: str = "", *, start_from: str | None = None,
                   max_results: int | None = None) -> list[str]:
        """Names of the blobs under ``prefix`` (every page, or one page of ``max_results``)."""
        names: list[str] = []
        marker = ""
        while True:
            query = {"restype": "container", "comp": "list", "prefix": prefix}
            if start_from is not None:
                query["startFrom"] = start_from
            if max_results is not None:
                query["maxresults"] = str(max_results)
            if marker:
                query["marker"] = marker
            status, body = self._request("GET", container, query)
            assert status == 200, (status, body[:300])
            root = ET.fromstring(body)
            names += [el.text or "" for el in root.iter("Name")]
            marker = root.findtext("NextMarker") or ""
            if not marker or max_results is not None:
                return names
