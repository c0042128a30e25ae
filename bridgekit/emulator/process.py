"""Running the emulator: start (detached, idempotent), stop, status, ensure_running, and the foreground serve.

The server listens on 127.0.0.1 only. Its state lives under one home directory (store, TLS files,
signing key, app credentials, admin key, log) so a restart keeps data and delta tokens valid;
``runtime.json`` there describes the running instance (the actual port when started with port 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import platformdirs

from bridgekit.errors import EmulatorError

__all__ = [
    "DEFAULT_PORT",
    "EmulatorInfo",
    "default_home",
    "default_port",
    "ensure_running",
    "serve",
    "start",
    "status",
    "stop",
]

log = logging.getLogger("bridgekit.emulator")

DEFAULT_PORT = 47443
HOME_ENV = "BRIDGEKIT_EMULATOR_HOME"
PORT_ENV = "BRIDGEKIT_EMULATOR_PORT"
_RUNTIME = "runtime.json"
_LOG = "emulator.log"


@dataclass(frozen=True)
class EmulatorInfo:
    """How to reach and authenticate to a running emulator (paths and ids only, never a secret).

    Attributes:
        base_url: ``https://127.0.0.1:<port>``.
        authority_host: The Entra authority host (same as ``base_url``); the authority is ``<host>/<tenant_id>``.
        tenant_id: The emulated tenant's GUID.
        client_id: The demo app; its credential is the certificate at ``certificate_path``.
        certificate_path: The demo app's public certificate (PEM).
        private_key_path: The demo app's private key (PEM, mode 0600).
        secret_client_id: The client-secret app (secret from ``$BRIDGEKIT_EMULATOR_CLIENT_SECRET`` at start),
            or None when that variable was not set.
        dataverse_url: Dataverse organisation URL (``<base>/org``; Web API under ``/api/data/v9.2``).
        graph_url: Graph root (``<base>/graph``; API under ``/v1.0``).
        ca_bundle: The emulator CA certificate to trust (``verify=ca_bundle``).
        admin_key_path: File holding the key for the ``/_emulator`` admin API.
        home: The emulator's data directory.
        pid: The server process id.
        port: The TCP port.
    """

    base_url: str
    authority_host: str
    tenant_id: str
    client_id: str
    certificate_path: str
    private_key_path: str
    secret_client_id: str | None
    dataverse_url: str
    graph_url: str
    ca_bundle: str
    admin_key_path: str
    home: str
    pid: int
    port: int

    @property
    def authority(self) -> str:
        """The MSAL authority URL: ``<authority_host>/<tenant_id>``."""
        return f"{self.authority_host}/{self.tenant_id}"

    @property
    def log_path(self) -> str:
        """The emulator's log file."""
        return str(Path(self.home) / _LOG)

    def admin_key(self) -> str:
        """The admin key (read from ``admin_key_path``)."""
        return Path(self.admin_key_path).read_text().strip()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmulatorInfo:
        """Build from ``runtime.json`` / ``/_emulator/info`` content (extra keys ignored)."""
        values: dict[str, Any] = {f.name: data.get(f.name) for f in fields(cls)}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def admin(info: EmulatorInfo, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the running emulator's admin API ``/_emulator/<path>`` (POST when ``body`` is given); the JSON answer."""
    ctx = ssl.create_default_context(cafile=info.ca_bundle)
    data = json.dumps(body).encode() if body is not None else None
    # The URL is always https://127.0.0.1:<port>/... built from runtime.json, never user input.
    req = urllib.request.Request(  # noqa: S310
        f"{info.base_url}/_emulator/{path}", data=data, method="POST" if data else "GET",
        headers={"X-Emulator-Admin-Key": info.admin_key(),
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3600, context=ctx) as resp:  # noqa: S310 - https only
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise EmulatorError(f"the emulator answered {exc.code} to /_emulator/{path}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise EmulatorError(f"could not reach the emulator at {info.base_url}: {exc}") from exc


def default_home() -> Path:
    """``$BRIDGEKIT_EMULATOR_HOME`` or ``<user data dir>/bridgekit/emulator``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_data_dir("bridgekit")) / "emulator"


def default_port() -> int:
    """``$BRIDGEKIT_EMULATOR_PORT`` or 47443."""
    env = os.environ.get(PORT_ENV)
    if env:
        try:
            return int(env)
        except ValueError as exc:
            raise EmulatorError(f"{PORT_ENV}={env!r} is not a port number",
                                hint=f"set {PORT_ENV} to an integer (0 picks a free port)") from exc
    return DEFAULT_PORT


def _home(home: str | os.PathLike[str] | None) -> Path:
    return Path(home).expanduser().resolve() if home is not None else default_home()


def _read_runtime(home: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((home / _RUNTIME).read_text())
        return data
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0); /proc tells them apart on Linux.
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError, IndexError):
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_emulator_pid(pid: int) -> bool:
    # Guard against pid reuse before signalling: on Linux the command line must name our module.
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        with contextlib.suppress(OSError):
            return b"bridgekit.emulator" in cmdline.read_bytes()
    return True


def _probe(info: dict[str, Any], home: Path, timeout: float = 3.0) -> dict[str, Any] | None:
    """GET /_emulator/info over HTTPS trusting only the emulator CA; the JSON, or None if no answer."""
    try:
        key = (home / "admin.key").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(home / "tls" / "ca.pem"))
        req = urllib.request.Request(f"https://127.0.0.1:{int(info['port'])}/_emulator/info",
                                     headers={"X-Emulator-Admin-Key": key})
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:  # noqa: S310 - https only
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, ValueError, KeyError, ssl.SSLError, urllib.error.URLError):
        return None


def status(home: str | os.PathLike[str] | None = None) -> EmulatorInfo | None:
    """The running emulator's info, or None when none is running (and answering) for ``home``."""
    h = _home(home)
    rt = _read_runtime(h)
    if not rt or not _pid_alive(int(rt.get("pid", 0))):
        return None
    answered = _probe(rt, h)
    if answered is None or int(answered.get("pid", -1)) != int(rt["pid"]):
        return None
    return EmulatorInfo.from_dict(rt)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(text)


def start(home: str | os.PathLike[str] | None = None, port: int | None = None, scale: str = "small",
          seed: int = 42, *, timeout: float = 600.0) -> EmulatorInfo:
    """Start the emulator in the background, or return the running one (idempotent).

    Args:
        home: Data directory (default: :func:`default_home`).
        port: TCP port on 127.0.0.1 (default: :func:`default_port`; 0 picks a free port).
        scale: Size of the synthetic company generated on first start (when the store is empty).
        seed: Seed for the synthetic data and the tenant's identities on first start.
        timeout: Seconds to wait for the server to answer (first start generates data).

    Raises:
        EmulatorError: the server exited or did not answer in time; the message names the log file.

    Example:
        >>> info = start(port=0)                      # doctest: +SKIP
        >>> info.dataverse_url                        # doctest: +SKIP
        'https://127.0.0.1:40123/org'
    """
    h = _home(home)
    h.mkdir(parents=True, exist_ok=True)
    # One starter at a time per home: a notebook and a CLI starting together must not both spawn a
    # server (or delete each other's runtime.json).
    with _start_lock(h):
        running = status(h)
        if running is not None:
            if port not in (None, 0, running.port):
                raise EmulatorError(f"the emulator for {h} is already running on port {running.port}, not {port}",
                                    hint="run `bridgekit emulator stop` first, or use the running port")
            return running
        return _spawn(h, port, scale, seed, timeout)


@contextlib.contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    with (home / "start.lock").open("a") as fh:
        if os.name == "posix":
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _spawn(h: Path, port: int | None, scale: str, seed: int, timeout: float) -> EmulatorInfo:
    port = default_port() if port is None else port
    logfile = h / _LOG
    (h / _RUNTIME).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bridgekit.emulator", "serve", "--home", str(h), "--port", str(port),
           "--scale", scale, "--seed", str(seed)]
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True  # survive the parent's terminal and Ctrl-C
    else:  # pragma: no cover - Windows
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
            subprocess, "DETACHED_PROCESS", 0)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                close_fds=True, **kwargs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise EmulatorError(
                f"the emulator exited with code {code} during start-up; see {logfile}:\n{_log_tail(logfile)}",
                hint=f"read {logfile}; if port {port} is taken, pass --port 0 or set BRIDGEKIT_EMULATOR_PORT",
                log=str(logfile))
        rt = _read_runtime(h)
        if rt and int(rt.get("pid", 0)) == proc.pid:
            answered = _probe(rt, h, timeout=2.0)
            if answered is not None and int(answered.get("pid", -1)) == proc.pid:
                return EmulatorInfo.from_dict(rt)
        time.sleep(0.2)
    _terminate(proc.pid)
    raise EmulatorError(f"the emulator did not answer within {timeout:.0f} s; see {logfile}",
                        hint=f"read {logfile}", log=str(logfile))


def _terminate(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        # Reap it if it is our child (status() otherwise sees a zombie as alive).
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    if hasattr(signal, "SIGKILL"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop(home: str | os.PathLike[str] | None = None) -> bool:
    """Stop the emulator for ``home``; True if one was running."""
    h = _home(home)
    rt = _read_runtime(h)
    if not rt:
        return False
    pid = int(rt.get("pid", 0))
    was_running = _pid_alive(pid) and _is_emulator_pid(pid)
    if was_running:
        _terminate(pid)
    (h / _RUNTIME).unlink(missing_ok=True)
    return was_running


def ensure_running(home: str | os.PathLike[str] | None = None, port: int | None = None) -> EmulatorInfo:
    """The running emulator for ``home`` (starting it if needed); used by the built-in ``emulator`` profile."""
    return start(home, port)


# -- the server process ----------------------------------------------------------------------------
def _configure_logging(logfile: Path, level: str) -> None:
    handler = logging.FileHandler(logfile, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _bind(port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it every response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if os.name == "posix":
        # Let a restart reuse the port while old connections sit in TIME_WAIT (not for a live listener).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise EmulatorError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}",
                            hint="pick another port with --port (0 = any free port)") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _first_data(ctx: Any, scale: str, seed: int) -> None:
    """Generate the synthetic company on first start (until one generation has succeeded)."""
    from bridgekit.emulator.app import regenerate

    try:
        import bridgekit.emulator.synth as synth
    except ModuleNotFoundError as exc:
        if exc.name != "bridgekit.emulator.synth":
            raise
        log.warning("bridgekit.emulator.synth is not available: starting with an empty store")
        return
    try:
        regenerate(ctx, synth, scale=scale, seed=seed)
    except Exception as exc:
        # Keep the token service usable and say why there is no data; the next start tries again.
        log.exception("generating the synthetic company failed; serving an empty store")
        ctx.data_error = f"{type(exc).__name__}: {exc}"
        ctx.store.drop_all()
        ctx.save_apps()


def serve(home: str | os.PathLike[str] | None = None, port: int | None = None, scale: str = "small",
          seed: int = 42, *, log_level: str = "info", access_log: bool = False) -> None:
    """Run the emulator in the foreground until interrupted (SIGINT/SIGTERM).

    Binds 127.0.0.1 only, serves TLS with the certificate from :mod:`bridgekit.emulator.tls`, logs to
    ``<home>/emulator.log``, and writes ``<home>/runtime.json`` once listening. On first start (empty
    store) it generates the synthetic company at ``scale``.
    """
    import uvicorn

    from bridgekit.emulator.app import create_app
    from bridgekit.emulator.context import EmulatorContext

    h = _home(home)
    h.mkdir(parents=True, exist_ok=True)
    logfile = h / _LOG
    _configure_logging(logfile, log_level)
    port = default_port() if port is None else port
    sock = _bind(port)
    actual = int(sock.getsockname()[1])
    ctx = EmulatorContext(h, port=actual, seed=seed)
    if ctx.store.get_meta("emulator.scale") is None:
        _first_data(ctx, scale, seed)
    app = create_app(ctx)
    config = uvicorn.Config(app, ssl_certfile=str(ctx.tls.server_cert), ssl_keyfile=str(ctx.tls.server_key),
                            http="httptools", lifespan="off", log_config=None, log_level=log_level,
                            access_log=access_log, timeout_keep_alive=30, server_header=False)
    server = uvicorn.Server(config)
    info = ctx.info()
    runtime = {f.name: info[f.name] for f in fields(EmulatorInfo)}
    tmp = h / (_RUNTIME + ".tmp")
    tmp.write_text(json.dumps(runtime, indent=2))
    os.replace(tmp, h / _RUNTIME)
    log.info("bridgekit emulator listening on %s (pid %s, home %s)", ctx.base_url, os.getpid(), h)
    print(f"bridgekit emulator listening on {ctx.base_url} (log: {logfile})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        rt = _read_runtime(h)
        if rt and int(rt.get("pid", 0)) == os.getpid():
            (h / _RUNTIME).unlink(missing_ok=True)
        ctx.store.close()
        log.info("bridgekit emulator stopped")
