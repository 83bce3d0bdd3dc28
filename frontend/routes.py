"""HTTP routes. Thin: parse (openai_api), ask the broker (AsyncClient), render (openai_api, sse)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import NotFound
from sanic.response import HTTPResponse, file, raw
from sanic.response import json as json_response

from common.errors import ServerError
from common.protocol import Q_MODELS, Accepted, Partial
from frontend import json_body
from frontend import openai_api as api
from frontend import sse
from frontend.app import bg, ready_client, tracked
from frontend.images import sniff
from frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from frontend.remote import fetch_image

log = logging.getLogger("frontend")
STATIC_DIR = Path(__file__).resolve().parent / "static"
CORS = ["OPTIONS"]   # every route answers CORS preflights (app middleware)
OFFLOAD_BYTES = 1 << 20   # bodies above this are parsed in a thread, so other requests keep flowing


def parse_json(body: bytes) -> Any:
    """The body as JSON. 400 on empty or invalid JSON (RecursionError included), or nesting too deep."""
    if not body:
        raise ServerError("bad_request", "the request body is empty; send a JSON object")
    try:
        value = json_body.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ServerError("bad_request", f"invalid JSON body: {str(exc)[:200]}") from None
    api.check_depth(value)
    return value


# ---- health and models ---------------------------------------------------------------------------


async def health(request: Request) -> HTTPResponse:
    """Liveness for load balancers: open without an API key, so it carries nothing sensitive (no
    pids, endpoints, incarnations or error text): status ok | degraded (a model failed) |
    unavailable (503: broker not heard from), this process's uptime in seconds, the broker
    round trip in ms, and each model's state and its worker's state."""
    app = request.app
    body: dict[str, Any] = {"status": "unavailable", "uptime_s": round(time.monotonic() - app.ctx.started, 3),
                            "broker": {"reachable": False, "rtt_ms": None}, "models": {}, "workers": {}}
    try:
        client = await ready_client(app)
        rtt = await client.ping(timeout_s=1.0)
        models = await client.models()
    except ServerError:
        return json_response(body, status=503, headers={"Retry-After": "1"})
    body["broker"] = {"reachable": True, "rtt_ms": round(rtt * 1000, 3)}
    body["models"] = {m["id"]: m.get("status") for m in models}
    body["workers"] = {m["id"]: (m.get("worker") or {}).get("state") for m in models}
    failed = any(m.get("status") == "failed" for m in models)
    body["status"] = "degraded" if failed else "ok"
    return json_response(body)


async def list_models(request: Request) -> HTTPResponse:
    models = await (await ready_client(request.app)).models()
    created = request.app.ctx.created
    return json_response({"object": "list", "data": [api.model_object(m, created=created) for m in models]})


async def model_route(request: Request, rest: str) -> HTTPResponse:
    """/v1/models/{id} (GET status, DELETE unload) and /v1/models/{id}/load (POST). Ids may hold '/'."""
    client = await ready_client(request.app)
    created = request.app.ctx.created
    if request.method == "POST":
        if not rest.endswith("/load"):
            raise ServerError("not_found", f"no route POST /v1/models/{rest}; use /v1/models/<id>/load")
        status = await client.load(rest[: -len("/load")])
    elif request.method == "DELETE":
        status = await client.unload(rest)
    else:
        reply = await client.query(Q_MODELS, {"model": rest})
        models = reply.get("models") or []
        if not models:
            raise ServerError("unknown_model", f"the model {rest!r} does not exist", param="model")
        status = models[0]
    return json_response(api.model_object(status, created=created))


# ---- chat completions ----------------------------------------------------------------------------


async def chat_completions(request: Request) -> HTTPResponse | None:
    app = request.app
    req, image = await _job_request(request, api.parse_chat_request)
    client = await ready_client(app)
    t0 = time.perf_counter()
    handles = [await client.submit(req.model, req.params, [image], ttl_s=req.ttl_s, stream=req.stream)]
    try:
        async with _owned(app, handles):
            if req.stream:
                return await _stream(request, req, handles[0])
            result = await _result(app, client, req, image, handles, t0)
    except ServerError as exc:
        _count(app, req.model, exc.code, t0)
        raise
    _count(app, req.model, "stop", t0, result.usage)
    return json_response(api.completion(
        completion_id=f"chatcmpl-{handles[-1].job_id}", model=req.model, created=int(time.time()),
        result=result.result, usage=result.usage, blobs=result.blobs,
        return_attention=req.params["return_attention"], finish_reason=_finish(result),
        timings=result.timings))


async def screenshots(request: Request) -> HTTPResponse:
    """POST /v1/screenshots: keep a screenshot's state in its model's worker before the question
    is known (an agent sends the screen while its planner decides what to ask), so that the
    question then runs from the kept state (api.parse_screenshot_request, api.screenshot_object)."""
    app = request.app
    req, image = await _job_request(request, api.parse_screenshot_request)
    client = await ready_client(app)
    t0 = time.perf_counter()
    handles = [await client.submit(req.model, req.params, [image], ttl_s=req.ttl_s)]
    try:
        async with _owned(app, handles):
            result = await _result(app, client, req, image, handles, t0)
    except ServerError as exc:
        app.ctx.metrics.prefills.labels(req.model, exc.code).inc()
        raise
    body = api.screenshot_object(screenshot_id=f"screenshot-{handles[-1].job_id}", model=req.model,
                                 created=int(time.time()), result=result.result, usage=result.usage,
                                 timings=result.timings)
    outcome = "already_kept" if body["already_kept"] else "kept" if body["kept"] else "not_kept"
    app.ctx.metrics.prefills.labels(req.model, outcome).inc()
    return json_response(body)


@contextlib.asynccontextmanager
async def _owned(app: Sanic, handles: list):
    """The route owns the job `handles[-1]` for the block: if the block ends other than with the
    job's answer or its error (the client went away, a stream write failed, a bug), the job is
    cancelled, so that it does not run on for nobody."""
    try:
        yield
    except ServerError:    # the job's own error: it has ended
        raise
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):   # Sanic cancels the handler when the connection is lost
            app.ctx.metrics.disconnects.inc()
        bg(app, _cancel_quietly(handles[-1], "client_disconnect"))
        raise


async def _job_request(request: Request, parse) -> tuple[api.ChatRequest, bytes]:
    """(the body parsed by `parse`, the image's bytes, fetched where it is remote); the caller's
    screenshot-cache scope added to the job's params (set with server.api_keys, frontend/app.py)."""
    cfg = request.app.ctx.cfg
    body = request.body
    if len(body) > OFFLOAD_BYTES:   # JSON + base64 of a big body take milliseconds: off the loop
        req = await asyncio.get_running_loop().run_in_executor(None, _parse, parse, body, cfg)
    else:
        req = _parse(parse, body, cfg)
    image = req.image
    if image is None:
        image = await fetch_image(req.image_url, cfg.server, req.image_param)
        sniff(image, max_pixels=cfg.server.max_image_pixels, param=req.image_param)
    scope = getattr(request.ctx, "cache_scope", None)
    if scope:
        req.params["cache_scope"] = scope
    return req, image


def _parse(parse, body: bytes, cfg) -> api.ChatRequest:
    return parse(parse_json(body), cfg)


async def _result(app: Sanic, client, req: api.ChatRequest, image: bytes, handles: list, t0: float):
    """The result of the job `handles[-1]`. If the broker restarted and lost its in-memory jobs,
    nothing has reached the caller yet and inference has no side effects, so the job is submitted
    once more if the deadline allows; `handles[-1]` is then the new job (the one to cancel)."""
    try:
        return await handles[-1].result()
    except ServerError as exc:
        left = req.ttl_s - (time.perf_counter() - t0)
        if exc.code != "broker_restarted" or left <= 0:
            raise
    app.ctx.metrics.resubmits.inc()
    handles.append(await client.submit(req.model, req.params, [image], ttl_s=left))
    return await handles[-1].result()


async def _stream(request: Request, req: api.ChatRequest, handle) -> None:
    """SSE: role chunk, one content chunk with the grounding, the finish chunk, usage, [DONE]."""
    events = handle.__aiter__()
    first = await anext(events)   # ACCEPTED, or ServerError: still a plain HTTP error status
    cid, created = f"chatcmpl-{handle.job_id}", int(time.time())
    common = dict(completion_id=cid, model=req.model, created=created, include_usage=req.include_usage)
    response = await request.respond(content_type=sse.CONTENT_TYPE, headers=sse.HEADERS)
    await response.send(sse.event(api.chunk(delta={"role": "assistant", "content": ""}, **common)))
    result = None if isinstance(first, (Accepted, Partial)) else first   # else: the JobResult
    try:
        while result is None:
            ev = await anext(events)
            if not isinstance(ev, (Accepted, Partial)):
                result = ev
    except ServerError as exc:
        await response.send(sse.error_event(exc.openai_body()))
        await response.eof()
        _count(request.app, req.model, exc.code, None)
        return
    except StopAsyncIteration:
        err = ServerError("internal", "the job ended without a result")
        await response.send(sse.error_event(err.openai_body()))
        await response.eof()
        return
    grounding = api.grounding_block(result.result, result.blobs, req.params["return_attention"])
    await response.send(sse.event(api.chunk(
        delta={"content": api.action_text(result.result), "grounding": grounding},
        extra_choice={"coordinates": api.coordinates(result.result)}, timings=result.timings, **common)))
    await response.send(sse.event(api.chunk(delta={}, finish_reason=_finish(result), **common)))
    if req.include_usage:
        await response.send(sse.event(api.chunk(delta=None, usage=api.usage_block(result.usage), **common)))
    await response.send(sse.DONE)
    await response.eof()
    _count(request.app, req.model, "stop", None, result.usage)


def _finish(result) -> str:
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


def _count(app: Sanic, model: str, outcome: str, t0: float | None, usage: dict | None = None) -> None:
    """Count a job's outcome once its answer is on its way: the handler writes its response before
    it next yields to the event loop, and after a forward's idle these updates cost several times
    their usual few µs (bench/RESULTS.md, twenty-seventh session)."""
    elapsed = time.perf_counter() - t0 if t0 is not None and outcome == "stop" else None
    asyncio.get_running_loop().call_soon(_record_job, app.ctx.metrics, model, outcome, elapsed, usage)


def _record_job(metrics, model: str, outcome: str, elapsed: float | None, usage: dict | None) -> None:
    metrics.jobs.labels(model, outcome).inc()
    cached = (usage or {}).get("cached_tokens")
    if isinstance(cached, int) and cached > 0:
        metrics.screenshot_cache_hits.labels(model).inc()
    if elapsed is not None:
        metrics.job_latency.labels(model).observe(elapsed)


async def _cancel_quietly(handle, reason: str) -> None:
    try:
        await handle.cancel(reason)
    except Exception:   # the broker may be gone; the job's deadline still bounds it
        log.warning("cancel of job %s failed", handle.job_id, exc_info=True)


# ---- metrics and static files --------------------------------------------------------------------


async def metrics(request: Request) -> HTTPResponse:
    try:
        stats = await (await ready_client(request.app, wait_s=0)).stats()
    except ServerError:
        stats = None
    client = request.app.ctx.client
    return raw(request.app.ctx.metrics.render(stats, client.counters if client is not None else None),
               content_type=METRICS_CONTENT_TYPE)


async def index(request: Request) -> HTTPResponse:
    return await _static_file("index.html")


async def static(request: Request, name: str) -> HTTPResponse:
    return await _static_file(name)


async def _static_file(name: str) -> HTTPResponse:
    path = (STATIC_DIR / name).resolve()
    if not path.is_relative_to(STATIC_DIR) or not path.is_file():
        raise NotFound(f"no static file {name!r}")
    return await file(path)


def register(app: Sanic) -> None:
    for handler, uri, methods in [
        (health, "/v1/health", ["GET", *CORS]),
        (list_models, "/v1/models", ["GET", *CORS]),
        (model_route, "/v1/models/<rest:path>", ["GET", "POST", "DELETE", *CORS]),
        (chat_completions, "/v1/chat/completions", ["POST", *CORS]),
        (screenshots, "/v1/screenshots", ["POST", *CORS]),
        (metrics, "/metrics", ["GET", *CORS]),
        (index, "/", ["GET"]),
        (static, "/static/<name:path>", ["GET"]),
    ]:
        app.add_route(tracked(handler), uri, methods=methods, name=handler.__name__)
