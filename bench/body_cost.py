"""What a large screenshot body costs on its way through the serving path, stage by stage.

    python -m bench.body_cost [--n 60]

Starts the whole stack with the fake engine (no model work, no decode), then times, for a plain and
a busy 1080p PNG (bench.screens; ~38 KB and ~590 KB) sent as the OpenAI API's base64 data URL:
- the same body naming a model that does not exist: HTTP transport and the JSON parse (404), sent
  by http.client and, to tell the client's share from the server's, as one `sendall` of a raw
  socket with TCP_NODELAY;
- the same body with the PNG's header declaring more pixels than allowed: + the data URL's base64
  decode and the header check (413);
- the whole request (fake engine, 200);
- the same job through the Python ZMQ client (common.client.Client.ground): no HTTP, no JSON, no
  base64, the image's bytes as a frame.
Also the frontend's parts in this process: json.loads of the body and the data URL decode, and both
as the frontend does them now (frontend/json_body.py: the payload decoded outside the JSON scanner).
Medians of --n keep-alive requests after 5 warm-ups, ms.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import struct
import tempfile
import zlib
from pathlib import Path

from bench.e2e import request_body
from bench.prep_profile import med
from bench.screens import encoded
from common.client import Client
from frontend import json_body
from frontend.openai_api import decode_data_url
from tests.stackutil import Stack, fake_model


def median_ms(fn, n: int) -> float:
    """`med` of n calls after 5 untimed ones (the connection and its TCP window warmed up)."""
    for _ in range(5):
        fn()
    return med(fn, n)


def post(conn: http.client.HTTPConnection, body: bytes, want: int) -> None:
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != want:
        raise RuntimeError(f"HTTP {resp.status}, wanted {want}: {data[:200]!r}")


class RawPost:
    """POSTs as one sendall on a keep-alive socket with Nagle off; reads the whole answer."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __call__(self, body: bytes) -> None:
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, rest = buf.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


def too_many_pixels(png: bytes) -> bytes:
    """The PNG with its IHDR declaring 60000 x 60000 pixels (checksum fixed): refused from the header."""
    ihdr = bytearray(png[12:29])
    ihdr[4:12] = struct.pack(">II", 60000, 60000)
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def _image_url(body: dict) -> str:
    """The image part's URL of a request_body."""
    (part,) = (p for p in body["messages"][-1]["content"] if p.get("type") == "image_url")
    return part["image_url"]["url"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), {"models": {"fake-x": fake_model()}})
        with stack.start(loaded=("fake-x",)):
            conn = http.client.HTTPConnection("127.0.0.1", stack.config["server"]["port"], timeout=60)
            raw = RawPost(stack.config["server"]["port"])
            zmq_client = Client(stack.config["broker"]["client_endpoint"])
            print("| screenshot | PNG KB | body KB | json.loads | data URL decode | json_body.loads + decode | "
                  "HTTP + JSON (404) | the same, raw socket | + base64 + header (413) | whole request (200) | "
                  "ZMQ client |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for busy in (False, True):
                png = encoded(1920, 1080, 7, "png", busy)
                body = request_body("fake-x", png, "click Button 1")
                url = "data:image/png;base64," + base64.b64encode(png).decode()
                huge = request_body("fake-x", too_many_pixels(png), "click Button 1")
                nowhere = request_body("no-such-model", png, "click Button 1")
                cols = [
                    median_ms(lambda: json.loads(body), a.n),
                    median_ms(lambda: decode_data_url(url, max_bytes=1 << 30, param="p"), a.n),
                    median_ms(lambda: decode_data_url(_image_url(json_body.loads(body)), max_bytes=1 << 30,
                                                      param="p"), a.n),
                    median_ms(lambda: post(conn, nowhere, 404), a.n),
                    median_ms(lambda: raw(nowhere), a.n),
                    median_ms(lambda: post(conn, huge, 413), a.n),
                    median_ms(lambda: post(conn, body, 200), a.n),
                    median_ms(lambda: zmq_client.ground("fake-x", png, "click Button 1"), a.n),
                ]
                print(f"| {'busy' if busy else 'plain'} | {len(png) // 1024} | {len(body) // 1024} | "
                      + " | ".join(f"{c:.2f}" for c in cols) + " |", flush=True)
            zmq_client.close()
            raw.close()
            conn.close()


if __name__ == "__main__":
    main()
