"""The emulator's Starlette application: identity, Dataverse and Graph mounts, fault middleware, admin API.

The Dataverse and Graph route modules are imported lazily: a missing module is logged and its
mount skipped, and a module that fails to import answers 500 under its prefix (with the import error
in the log), so the identity service keeps working either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bridgekit.emulator import activity, identity, synth
from bridgekit.emulator.context import AppRegistration, EmulatorContext, cert_thumbprints
from bridgekit.emulator.dataverse.api import routes as dataverse_routes
from bridgekit.emulator.faults import FaultMiddleware
from bridgekit.emulator.graph.api import routes as graph_routes

__all__ = ["ADMIN_HEADER", "DATAVERSE_PREFIX", "GRAPH_PREFIX", "create_app"]

log = logging.getLogger("bridgekit.emulator")

ADMIN_HEADER = "X-Emulator-Admin-Key"
DATAVERSE_PREFIX = "/org/api/data/v9.2"
GRAPH_PREFIX = "/graph/v1.0"

Handler = Callable[[Request], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json; charset=utf-8")


def _service_mount(ctx: EmulatorContext, routes: Callable[[EmulatorContext], Any], prefix: str) -> Mount:
    built = routes(ctx)
    if isinstance(built, list | tuple):
        return Mount(prefix, routes=list(built))
    return Mount(prefix, app=built)


class _Admin:
    """``/_emulator/*``: info, faults, settings, reset, mutate, apps. Every call needs the admin key."""

    def __init__(self, ctx: EmulatorContext) -> None:
        self.ctx = ctx
        self._reset_lock = asyncio.Lock()

    def guard(self, handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            if not self.ctx.check_admin_key(request.headers.get(ADMIN_HEADER)):
                return _json({"error": f"missing or wrong {ADMIN_HEADER} header (the key is in "
                                       f"{self.ctx.admin_key_path})"}, 401)
            try:
                return await handler(request)
            except ValueError as exc:
                return _json({"error": str(exc)}, 400)
        return wrapped

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    async def info(self, request: Request) -> Response:
        data = self.ctx.info()
        data["collections"] = self.ctx.store.collections()
        data["services"] = {"dataverse": _has_route(request, DATAVERSE_PREFIX),
                            "graph": _has_route(request, GRAPH_PREFIX)}
        return _json(data)

    async def truth(self, request: Request) -> Response:
        """What the synthetic company was generated with: its planted defects and generating model."""
        store = self.ctx.store
        return _json({k: store.get_meta(k) for k in ("company", "generating_model", "planted_defects")})

    async def faults(self, request: Request) -> Response:
        if request.method == "POST":
            body = await self._body(request)
            if body.pop("clear", False):
                self.ctx.faults.__init__()  # type: ignore[misc]
            self.ctx.faults.update(body)
            log.info("faults set: %s", self.ctx.faults.to_dict())
        return _json(self.ctx.faults.to_dict())

    async def settings(self, request: Request) -> Response:
        if request.method == "POST":
            body = await self._body(request)
            if body.pop("defaults", False):
                self.ctx.settings.__init__()  # type: ignore[misc]
            self.ctx.settings.update(body)
            self.ctx.reset_limits()
            log.info("settings set: %s", self.ctx.settings.to_dict())
        return _json(self.ctx.settings.to_dict())

    async def reset(self, request: Request) -> Response:
        body = await self._body(request)
        scale = str(body.get("scale") or self.ctx.store.get_meta("emulator.scale") or "small")
        seed = int(body.get("seed", self.ctx.store.get_meta("emulator.seed") or self.ctx.seed))
        # False: the same company with a clean integration layer (no planted integration defects).
        defects = body.get("integration_defects", True)
        if not isinstance(defects, bool):
            raise ValueError("integration_defects must be true or false")
        async with self._reset_lock:
            started = time.monotonic()
            try:
                result = await asyncio.to_thread(regenerate, self.ctx, synth, scale=scale, seed=seed,
                                                 integration_defects=defects)
            except ValueError:
                raise  # a bad scale or seed: 400 from the guard
            except Exception as exc:
                log.exception("reset failed")
                return _json({"error": f"regenerating the data failed: {type(exc).__name__}: {exc}"}, 500)
        return _json({"scale": scale, "seed": seed, "integration_defects": defects,
                      "seconds": round(time.monotonic() - started, 3),
                      "result": _jsonable(result), "collections": self.ctx.store.collections()})

    async def mutate(self, request: Request) -> Response:
        body = await self._body(request)
        kwargs = {k: int(body.get(k, 0)) for k in ("creates", "updates", "deletes")}
        if any(v < 0 for v in kwargs.values()):
            raise ValueError("creates, updates and deletes must be >= 0")
        seed = body.get("seed")
        try:
            result = await asyncio.to_thread(activity.mutate, self.ctx.store, seed=seed, **kwargs)
        except ValueError:
            raise
        except Exception as exc:
            log.exception("mutate failed")
            return _json({"error": f"mutate failed: {type(exc).__name__}: {exc}"}, 500)
        return _json({"result": _jsonable(result)})

    async def token(self, request: Request) -> Response:
        body = await self._body(request)
        unknown = set(body) - {"audience", "client_id", "roles", "scp", "expires_in", "oid"}
        if unknown:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
        return _json(identity.mint_access_token(self.ctx, audience=str(body.get("audience", "dataverse")),
                                                client_id=body.get("client_id"), roles=body.get("roles"),
                                                scp=body.get("scp"), expires_in=body.get("expires_in"),
                                                oid=body.get("oid")))

    async def apps(self, request: Request) -> Response:
        if request.method == "GET":
            return _json({"apps": [_public_app(a) for a in self.ctx.apps.values()]})
        body = await self._body(request)
        app = app_from_request(body)
        self.ctx.register_app(app)
        return _json(_public_app(app), 201)


def app_from_request(body: dict[str, Any]) -> AppRegistration:
    """Build an app registration from ``POST /_emulator/apps`` JSON.

    Keys: ``name``, ``client_id`` (default: a new GUID), ``secret``, ``secret_expires_in`` (seconds from
    now, negative for an already expired secret) or ``secret_expires_at`` (epoch seconds),
    ``certificate_pem``, ``roles`` (``{"dataverse": [...], "graph": [...]}``; default none),
    ``public_client`` (bool).
    """
    unknown = set(body) - {"name", "client_id", "secret", "secret_expires_in", "secret_expires_at",
                           "certificate_pem", "roles", "public_client"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    client_id = str(body.get("client_id") or uuid.uuid4())
    try:
        uuid.UUID(client_id)
    except ValueError as exc:
        raise ValueError("client_id must be a GUID") from exc
    roles = body.get("roles") or {}
    if not isinstance(roles, dict) or not all(
            k in ("dataverse", "graph") and isinstance(v, list) and all(isinstance(r, str) for r in v)
            for k, v in roles.items()):
        raise ValueError('roles must look like {"dataverse": ["user_impersonation"], "graph": ["User.Read.All"]}')
    app = AppRegistration(client_id, str(body.get("name") or f"app-{client_id[:8]}"),
                          roles={k: list(v) for k, v in roles.items()},
                          public_client=bool(body.get("public_client", False)))
    if body.get("secret"):
        expires_at: float | None = None
        if body.get("secret_expires_at") is not None:
            expires_at = float(body["secret_expires_at"])
        elif body.get("secret_expires_in") is not None:
            expires_at = time.time() + float(body["secret_expires_in"])
        app.add_secret(str(body["secret"]), expires_at=expires_at)
    if body.get("certificate_pem"):
        pem = str(body["certificate_pem"])
        cert_thumbprints(pem.encode())  # validates the PEM (ValueError -> 400)
        app.certificates.append(pem)
    return app


def _public_app(app: AppRegistration) -> dict[str, Any]:
    return {"client_id": app.client_id, "name": app.name, "roles": app.roles, "public_client": app.public_client,
            "secrets": [{"hint": s.get("hint", "")[:3] + "~", "expires_at": s.get("expires_at")} for s in app.secrets],
            "certificates": len(app.certificates)}


def _jsonable(value: Any) -> Any:
    try:
        return orjson.loads(orjson.dumps(value, default=str))
    except TypeError:
        return str(value)


def _has_route(request: Request, prefix: str) -> bool:
    app = request.app
    return any(isinstance(r, Mount) and r.path == prefix for r in getattr(app, "routes", []))


def regenerate(ctx: EmulatorContext, synth: Any, *, scale: str, seed: int, integration_defects: bool = True) -> Any:
    """Regenerate the synthetic company, then restore what a data reset must not lose (app registrations)."""
    log.info("generating synthetic data: scale=%s seed=%s", scale, seed)
    started = time.monotonic()
    try:
        result = synth.generate(ctx.store, seed=seed, scale=scale, integration_defects=integration_defects)
    finally:
        # generate() drops all meta first, app registrations included: write them back even if it failed.
        ctx.save_apps()
    ctx.data_error = None
    ctx.store.set_meta("emulator.scale", scale)
    ctx.store.set_meta("emulator.seed", seed)
    log.info("synthetic data ready in %.1f s", time.monotonic() - started)
    return result


class _ServerHeader:
    """Tag every response so a stray process on the port is not mistaken for the emulator."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-bridgekit-emulator", b"1"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)


def create_app(ctx: EmulatorContext) -> ASGIApp:
    """Build the ASGI application for ``ctx``: service mounts, identity routes, admin API, fault middleware."""
    admin = _Admin(ctx)
    route_list: list[BaseRoute] = []
    for routes, prefix in ((dataverse_routes, DATAVERSE_PREFIX), (graph_routes, GRAPH_PREFIX)):
        route_list.append(_service_mount(ctx, routes, prefix))
    route_list += [
        Route("/_emulator/info", admin.guard(admin.info), methods=["GET"]),
        Route("/_emulator/truth", admin.guard(admin.truth), methods=["GET"]),
        Route("/_emulator/faults", admin.guard(admin.faults), methods=["GET", "POST"]),
        Route("/_emulator/settings", admin.guard(admin.settings), methods=["GET", "POST"]),
        Route("/_emulator/reset", admin.guard(admin.reset), methods=["POST"]),
        Route("/_emulator/mutate", admin.guard(admin.mutate), methods=["POST"]),
        Route("/_emulator/apps", admin.guard(admin.apps), methods=["GET", "POST"]),
        Route("/_emulator/token", admin.guard(admin.token), methods=["POST"]),
    ]
    route_list += identity.routes(ctx)
    # The fault middleware is outermost: it needs uvicorn's own send to drop connections.
    return FaultMiddleware(_ServerHeader(Starlette(routes=route_list)), ctx)
