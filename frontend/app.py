"""The Sanic application: `create_app(cfg)`, its context, listeners, middleware and error handler.

One AsyncClient (one DEALER) per Sanic worker process, created in `before_server_start` (after the
fork/spawn) and closed in `after_server_stop`. Every error, ours or Sanic's, leaves through
`error_response` in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sanic import Request, Sanic
from sanic.config import Config
from sanic.exceptions import (BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, SanicException,
                              ServiceUnavailable)
from sanic.response import HTTPResponse, empty, json

from common.client import AsyncClient
from common.config import AppConfig
from common.errors import ServerError
from common.logs import configure_logging
from common.malloc import keep_freed_memory
from frontend.metrics import Metrics

log = logging.getLogger("frontend")
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
OPEN_PATHS = frozenset({"/v1/health"})   # load balancers probe it without a key; it shows no secrets
# Header names a preflight may ask for (RFC 9110 tokens, comma separated). OpenAI's JS SDK sends
# its own (x-stainless-*, openai-*); credentials are Bearer tokens, never cookies, so echoing
# whatever an allowed origin asks for grants nothing extra.
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


@dataclass
class AppCtx:
    """Per-process state. `client` exists between before_server_start and after_server_stop."""
    cfg: AppConfig
    metrics: Metrics = field(default_factory=Metrics)
    client: AsyncClient | None = None
    started: float = field(default_factory=time.monotonic)      # for uptime, seconds
    created: int = field(default_factory=lambda: int(time.time()))  # unix s, OpenAI's `created`
    background: set = field(default_factory=set)                # fire-and-forget cancels
    client_started: float = 0.0                                 # monotonic s, when the client started


GroundingApp = Sanic[Config, AppCtx]


def needs_auth(path: str) -> bool:
    """API keys guard the API and metrics; the playground page and its files, and the health
    check, load without one."""
    return (path.startswith("/v1/") or path == "/metrics") and path not in OPEN_PATHS


def check_api_key(request: Request, keys: list) -> str:
    """The caller's key's scope for the workers' screenshot caches (a digest, never the key), or
    raises unauthorized."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ServerError("unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    # compare against every key, so timing does not reveal which prefix matched
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    if not ok:
        raise ServerError("unauthorized", "invalid API key")
    # A cached screenshot answers only callers with the key that sent it: with prompt caching
    # reported back (cached_tokens) and faster answers, a shared cache would tell one caller that
    # another had sent the same image.
    return hashlib.sha256(b"screenshot-cache\0" + token.encode()).hexdigest()[:32]


def as_server_error(exc: BaseException) -> tuple[ServerError, int, dict]:
    """(error, HTTP status, extra headers) for any exception reaching the handler."""
    if isinstance(exc, ServerError):
        return exc, exc.http_status, {}
    if isinstance(exc, NotFound):
        return ServerError("not_found", str(exc) or "not found"), 404, {}
    if isinstance(exc, MethodNotAllowed):
        return ServerError("method_not_allowed", str(exc)), 405, dict(getattr(exc, "headers", {}) or {})
    if isinstance(exc, PayloadTooLarge):
        return ServerError("payload_too_large", "the request body exceeds server.max_body_bytes"), 413, {}
    if isinstance(exc, ServiceUnavailable):
        return ServerError("overloaded", str(exc), retryable=True), 503, {}
    if isinstance(exc, BadRequest):
        return ServerError("bad_request", str(exc) or "bad request"), 400, {}
    if isinstance(exc, SanicException):   # e.g. 408 request timeout: keep Sanic's status
        status = exc.status_code or 500
        return ServerError("bad_request" if status < 500 else "internal", str(exc)), status, {}
    log.exception("unhandled error", exc_info=exc)
    return ServerError("internal", f"internal error ({type(exc).__name__}); see the server log"), 500, {}


def error_response(request: Request | None, exc: BaseException) -> HTTPResponse:
    err, status, headers = as_server_error(exc)
    if status in (429, 503) or err.retry_after_ms:
        headers["Retry-After"] = str(max(1, math.ceil((err.retry_after_ms or 1000) / 1000)))
    if err.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return json(err.openai_body(), status=status, headers=headers)


def _cors_headers(request: Request, origins: list) -> dict[str, str]:
    """CORS response headers for `request`. With a list of origins the answer depends on the
    request's Origin, so every response says `Vary: Origin` (caches must not mix them up)."""
    if not origins:
        return {}
    if "*" in origins:
        return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Retry-After"} \
            if request.headers.get("origin") else {}
    if request.headers.get("origin") in origins:
        return {"Access-Control-Allow-Origin": request.headers["origin"], "Vary": "Origin",
                "Access-Control-Expose-Headers": "Retry-After"}
    return {"Vary": "Origin"}


def create_app(cfg: AppConfig, name: str = "grounding_frontend") -> GroundingApp:
    """The HTTP frontend for `cfg`. Sanic reads no environment (`env_prefix=None`)."""
    from frontend import routes   # routes import app helpers; keep the import cycle one-way

    # configure_logging=False: records go to the root handler (common.logs), not Sanic's own
    app: GroundingApp = Sanic(name, ctx=AppCtx(cfg=cfg), env_prefix=None, configure_logging=False)
    s = cfg.server
    app.config.REQUEST_MAX_SIZE = s.max_body_bytes
    # our own deadlines answer first (504 for jobs; model loads wait up to broker.load_timeout_s)
    app.config.RESPONSE_TIMEOUT = max(s.request_timeout_s, cfg.broker.load_timeout_s) + 30
    app.config.REQUEST_TIMEOUT = 60
    app.config.ACCESS_LOG = s.access_log
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.NOISY_EXCEPTIONS = False
    app.config.MOTD = False

    @app.before_server_start
    async def _open_client(app: GroundingApp) -> None:
        app.ctx.client = AsyncClient(cfg.broker.client_endpoint, default_ttl_s=s.request_timeout_s,
                                     direct_answers=s.direct_answers, direct_jobs=s.direct_jobs)
        await app.ctx.client.start()
        app.ctx.client_started = time.monotonic()

    @app.after_server_stop
    async def _close_client(app: GroundingApp) -> None:
        if app.ctx.client is not None:
            await app.ctx.client.close()
            app.ctx.client = None

    @app.on_request
    async def _before(request: Request) -> HTTPResponse | None:
        request.ctx.t0 = time.perf_counter()
        app.ctx.metrics.inflight.inc()
        if request.method == "OPTIONS":   # CORS preflight: browsers send no credentials here
            headers = _cors_headers(request, s.cors_origins)
            if "Access-Control-Allow-Origin" in headers:
                asked = request.headers.get("access-control-request-headers", "").strip()
                headers.update({"Access-Control-Allow-Methods": CORS_METHODS,
                                "Access-Control-Allow-Headers":
                                    asked if _HEADER_LIST.fullmatch(asked) else CORS_HEADERS,
                                "Access-Control-Max-Age": "600"})
            return empty(status=204, headers={"Allow": CORS_METHODS, **headers})
        request.ctx.cache_scope = None
        if s.api_keys and needs_auth(request.path):
            request.ctx.cache_scope = check_api_key(request, s.api_keys)
        return None

    @app.on_response
    async def _after(request: Request, response: HTTPResponse) -> None:
        # streams pass here when their headers go out: their latency is the time to first byte
        response.headers.update(_cors_headers(request, s.cors_origins))
        # once the response is written (this task writes it before it next yields), so that the
        # latency runs to the last byte and the metrics' cost is off the answer's way
        asyncio.get_running_loop().call_soon(record_request, request, response.status)

    app.error_handler.add(Exception, error_response)
    routes.register(app)
    return app


def process_app(cfg: AppConfig) -> GroundingApp:
    """Factory for `python -m frontend`: also configures logging and malloc, since Sanic may call it
    in a freshly spawned worker process."""
    configure_logging("frontend", cfg.log_level)
    keep_freed_memory()
    return create_app(cfg)


def record_request(request: Request, status: int) -> None:
    """Count a finished request once (response middleware, or a handler cancelled by a disconnect)."""
    t0 = getattr(request.ctx, "t0", None)
    if t0 is not None:
        request.ctx.t0 = None
        m = request.app.ctx.metrics
        m.inflight.dec()
        route = "/" + request.route.path if request.route else "unmatched"
        m.observe_request(route, request.method, status, time.perf_counter() - t0)


def tracked(handler: Any) -> Any:
    """Route wrapper: a handler cancelled because the client left is counted as status 499."""

    @functools.wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(request, *args, **kwargs)
        except asyncio.CancelledError:
            record_request(request, 499)
            raise
    return wrapper


def client_of(app: Sanic) -> AsyncClient:
    client = app.ctx.client
    if client is None:
        raise ServerError("broker_unavailable", "the broker client is not running", retryable=True)
    return client


async def ready_client(app: Sanic, wait_s: float = 1.0) -> AsyncClient:
    """The client, once the broker has been heard from within 3 s; else 503 + Retry-After at once
    (a process started less than 3 s ago waits up to `wait_s` for its first PONG). Sends nothing
    itself: the client's ticker pings, and a send on a disconnected socket would only wait."""
    client = client_of(app)
    fresh = time.monotonic() - app.ctx.client_started < 3.0
    deadline = time.monotonic() + (wait_s if fresh else 0.0)
    while not client.healthy:
        if time.monotonic() >= deadline:
            raise ServerError("broker_unavailable", "the broker is not reachable; retry shortly",
                              retryable=True, retry_after_ms=1000)
        await asyncio.sleep(0.02)
    return client


def bg(app: Sanic, coro: Any) -> None:
    """Run `coro` in the background, keeping a reference so it is not garbage-collected."""
    task = asyncio.get_running_loop().create_task(coro)
    app.ctx.background.add(task)
    task.add_done_callback(app.ctx.background.discard)
