"""The bad-input table of issue 3 against the real stack: every row gets the right 4xx in OpenAI's
error shape, and the server stays healthy (a good request still succeeds afterwards).

Decisions: a 1x1 image is valid (smart_resize scales it up to the minimum area); the frontend
rejects by header (format, truncated header, zero bytes, pixel cap, aspect ratio over 200) and the
worker rejects what only decoding can find. These rows test the frontend, so the fake engine
serves (fast, no model work); the fake engine reads headers only, so a PNG cut in its pixel data
is a worker-side case: tests/test_e2e_tiny.py sends it to the real MLX engine (400 invalid_image),
along with a 1x1 image, JPEG and WebP."""
from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import zlib

import pytest
from PIL import Image

from tests.stackutil import Stack, fake_model
from tests.pngs import png

MiB = 1024 * 1024
CONFIG = {
    "server": {"max_body_bytes": 16 * MiB, "max_image_bytes": 8 * MiB, "max_image_pixels": 8192 * 8192},
    "models": {"fake-a": fake_model()},
}


def real_png(w=320, h=200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def png_with_dims(w: int, h: int, rows: int = 1) -> bytes:
    """A valid PNG header declaring w x h (8-bit grey) with `rows` rows of real zero pixel data:
    rows == h is a complete, genuinely decodable decompression bomb."""
    z = zlib.compressobj(9)
    row = b"\0" * (w + 1)   # filter byte + w grey pixels
    idat = b"".join(z.compress(row) for _ in range(rows)) + z.flush()
    return png(struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0), idat)


def url_of(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(image_url=None, text="click OK", **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"model": "fake-a", "messages": [{"role": "user", "content": content}], **extra}


GOOD = real_png()
BAD_INPUTS = {
    # name: (body, status, code)
    "invalid base64": (chat("data:image/png;base64,!!!not-base64!!!"), 400, "invalid_image"),
    "base64 of garbage": (chat(url_of(b"hello, this is not an image")), 400, "invalid_image"),
    "truncated PNG header": (chat(url_of(GOOD[:20])), 400, "invalid_image"),
    "zero bytes": (chat("data:image/png;base64,"), 400, "invalid_image"),
    "20000x20000 PNG header": (chat(url_of(png_with_dims(20000, 20000))), 413, "payload_too_large"),
    "aspect ratio 1:500": (chat(url_of(real_png(1, 500))), 400, "invalid_image"),
    "text-only message": (chat(None), 400, "bad_request"),
    "plain string content": ({"messages": [{"role": "user", "content": "click OK"}]}, 400, "bad_request"),
    "two images": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "click"}, {"type": "image_url", "image_url": {"url": url_of(GOOD)}},
        {"type": "image_url", "image_url": {"url": url_of(GOOD)}}]}]}, 400, "bad_request"),
    "image without text": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url_of(GOOD)}}]}]}, 400, "bad_request"),
    "local file path": (chat("/etc/passwd"), 400, "invalid_image"),
    "file URL": (chat("file:///etc/passwd"), 400, "invalid_image"),
    "remote URL (disabled)": (chat("http://127.0.0.1:1/x.png"), 400, "invalid_image"),
    "messages not a list": ({"messages": {"role": "user"}}, 400, "bad_request"),
    "content is a number": ({"messages": [{"role": "user", "content": 7}]}, 400, "bad_request"),
    "image_url is a number": (chat(5), 400, "bad_request"),
    "model is a list": (chat(url_of(GOOD), model=["fake-a"]), 400, "bad_request"),
    "stream is a string": (chat(url_of(GOOD), stream="true"), 400, "bad_request"),
    "top_k too big": (chat(url_of(GOOD), top_k=1000), 400, "bad_request"),
    "unknown profile": (chat(url_of(GOOD), profile="ludicrous"), 400, "bad_request"),
    "body is a list": ([1, 2, 3], 400, "bad_request"),
    "invalid JSON": (b'{"messages": [', 400, "bad_request"),
    "empty body": (b"", 400, "bad_request"),
    "deeply nested JSON (100k)": (b"[" * 100_000 + b"]" * 100_000, 400, "bad_request"),
    "nested JSON (depth 200)": (json.dumps(chat(url_of(GOOD), metadata=json.loads("[" * 200 + "]" * 200))).encode(),
                                400, "bad_request"),
    "image over max_image_bytes": (chat(url_of(b"\x89PNG" + b"\0" * (9 * MiB))), 413, "payload_too_large"),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("bad"), CONFIG)
    try:
        s.start(ready_timeout_s=60, loaded=("fake-a",))
        yield s
    finally:
        s.stop()


def error_of(raw: bytes) -> dict:
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def assert_healthy(stack):
    status, _, raw = stack.http("POST", "/v1/chat/completions", chat(url_of(GOOD)))
    assert status == 200, raw[:500]
    assert json.loads(raw)["choices"][0]["message"]["content"].startswith("pyautogui.click(")


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(stack, name):
    body, status, code = BAD_INPUTS[name]
    got, _, raw = stack.http("POST", "/v1/chat/completions", body)
    err = error_of(raw)
    assert (got, err["code"]) == (status, code), err
    assert err["type"] == "invalid_request_error" and err["message"]
    assert_healthy(stack)


def test_one_pixel_image_is_valid(stack):
    status, _, raw = stack.http("POST", "/v1/chat/completions", chat(url_of(real_png(1, 1))))
    assert status == 200, raw
    msg = json.loads(raw)["choices"][0]["message"]
    assert msg["content"] == "pyautogui.click(x=0, y=0)" and msg["grounding"]["image_size"] == [1, 1]
    assert msg["grounding"]["resized_size"][0] >= 28


def test_jpeg_and_webp_are_accepted(stack):
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (1, 2, 3)).save(buf, fmt)
        status, _, raw = stack.http("POST", "/v1/chat/completions", chat(url_of(buf.getvalue(), mime)))
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["grounding"]["image_size"] == [300, 200]


def _raw_request(port: int, head: bytes, body: bytes = b"", read_timeout_s: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as s:
        s.sendall(head)
        try:
            s.sendall(body)
        except OSError:   # the server may answer 413 and close before reading the body
            pass
        out = b""
        while b"\r\n\r\n" not in out or not out.split(b"\r\n\r\n", 1)[1].strip().endswith(b"}"):
            piece = s.recv(65536)
            if not piece:
                break
            out += piece
        return out


def test_50_mb_body_is_413(stack):
    port = stack.config["server"]["port"]
    size = 50 * 1000 * 1000
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size)
    out = _raw_request(port, head, b'{"messages": "' + b"A" * (size - 16) + b'"}')
    assert out.startswith(b"HTTP/1.1 413"), out[:300]
    assert error_of(out.split(b"\r\n\r\n", 1)[1])["code"] == "payload_too_large"
    assert_healthy(stack)


def _count_413(stack) -> float:
    text = stack.http("GET", "/metrics")[2].decode()
    m = re.search(r'^grounding_http_requests_total\{method="POST",route="/v1/chat/completions",status="413"\} '
                  r'(\S+)$', text, re.M)
    return float(m[1]) if m else 0.0


def test_chunked_body_over_limit_is_413(stack):
    port = stack.config["server"]["port"]
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"A" * MiB
    body = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
    before = _count_413(stack)
    out = _raw_request(port, head, body)
    assert out.startswith(b"HTTP/1.1 413"), out[:300]
    assert_healthy(stack)
    # the body is read while routing, before the middleware: the 413 must still be counted
    # once and not left in flight (the gauge would creep up forever)
    assert _count_413(stack) == before + 1
    metrics = stack.http("GET", "/metrics")[2].decode()
    assert re.search(r"^grounding_http_inflight_requests 1\.0$", metrics, re.M), metrics[:3000]


def test_decompression_bomb(stack):
    """A real, fully decodable 10000x10000 PNG (~100 KB compressed, 100 MP decoded): the frontend
    refuses it from the header (413); sent to the broker directly, the worker refuses it too."""
    from common.client import Client
    from common.errors import ServerError
    bomb = png_with_dims(10_000, 10_000, rows=10_000)
    assert len(bomb) < 1 * MiB
    status, _, raw = stack.http("POST", "/v1/chat/completions", chat(url_of(bomb)))
    assert status == 413 and error_of(raw)["code"] == "payload_too_large"
    with Client(stack.client_endpoint) as c:
        with pytest.raises(ServerError) as ei:
            c.ground("fake-a", bomb, "click OK", ttl_s=10)
    assert ei.value.code == "payload_too_large" and ei.value.http_status == 413
    assert_healthy(stack)


def test_big_valid_body_is_served(stack):
    """Bodies over 1 MiB are parsed in a thread (frontend/routes.OFFLOAD_BYTES): same answers."""
    import os
    buf = io.BytesIO()
    Image.frombytes("RGB", (900, 700), os.urandom(900 * 700 * 3)).save(buf, "PNG")
    assert len(buf.getvalue()) > 1024 * 1024
    status, _, raw = stack.http("POST", "/v1/chat/completions", chat(url_of(buf.getvalue())))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["grounding"]["image_size"] == [900, 700]
    status, _, raw = stack.http("POST", "/v1/chat/completions", chat(url_of(buf.getvalue()), top_k="x"))
    assert status == 400 and error_of(raw)["param"] == "top_k"
