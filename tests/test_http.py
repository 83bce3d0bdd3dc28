"""The HTTP frontend end to end: the official `openai` client against the real stack (broker +
supervisor + frontend under honcho, as the Procfile starts them), fake-engine models."""
from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image

from tests.stackutil import ROOT, Stack, fake_model

KEY = "test-key"
ORIGIN = "http://playground.test"
CONFIG = {
    "server": {"default_model": "fake-a", "api_keys": [KEY], "cors_origins": [ORIGIN], "request_timeout_s": 30},
    "broker": {"queue_size": 2},
    "models": {"fake-a": fake_model(), "fake-b": fake_model(preload=False),
               "fake-x": fake_model(max_batch=1)},
    "profiles": {"tiny": {"max_pixels": 200_000}},
}


def png(w=400, h=300) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


IMG = png()


def messages(text="click the blue square", image=IMG, system=None):
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": [{"type": "text", "text": text},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("http"), CONFIG, api_key=KEY)
    try:
        s.start(ready_timeout_s=60, loaded=("fake-a", "fake-x"))
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.http_base + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def api(stack, method, path, body=None, headers=None):
    status, hdrs, raw = stack.http(method, path, body, headers=headers)
    return status, {k.lower(): v for k, v in hdrs.items()}, raw


def error_of(raw: bytes) -> dict:
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- completions ---------------------------------------------------------------------------------


def test_completion_with_image(client):
    resp = client.chat.completions.create(model="fake-a", messages=messages(), temperature=0.2, max_tokens=10)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "fake-a"
    d = resp.model_dump()
    choice = d["choices"][0]
    m = re.fullmatch(r"pyautogui\.click\(x=(\d+), y=(\d+)\)", choice["message"]["content"])
    assert m, choice["message"]["content"]
    g = choice["message"]["grounding"]
    assert g["image_size"] == [400, 300] and g["space"] == "pixels" and len(g["grid"]) == 2
    best = g["points"][0]
    assert (int(m[1]), int(m[2])) == (round(best["x"]), round(best["y"]))
    assert best["x"] == pytest.approx(best["nx"] * 400) and 0 <= best["ny"] <= 1
    assert choice["coordinates"] == {"x": best["nx"], "y": best["ny"]}
    assert choice["finish_reason"] == "stop" and "attention" not in g
    assert d["usage"]["prompt_tokens"] > g["grid"][0] * g["grid"][1] and d["usage"]["completion_tokens"] == 0


def test_model_defaults_extras_and_attention(client):
    resp = client.chat.completions.create(
        model="", messages=messages(system="Point at things."),
        extra_body={"top_k": 4, "return_attention": True, "profile": "tiny", "max_context": 4096})
    g = resp.model_dump()["choices"][0]["message"]["grounding"]
    assert resp.model == "fake-a" and len(g["points"]) == 4
    assert [p["score"] for p in g["points"]] == sorted((p["score"] for p in g["points"]), reverse=True)
    assert len(g["attention"]) == g["grid"][0] * g["grid"][1]
    assert g["resized_size"][0] * g["resized_size"][1] <= 200_000   # the profile reached the worker
    resp = client.chat.completions.create(model="fake-a", messages=messages(), extra_body={"topk": 2})
    assert len(resp.model_dump()["choices"][0]["message"]["grounding"]["points"]) == 2


def test_streaming_with_usage(client):
    chunks = list(client.chat.completions.create(model="fake-a", messages=messages(), stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 1
    cd = content[0].model_dump()["choices"][0]
    assert cd["delta"]["content"].startswith("pyautogui.click(") and cd["delta"]["grounding"]["points"]
    assert cd["coordinates"]["x"] == cd["delta"]["grounding"]["points"][0]["nx"]
    assert content[0].model_dump()["timings"]["total"] >= 0   # the worker's ms, on the content chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_raw_sse_ends_with_done(stack):
    status, hdrs, raw = api(stack, "POST", "/v1/chat/completions", {"messages": messages(), "stream": True})
    assert status == 200 and hdrs["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all("usage" not in json.loads(e[6:]) for e in events[:-2])   # include_usage not asked


# ---- models --------------------------------------------------------------------------------------


def test_models_list_and_status(client, stack):
    listed = client.models.list()
    ids = {m.id for m in listed.data}
    assert ids == {"fake-a", "fake-b", "fake-x"}
    a = next(m for m in listed.data if m.id == "fake-a").model_dump()
    assert a["object"] == "model" and isinstance(a["created"], int) and a["owned_by"]
    assert a["status"] == "loaded" and a["memory"]["weights_bytes"] > 0
    one = client.models.retrieve("fake-a").model_dump()
    assert one["id"] == "fake-a" and one["status"] == "loaded"
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("nope")
    assert ei.value.body["code"] == "unknown_model"


def test_load_and_unload(stack, client):
    status, _, raw = api(stack, "POST", "/v1/models/fake-b/load")
    assert status == 200 and json.loads(raw)["status"] == "loaded", raw
    assert client.models.retrieve("fake-b").model_dump()["status"] == "loaded"
    resp = client.chat.completions.create(model="fake-b", messages=messages())
    assert resp.model == "fake-b"
    status, _, raw = api(stack, "DELETE", "/v1/models/fake-b")
    assert status == 200 and json.loads(raw)["status"] == "unloaded", raw
    assert client.models.retrieve("fake-b").model_dump()["status"] == "unloaded"
    status, _, raw = api(stack, "POST", "/v1/models/nope/load")
    assert status == 404 and error_of(raw)["code"] == "unknown_model"
    status, _, raw = api(stack, "POST", "/v1/models/fake-b/reload")
    assert status == 404 and error_of(raw)["code"] == "not_found"


def test_health_is_open_and_discreet(stack):
    status, _, raw = stack.http("GET", "/v1/health", auth=False)   # load balancers send no key
    h = json.loads(raw)
    assert status == 200 and h["status"] == "ok" and h["broker"]["reachable"] and h["uptime_s"] > 0
    assert h["broker"]["rtt_ms"] >= 0 and set(h) == {"status", "uptime_s", "broker", "models", "workers"}
    assert h["models"] == {"fake-a": "loaded", "fake-b": "unloaded", "fake-x": "loaded"}
    # each model's worker as it last reported itself (heartbeats: up to a second behind)
    assert set(h["workers"]) == set(h["models"])
    assert set(h["workers"].values()) <= {"empty", "loading", "loaded", "unloading"}, h["workers"]
    # nothing for an anonymous caller to learn beyond states: no pids, endpoints, incarnation
    pids = {stack.worker_pid(m) for m in ("fake-a", "fake-x")}
    leaves, todo = [], [h]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            leaves += v.keys()
            todo += v.values()
        else:
            leaves.append(v)
    assert not pids & {v for v in leaves if isinstance(v, int)}
    assert not {"pid", "uid", "incarnation", "error"} & {v for v in leaves if isinstance(v, str)}
    assert "tcp://" not in raw.decode() and stack.query("mmi.stats")["incarnation"] not in raw.decode()
    assert stack.http("GET", "/v1/health", headers={"Authorization": "Bearer wrong"})[0] == 200


# ---- errors --------------------------------------------------------------------------------------


def test_auth(stack):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, hdrs, raw = stack.http("GET", "/v1/models", headers=headers, auth=False)
        assert status == 401 and error_of(raw)["code"] == "unauthorized"
    assert stack.http("GET", "/metrics", auth=False)[0] == 401
    with openai.OpenAI(base_url=stack.http_base + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="fake-a", messages=messages())
    assert stack.http("GET", "/", auth=False)[0] == 200   # the playground page loads without a key


def test_routes_and_methods(stack):
    status, _, raw = api(stack, "GET", "/v1/nope")
    assert status == 404 and error_of(raw)["code"] == "not_found"
    status, hdrs, raw = api(stack, "PUT", "/v1/chat/completions", {})
    assert status == 405 and error_of(raw)["code"] == "method_not_allowed" and "POST" in hdrs["allow"]
    status, _, raw = api(stack, "GET", "/static/does-not-exist.js")
    assert status == 404 and error_of(raw)["code"] == "not_found"
    status, _, raw = api(stack, "GET", "/static/..%2F..%2Fcommon%2Fconfig.py")
    assert status == 404


@pytest.mark.parametrize("extra,param", [({"n": 3}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                                         ({"response_format": {"type": "json_object"}}, "response_format")])
def test_unsupported_parameters(client, extra, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="fake-a", messages=messages(), **extra)
    assert ei.value.body["code"] == "unsupported_parameter" and ei.value.body["param"] == param


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=messages())
    assert ei.value.body["code"] == "unknown_model" and ei.value.body["param"] == "model"


@pytest.mark.parametrize("fail,status", [("insufficient_memory", 507), ("load_failed", 500), ("worker_lost", 502),
                                         ("invalid_image", 400)])
def test_worker_errors_map_to_status(stack, fail, status):
    st, hdrs, raw = api(stack, "POST", "/v1/chat/completions",
                        {"model": "fake-x", "messages": messages(), "fake": {"fail": fail}})
    assert st == status and error_of(raw)["code"] == fail


def test_deadline_is_504(stack):
    t0 = time.monotonic()
    st, _, raw = api(stack, "POST", "/v1/chat/completions",
                     {"model": "fake-x", "messages": messages(), "timeout_s": 0.5, "fake": {"sleep_ms": 1500}})
    assert st == 504 and error_of(raw)["code"] == "deadline_exceeded" and time.monotonic() - t0 < 1.4


def test_overload_is_503_with_retry_after(stack):
    body = {"model": "fake-x", "messages": messages(), "fake": {"sleep_ms": 400}}
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: api(stack, "POST", "/v1/chat/completions", body), range(12)))
    rejected = [(s, h, r) for s, h, r in results if s != 200]
    assert rejected and len(rejected) < 12, [r[0] for r in results]
    for s, h, r in rejected:
        assert s in (429, 503) and error_of(r)["code"] == "overloaded" and int(h["retry-after"]) >= 1


def test_error_mid_stream_is_sse_error(client):
    stream = client.chat.completions.create(model="fake-x", messages=messages(), stream=True,
                                            extra_body={"fake": {"fail": "internal"}})
    with pytest.raises(openai.APIError) as ei:
        list(stream)
    assert ei.value.body["code"] == "internal"


def _hang_up(stack, stream: bool, path: str = "/v1/chat/completions") -> None:
    if path == "/v1/screenshots":
        body = json.dumps({"model": "fake-x", "image_url": messages()[-1]["content"][1]["image_url"],
                           "fake": {"sleep_ms": 1500}}).encode()
    else:
        body = json.dumps({"model": "fake-x", "messages": messages(), "stream": stream,
                           "fake": {"sleep_ms": 1500}}).encode()
    with socket.create_connection(("127.0.0.1", stack.config["server"]["port"]), timeout=5) as s:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        if stream:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")   # the stream started, then we hang up
        else:
            time.sleep(0.3)


def test_client_disconnect_cancels_job(stack):
    cancels0 = stack.query("mmi.stats")["counters"].get("cancels_total", 0)
    _hang_up(stack, stream=True)
    _hang_up(stack, stream=False)
    _hang_up(stack, stream=False, path="/v1/screenshots")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = api(stack, "GET", "/metrics")[2].decode()
        if re.search(r"^grounding_client_disconnects_total 3\.0$", text, re.M):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the frontend did not notice all three disconnects")
    assert re.search(r'^grounding_http_requests_total\{method="POST",route="/v1/chat/completions",status="499"\} 1\.0$',
                     text, re.M)
    assert re.search(r'^grounding_http_requests_total\{method="POST",route="/v1/screenshots",status="499"\} 1\.0$',
                     text, re.M)
    assert re.search(r"^grounding_http_inflight_requests 1\.0$", text, re.M)   # only this /metrics call
    counters = stack.query("mmi.stats")["counters"]
    assert counters.get("cancels_total", 0) == cancels0 + 3, counters   # CANCEL reached the broker


def test_worker_crash(stack, client):
    st, _, raw = api(stack, "POST", "/v1/chat/completions",
                     {"model": "fake-x", "messages": messages(), "fake": {"crash": True}})
    assert (st, error_of(raw)["code"]) in ((500, "worker_crash_poison"), (502, "worker_lost"))
    deadline = time.monotonic() + 30   # the supervisor restarts the worker; the model serves again
    while True:
        try:
            assert client.chat.completions.create(model="fake-x", messages=messages()).choices
            break
        except (openai.InternalServerError, openai.APIStatusError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# ---- screenshots ---------------------------------------------------------------------------------


def test_screenshot_prefill_over_http(stack):
    """A fake model keeps nothing, and says so; the request is still checked and answered in full."""
    url = "data:image/png;base64," + base64.b64encode(IMG).decode()
    status, _, raw = api(stack, "POST", "/v1/screenshots", {"model": "fake-a", "image_url": {"url": url}})
    assert status == 200, raw
    shot = json.loads(raw)
    assert shot["object"] == "screenshot" and shot["id"].startswith("screenshot-") and shot["model"] == "fake-a"
    assert (shot["kept"], shot["already_kept"], shot["cached_tokens"]) == (False, False, 0)
    assert "keeps no screenshot state" in shot["not_kept"]
    assert shot["image_size"] == [400, 300] and shot["grid"][0] * shot["grid"][1] == shot["image_tokens"] > 0
    assert "preprocess" in shot["timings"]
    status, _, raw = api(stack, "POST", "/v1/screenshots", {"image_url": url, "instruction": "click OK"})
    assert status == 400 and error_of(raw)["param"] == "instruction"
    status, _, raw = api(stack, "POST", "/v1/screenshots", {"model": "gpt-4o", "image_url": url})
    assert status == 404 and error_of(raw)["code"] == "unknown_model"
    status, _, raw = api(stack, "POST", "/v1/screenshots", {"image_url": "data:image/png;base64,AAAA"})
    assert status == 400 and error_of(raw)["code"] == "invalid_image"
    status, _, raw = stack.http("POST", "/v1/screenshots", {"image_url": url}, auth=False)
    assert status == 401
    status, _, raw = api(stack, "GET", "/metrics")
    assert re.search(r'^grounding_screenshot_prefills_total\{model="fake-a",outcome="not_kept"\} [1-9]',
                     raw.decode(), re.M)


# ---- metrics, CORS -------------------------------------------------------------------------------


def test_metrics(stack):
    status, hdrs, raw = api(stack, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    assert re.search(r'^grounding_http_requests_total\{method="POST",route="/v1/chat/completions",status="200"\} \d', text, re.M)
    assert 'grounding_http_request_seconds_bucket{' in text
    assert re.search(r'^grounding_queue_depth\{model="fake-a"\} 0\.0$', text, re.M)
    assert re.search(r'^grounding_model_state\{model="fake-a",state="loaded"\} 1\.0$', text, re.M)
    assert re.search(r'^grounding_model_memory_bytes\{kind="weights",model="fake-a"\} [1-9]', text, re.M)
    assert "grounding_broker_up 1.0" in text
    # answers came straight from the worker (server.direct_answers), and every second copy was
    # recognised, after the hang-ups, deadlines and crashes above too
    assert re.search(r'^grounding_client_events_total\{name="direct_answers"\} [1-9]', text, re.M), text
    assert re.search(r'^grounding_client_events_total\{name="unknown_job"\} 0\.0$', text, re.M)


def test_cors(stack):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    status, hdrs, _ = stack.http("OPTIONS", "/v1/chat/completions", headers=pre, auth=False)   # no key on preflight
    hdrs = {k.lower(): v for k, v in hdrs.items()}
    assert status == 204 and hdrs["access-control-allow-origin"] == ORIGIN
    assert "POST" in hdrs["access-control-allow-methods"] and "authorization" in hdrs["access-control-allow-headers"].lower()
    # the official JS SDK adds its own headers; a preflight asking for them must be granted
    sdk = "authorization, content-type, x-stainless-os, x-stainless-retry-count, openai-organization"
    _, hdrs, _ = stack.http("OPTIONS", "/v1/chat/completions", auth=False,
                            headers={**pre, "Access-Control-Request-Headers": sdk})
    assert {"x-stainless-os", "openai-organization"} <= {
        h.strip().lower() for h in {k.lower(): v for k, v in hdrs.items()}["access-control-allow-headers"].split(",")}
    _, hdrs, _ = stack.http("OPTIONS", "/v1/chat/completions", auth=False,
                            headers={**pre, "Access-Control-Request-Headers": "x-a, (bad)"})
    assert {k.lower(): v for k, v in hdrs.items()}["access-control-allow-headers"] == "Authorization, Content-Type"
    _, hdrs, _ = api(stack, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert hdrs["access-control-allow-origin"] == ORIGIN
    _, hdrs, _ = api(stack, "GET", "/v1/models", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in hdrs and hdrs["vary"] == "Origin"
    assert api(stack, "GET", "/v1/models")[1]["vary"] == "Origin"   # caches must key on Origin
    status, hdrs, _ = stack.http("OPTIONS", "/v1/chat/completions", auth=False,
                                 headers={**pre, "Origin": "http://evil.test"})
    hdrs = {k.lower(): v for k, v in hdrs.items()}
    assert status == 204 and not any(k.startswith("access-control-") for k in hdrs)
    # error answers carry CORS headers too, or a cross-origin page could not read why it failed
    for path, auth, want in (("/v1/models", False, 401), ("/v1/nope", True, 404)):
        status, hdrs, _ = stack.http("GET", path, headers={"Origin": ORIGIN}, auth=auth)
        hdrs = {k.lower(): v for k, v in hdrs.items()}
        assert status == want and hdrs["access-control-allow-origin"] == ORIGIN
        assert "Retry-After" in hdrs["access-control-expose-headers"]
    text = api(stack, "GET", "/metrics")[2].decode()   # preflights and errors leave no request in flight
    assert re.search(r"^grounding_http_inflight_requests 1\.0$", text, re.M)


# ---- the frontend alone: broker unreachable ------------------------------------------------------


def test_broker_unreachable_is_503(tmp_path):
    s = Stack(tmp_path, {"models": {"m": fake_model()}})   # writes the config; we start the frontend only
    proc = subprocess.Popen([sys.executable, "-m", "frontend", "--config", str(s.config_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, hdrs, raw = s.http("GET", "/v1/health", timeout_s=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "frontend did not start"
                time.sleep(0.1)
        assert status == 503 and json.loads(raw)["broker"] == {"reachable": False, "rtt_ms": None}
        body = {"messages": messages()}
        status, hdrs, raw = s.http("POST", "/v1/chat/completions", body)
        assert status == 503 and error_of(raw)["code"] == "broker_unavailable" and hdrs["Retry-After"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- several Sanic worker processes --------------------------------------------------------------


def test_two_frontend_workers(tmp_path):
    """server.workers: 2 -- each process has its own broker connection; both serve, a hang-up in
    either cancels its job, and SIGTERM stops both gracefully."""
    config = {"server": {"workers": 2}, "models": {"fake-a": fake_model(max_batch=1)}}
    s = Stack(tmp_path, config)
    try:
        s.start(ready_timeout_s=60, loaded=("fake-a",))
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: s.http("POST", "/v1/chat/completions", {"messages": messages()}),
                                    range(16)))
        assert [r[0] for r in results] == [200] * 16
        status, _, raw = s.http("POST", "/v1/chat/completions", {"messages": messages(), "stream": True})
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        cancels0 = s.query("mmi.stats")["counters"].get("cancels_total", 0)
        body = json.dumps({"messages": messages(), "fake": {"sleep_ms": 1500}}).encode()
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", s.config["server"]["port"]), timeout=5) as conn:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                time.sleep(0.3)
        deadline = time.monotonic() + 5
        while s.query("mmi.stats")["counters"].get("cancels_total", 0) < cancels0 + 2:
            assert time.monotonic() < deadline, "a hang-up did not cancel its job"
            time.sleep(0.05)
    finally:
        s.stop()
    log = s.log()
    assert len(set(re.findall(r"Worker complete \[(\d+)\]", log))) == 2, log[-3000:]
