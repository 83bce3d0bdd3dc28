"""Pure tests of the frontend's request validation, image header sniffing and response builders."""
import base64
import binascii
import io
import json
import random
import struct
import zlib

import pytest
from PIL import Image

from common.config import parse_config
from common.errors import ServerError
from frontend import openai_api as api
from frontend import sse
from frontend.images import sniff
from tests import pngs

CFG = parse_config({
    "server": {"default_model": "m1", "max_image_bytes": 1_000_000, "max_image_pixels": 4096 * 4096},
    "models": {"m1": {"path": "x", "engine": "fake"}, "m2": {"path": "y", "engine": "mlx"}},
    "profiles": {"tiny": {"max_pixels": 100_000, "min_pixels": 10_000}},
})


def png(w=64, h=48, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR declaring w x h, and a tiny IDAT: cheap huge 'images'."""
    return pngs.png(struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0), zlib.compress(b"\0" * 64))


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def body(text="click the red button", image=None, **extra):
    image = png() if image is None else image
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return {"messages": [{"role": "user", "content": content}], **extra}


def err(fn, *a, **kw) -> ServerError:
    with pytest.raises(ServerError) as ei:
        fn(*a, **kw)
    return ei.value


# ---- image headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kw,name", [("PNG", {}, "png"), ("JPEG", {}, "jpeg"), ("WEBP", {}, "webp"),
                                         ("WEBP", {"lossless": True}, "webp")])
def test_sniff_real_images(fmt, kw, name):
    info = sniff(png(123, 45, fmt, **kw), max_pixels=10**8)
    assert (info.format, info.width, info.height) == (name, 123, 45)


def test_sniff_webp_extended_and_progressive_jpeg():
    buf = io.BytesIO()
    Image.new("RGBA", (77, 33), (1, 2, 3, 100)).save(buf, "WEBP", exif=b"Exif\0\0" + b"\0" * 20)
    assert (sniff(buf.getvalue(), max_pixels=10**8).width, sniff(buf.getvalue(), max_pixels=10**8).height) == (77, 33)
    prog = png(99, 66, "JPEG", progressive=True)
    assert sniff(prog, max_pixels=10**8).width == 99


@pytest.mark.parametrize("data,why", [
    (b"", "empty"), (b"\x89PNG\r\n\x1a\n\0\0", "truncated"), (png()[:30], "truncated"),
    (b"GIF89a" + b"\0" * 40, "not a PNG"), (b"hello", "too short"),
    (png_header(10, 10)[:29] + b"\0\0\0\0" + png_header(10, 10)[33:], "checksum"),
    (png(10, 10, "JPEG")[:20], "JPEG"), (png(10, 10, "WEBP")[:20], "WebP"),
    (png_header(0, 10), "0x10"), (png_header(1, 300), "aspect"),
])
def test_sniff_rejects_with_400(data, why):
    e = err(sniff, data, max_pixels=10**8)
    assert e.code == "invalid_image" and e.http_status == 400 and why in e.message


def test_sniff_pixel_cap_is_413_and_1x1_is_fine():
    e = err(sniff, png_header(20000, 20000), max_pixels=16384 * 16384)
    assert e.http_status == 413 and "20000x20000" in e.message
    assert sniff(png_header(1, 1), max_pixels=10).width == 1


# ---- data URLs and bodies ------------------------------------------------------------------------


def test_data_url_decoding():
    raw = png()
    assert api.decode_data_url(data_url(raw), max_bytes=10**6, param="p") == raw
    wrapped = data_url(raw).replace("base64,", "base64,\n")
    assert api.decode_data_url(wrapped, max_bytes=10**6, param="p") == raw
    for bad_url in ("data:image/png,abc", "data:image/png;base64,@@@@", "data:image/png;base64,abc",
                    "datum:x"):
        e = err(api.decode_data_url, bad_url, max_bytes=10**6, param="p")
        assert (e.http_status, e.param) == (400, "p")
    e = err(api.decode_data_url, data_url(b"x" * 5000), max_bytes=1000, param="p")
    assert e.http_status == 413


def test_base64_decoding_gives_the_standard_librarys_verdicts_and_bytes():
    """pybase64 decodes; where it is stricter (excess padding) or line breaks wrap the text, the
    standard library decides: so what a client's data URL means did not change with it."""
    def std(text):
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            return "refused"

    def ours(text):
        try:
            return api._b64decode(text)
        except (binascii.Error, ValueError):
            return "refused"

    rng = random.Random(3)
    texts = ["", "====", "abcd=", "abcd==", "ab=c", "\u00e9", "YWJj\nZGVm", "YWJj\r\n", " YW Jj "]
    texts += ["".join(rng.choice("AByz09+/= \n-_!") for _ in range(rng.randint(0, 14))) for _ in range(5000)]
    texts += [base64.b64encode(rng.randbytes(rng.randint(0, 50))).decode() for _ in range(500)]
    assert [ours(t) for t in texts] == [std(t) for t in texts]
    assert sum(std(t) == "refused" for t in texts) > 1000 and any(std(t) == b"i\xb7\x1d" for t in texts[:5])


def test_parse_happy_path_and_params():
    req = api.parse_chat_request(body(temperature=0.3, max_tokens=5, top_k=5, return_attention=True,
                                      max_context=4096), CFG)
    assert req.model == "m1" and not req.stream and req.image == png()
    assert req.image_info.format == "png"
    assert req.params == {"instruction": "click the red button", "system": None, "topk": 5,
                          "max_pixels": None, "min_pixels": None, "return_attention": True}
    req = api.parse_chat_request(body(model="m2", profile="tiny", topk=2, stream=True,
                                      stream_options={"include_usage": True}), CFG)
    assert req.model == "m2" and req.stream and req.include_usage
    assert (req.params["max_pixels"], req.params["min_pixels"], req.params["topk"]) == (100_000, 10_000, 2)
    req = api.parse_chat_request(body(profile="tiny", max_pixels=200_000), CFG)
    assert req.params["max_pixels"] == 200_000   # explicit beats the profile


def test_system_message_replaces_prompt_and_last_user_wins():
    b = body("find OK")
    b["messages"] = [{"role": "system", "content": "You are a pointer."},
                     {"role": "user", "content": "earlier turn"},
                     {"role": "assistant", "content": "pyautogui.click(x=1, y=2)"}] + b["messages"]
    req = api.parse_chat_request(b, CFG)
    assert req.params["system"] == "You are a pointer." and req.params["instruction"] == "find OK"


@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": []}, "functions"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
])
def test_unsupported_parameters_are_named(extra, param):
    e = err(api.parse_chat_request, body(**extra), CFG)
    assert (e.code, e.param, e.http_status) == ("unsupported_parameter", param, 400)


def test_harmless_parameters_accepted():
    api.parse_chat_request(body(n=1, response_format={"type": "text"}, temperature=0, top_p=1, seed=3,
                                user="u", presence_penalty=0, stop=["x"]), CFG)
    api.parse_chat_request(body(temperature=2.0, top_p=0.5, frequency_penalty=-2, max_tokens=1,
                                max_completion_tokens=4096, seed=-7, stop="\n"), CFG)
    api.parse_chat_request(body(temperature=None, top_p=None, max_tokens=None, stop=None, user=None), CFG)


@pytest.mark.parametrize("extra,param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": "0"}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10.5}, "max_tokens"),
    ({"max_completion_tokens": "5"}, "max_completion_tokens"), ({"seed": 1.5}, "seed"),
    ({"stop": 5}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ["a", 1]}, "stop"),
    ({"user": 42}, "user"),
])
def test_ignored_sampling_parameters_are_still_checked(extra, param):
    """OpenAI answers `temperature: "hot"` with a 400; taking it silently would hide the client's bug."""
    e = err(api.parse_chat_request, body(**extra), CFG)
    assert (e.code, e.param, e.http_status) == ("bad_request", param, 400), e.message


def _msgs(content):
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("b,param,code", [
    ([], None, "bad_request"), ({"messages": "hi"}, "messages", "bad_request"),
    ({"messages": []}, "messages", "bad_request"),
    (_msgs("just text"), "messages[0].content", "bad_request"),
    (_msgs(42), "messages[0].content", "bad_request"),
    (_msgs([{"type": "image_url", "image_url": {"url": data_url(png())}}] * 2 + [{"type": "text", "text": "a"}]),
     "messages[0].content", "bad_request"),
    (_msgs([{"type": "image_url", "image_url": {"url": data_url(png())}}]), "messages[0].content", "bad_request"),
    (_msgs([{"type": "audio", "x": 1}]), "messages[0].content[0].type", "bad_request"),
    (_msgs([{"type": "text", "text": 5}]), "messages[0].content[0].text", "bad_request"),
    (_msgs([{"type": "image_url", "image_url": {"url": 5}}]), "messages[0].content[0].image_url.url", "bad_request"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "bad_request"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages", "bad_request"),
    (body(model=3), "model", "bad_request"), (body(model="nope"), "model", "unknown_model"),
    (body(stream="yes"), "stream", "bad_request"),
    (body(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "bad_request"),
    (body(stream_options=[]), "stream_options", "bad_request"), (body(top_k=0), "top_k", "bad_request"),
    (body(top_k="3"), "top_k", "bad_request"), (body(topk=101), "topk", "bad_request"),
    (body(top_k=1, topk=1), "topk", "bad_request"), (body(max_pixels=10), "max_pixels", "bad_request"),
    (body(max_pixels=10_000, min_pixels=20_000), "min_pixels", "bad_request"),
    (body(profile="ultra"), "profile", "bad_request"), (body(return_attention="yes"), "return_attention", "bad_request"),
    (body(timeout_s=0), "timeout_s", "bad_request"), (body(max_context=0), "max_context", "bad_request"),
    (body(model="m2", fake={"crash": True}), "fake", "unsupported_parameter"),
    (body(image=b"not an image at all"), "messages[0].content[1].image_url.url", "invalid_image"),
    (body(image=png_header(5000, 5000)), "messages[0].content[1].image_url.url", "payload_too_large"),
])
def test_bad_requests_name_the_param(b, param, code):
    e = err(api.parse_chat_request, b, CFG)
    assert (e.param, e.code) == (param, code), e.message


def test_image_url_schemes():
    for url, why in [("https://example.com/a.png", "remote image URLs are disabled"),
                     ("file:///etc/passwd", "local paths are refused"), ("/etc/passwd", "local paths")]:
        b = body()
        b["messages"][0]["content"][1]["image_url"]["url"] = url
        e = err(api.parse_chat_request, b, CFG)
        assert e.http_status == 400 and why in e.message
    remote = parse_config({"server": {"allow_remote_images": True}, "models": {"m": {"path": "x"}}})
    b = body()
    b["messages"][0]["content"][1]["image_url"]["url"] = "https://example.com/a.png"
    req = api.parse_chat_request(b, remote)
    assert req.image is None and req.image_url == "https://example.com/a.png"


def test_depth_guard():
    deep: list = []
    cur = deep
    for _ in range(100):
        cur.append([])
        cur = cur[0]
    e = err(api.check_depth, {"messages": deep})
    assert e.http_status == 400 and "nests deeper" in e.message
    api.check_depth(body())   # a normal body passes
    e = err(api.parse_chat_request, body(metadata=deep), CFG)
    assert "nests deeper" in e.message


def test_timeout_is_capped_by_config():
    assert api.parse_chat_request(body(timeout_s=5), CFG).ttl_s == 5.0
    assert api.parse_chat_request(body(timeout_s=10**6), CFG).ttl_s == CFG.server.request_timeout_s


def test_screenshot_requests_make_prefill_jobs():
    shot = {"image_url": {"url": data_url(png())}, "system": " Point at things. ", "profile": "tiny",
            "timeout_s": 5}
    req = api.parse_screenshot_request(shot, CFG)
    assert req.model == "m1" and req.image == png() and not req.stream and req.ttl_s == 5.0
    assert req.params == {"prefill": True, "system": "Point at things.", "max_pixels": 100_000,
                          "min_pixels": 10_000}
    # the plain-string form, and the keys a chat request with the same options would give
    plain = api.parse_screenshot_request({"model": "m2", "image_url": data_url(png()), "max_pixels": 50_000}, CFG)
    chat = api.parse_chat_request(body(model="m2", max_pixels=50_000), CFG)
    assert plain.model == "m2" and plain.image == chat.image
    assert {k: plain.params[k] for k in ("system", "max_pixels", "min_pixels")} == \
        {k: chat.params[k] for k in ("system", "max_pixels", "min_pixels")}


@pytest.mark.parametrize("b,param,code", [
    ({}, "image_url", "bad_request"),
    ({"image_url": {"url": 5}}, "image_url.url", "bad_request"),
    ({"image_url": "file:///etc/passwd"}, "image_url", "invalid_image"),
    ({"image_url": "data:image/png;base64,@@"}, "image_url", "invalid_image"),
    ({"image_url": "DATA", "messages": []}, "messages", "unsupported_parameter"),
    ({"image_url": "DATA", "instruction": "click OK"}, "instruction", "unsupported_parameter"),
    ({"image_url": "DATA", "top_k": 3}, "top_k", "unsupported_parameter"),
    ({"image_url": "DATA", "system": ["x"]}, "system", "bad_request"),
    ({"image_url": "DATA", "model": "nope"}, "model", "unknown_model"),
    ({"image_url": "DATA", "max_pixels": 10}, "max_pixels", "bad_request"),
    ({"image_url": "DATA", "profile": "huge"}, "profile", "bad_request"),
    ({"image_url": "DATA", "timeout_s": 0}, "timeout_s", "bad_request"),
])
def test_bad_screenshot_requests_name_the_param(b, param, code):
    b = {k: data_url(png()) if v == "DATA" else v for k, v in b.items()}
    e = err(api.parse_screenshot_request, b, CFG)
    assert (e.param, e.code) == (param, code), e.message
    assert "ask questions with POST /v1/chat/completions" in err(
        api.parse_screenshot_request, {"instruction": "x"}, CFG).message
    assert err(api.parse_screenshot_request, [1], CFG).code == "bad_request"


def test_screenshot_object():
    base = {"image_size": [1920, 1080], "resized_size": [1932, 1092], "grid": [39, 69], "points": []}
    usage = {"prompt_tokens": 2751, "image_tokens": 2691}
    kept = api.screenshot_object(screenshot_id="screenshot-j", model="m1", created=3, result=base,
                                 usage={**usage, "kept_tokens": 2751, "cached_tokens": 0}, timings={"forward": 99.5})
    json.dumps(kept)
    assert kept == {"id": "screenshot-j", "object": "screenshot", "created": 3, "model": "m1", "kept": True,
                    "already_kept": False, "cached_tokens": 2751, "not_kept": None, "image_size": [1920, 1080],
                    "resized_size": [1932, 1092], "grid": [39, 69], "image_tokens": 2691, "prompt_tokens": 2751,
                    "timings": {"forward": 99.5}}
    again = api.screenshot_object(screenshot_id="s", model="m1", created=3, result=base,
                                  usage={**usage, "cached_tokens": 2751, "kept_tokens": 0})
    assert (again["kept"], again["already_kept"], again["cached_tokens"]) == (True, True, 2751)
    off = api.screenshot_object(screenshot_id="s", model="m1", created=3, result={**base, "not_kept": "off"},
                                usage=usage)
    assert (off["kept"], off["already_kept"], off["cached_tokens"], off["not_kept"]) == (False, False, 0, "off")


# ---- responses -----------------------------------------------------------------------------------

RESULT = {"points": [{"x": 1919.7, "y": -3.2, "nx": 0.99, "ny": 0.0, "score": 0.8},
                     {"x": 10.0, "y": 20.0, "nx": 0.005, "ny": 0.02, "score": 0.1}],
          "image_size": [1920, 1080], "resized_size": [1932, 1092], "grid": [2, 3], "attention_blob": 0}


def test_completion_shape_and_coordinates():
    att = struct.pack("<6f", *[0.1, 0.2, 0.3, 0.0, 0.25, 0.15])
    out = api.completion(completion_id="chatcmpl-j1", model="m1", created=7, result=RESULT,
                         usage={"prompt_tokens": 40, "image_tokens": 6}, blobs=[att], return_attention=True)
    json.dumps(out)
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-j1"
    choice = out["choices"][0]
    assert choice["message"]["content"] == "pyautogui.click(x=1919, y=0)"   # rounded and clamped
    assert choice["coordinates"] == {"x": 0.99, "y": 0.0}
    g = choice["message"]["grounding"]
    assert g["points"][1] == {"x": 10.0, "y": 20.0, "nx": 0.005, "ny": 0.02, "score": 0.1}
    assert (g["image_size"], g["resized_size"], g["grid"], g["space"]) == ([1920, 1080], [1932, 1092], [2, 3], "pixels")
    assert g["attention"] == pytest.approx([0.1, 0.2, 0.3, 0.0, 0.25, 0.15])
    assert out["usage"] == {"prompt_tokens": 40, "completion_tokens": 0, "total_tokens": 40,
                            "prompt_tokens_details": {"image_tokens": 6}}
    assert out["timings"] == {} and "prompt_tokens_details" not in api.usage_block({"prompt_tokens": 3})
    no_att = api.completion(completion_id="c", model="m", created=1, result=RESULT, usage={}, blobs=[att],
                            return_attention=False)
    assert "attention" not in no_att["choices"][0]["message"]["grounding"]
    with pytest.raises(ServerError):   # an attention map that does not match the grid is a bug
        api.grounding_block(RESULT, [att[:8]], True)


def test_chunks_and_sse():
    c = api.chunk(completion_id="c", model="m", created=1, delta={"role": "assistant", "content": ""},
                  include_usage=True)
    assert c["object"] == "chat.completion.chunk" and c["usage"] is None and c["choices"][0]["finish_reason"] is None
    u = api.chunk(completion_id="c", model="m", created=1, delta=None, usage={"total_tokens": 3}, include_usage=True)
    assert u["choices"] == [] and u["usage"] == {"total_tokens": 3}
    assert "usage" not in api.chunk(completion_id="c", model="m", created=1, delta={})
    assert "timings" not in c and "timings" not in u
    t = api.chunk(completion_id="c", model="m", created=1, delta={"content": "x"},
                  timings={"forward": 1.5, "total": 2.0, "batch": 1, "note": "x", "flag": True})
    assert t["timings"] == {"forward": 1.5, "total": 2.0, "batch": 1}   # numbers only
    ev = sse.event({"a": "line\nbreak"})
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    assert sse.error_event({"error": {}}).startswith(b"event: error\ndata: ")
    assert sse.DONE == b"data: [DONE]\n\n"


def test_model_object_keeps_status_fields():
    m = api.model_object({"id": "m1", "object": "model", "status": "loaded", "memory": {"weights_bytes": 5}},
                         created=3)
    assert m == {"id": "m1", "object": "model", "created": 3, "owned_by": "gui-grounding-server",
                 "status": "loaded", "memory": {"weights_bytes": 5}}


# ---- remote images (server.allow_remote_images) --------------------------------------------------


@pytest.fixture(scope="module")
def image_server():
    """A loopback HTTP server: /ok.png, /big (over the byte cap), /slow, /redirect (to another host)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://localhost.invalid/ok.png")
                self.end_headers()
                return
            data = {"/ok.png": png(20, 10), "/big": b"\x89PNG" + b"\0" * 5000}.get(self.path, b"x" * 100)
            self.send_response(200 if self.path != "/missing" else 404)
            if self.path != "/big":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.path == "/slow":
                time.sleep(1.5)
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_remote_images(image_server):
    import asyncio

    from frontend.remote import fetch_image, host_allowed
    server = parse_config({"server": {"allow_remote_images": True, "remote_image_allowlist": ["127.0.0.1"],
                                      "remote_image_timeout_s": 0.5, "max_image_bytes": 1000},
                           "models": {"m": {"path": "x"}}}).server
    assert host_allowed("https://127.0.0.1/x", ["127.0.0.1"]) and not host_allowed("https://evil.test/x", ["a"])
    assert not host_allowed("ftp://127.0.0.1/x", []) and host_allowed("http://any.test/x", [])
    got = asyncio.run(fetch_image(f"{image_server}/ok.png", server))
    assert got == png(20, 10)
    for path, status, why in [("/big", 413, "exceeds"), ("/slow", 400, "could not fetch"),
                              ("/redirect", 400, "not allowed"), ("/missing", 400, "404")]:
        with pytest.raises(ServerError) as ei:
            asyncio.run(fetch_image(f"{image_server}{path}", server))
        assert ei.value.http_status == status and why in ei.value.message, ei.value.message
    with pytest.raises(ServerError) as ei:
        asyncio.run(fetch_image("http://localhost:1/x.png", server))
    assert "allowlist" in ei.value.message
    # no allowlist ("any host"): only public addresses, or any request could read internal URLs
    anyhost = parse_config({"server": {"allow_remote_images": True, "remote_image_timeout_s": 0.5},
                            "models": {"m": {"path": "x"}}}).server
    for url in (f"{image_server}/ok.png", "http://localhost:1/x.png", "http://[::1]:1/x.png",
                "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.png"):
        with pytest.raises(ServerError) as ei:
            asyncio.run(fetch_image(url, anyhost))
        assert ei.value.http_status == 400 and "not a public address" in ei.value.message, ei.value.message
    from frontend.remote import public_host
    assert public_host("http://8.8.8.8/x.png") and not public_host("http://192.168.1.1/")
