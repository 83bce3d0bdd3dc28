"""Fetching http(s) image URLs, only when server.allow_remote_images is on.

Bounded in every direction: host allowlist (redirect targets included), total time, bytes. Runs
urllib in a thread so the event loop never blocks. Local paths and other schemes never get here.
With an empty allowlist ("any host") only hosts whose every address is public are fetched, so a
request cannot make the server read loopback, private-network or cloud-metadata URLs (SSRF); an
explicit allowlist is the operator's choice and may name internal hosts. (A DNS answer that
changes between the check and the connection is not covered; list hosts to be sure.)
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from common.config import ServerConfig
from common.errors import ServerError

CHUNK = 64 * 1024


def host_allowed(url: str, allowlist: list) -> bool:
    """http(s) only; with a non-empty allowlist the host must be listed (exact match)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return not allowlist or parts.hostname.lower() in {h.lower() for h in allowlist}


def public_host(url: str) -> bool:
    """True when every address the URL's host resolves to is globally routable."""
    parts = urllib.parse.urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addrs = {ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}
    return bool(addrs) and all(a.is_global for a in addrs)


def _check_target(url: str, allowlist: list) -> None:
    if not host_allowed(url, allowlist):
        raise urllib.error.URLError(f"the host of {url} is not allowed")
    if not allowlist and not public_host(url):
        raise urllib.error.URLError(f"the host of {url} is not a public address "
                                    "(list internal hosts in server.remote_image_allowlist)")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowlist: list):
        self.allowlist = allowlist

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 (urllib API)
        _check_target(newurl, self.allowlist)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_sync(url: str, cfg: ServerConfig, param: str) -> bytes:
    deadline = time.monotonic() + cfg.remote_image_timeout_s
    opener = urllib.request.build_opener(_CheckedRedirects(cfg.remote_image_allowlist))
    req = urllib.request.Request(url, headers={"User-Agent": "gui-grounding-server", "Accept": "image/*"})
    try:
        _check_target(url, cfg.remote_image_allowlist)
        with opener.open(req, timeout=cfg.remote_image_timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_image_bytes:
                raise ServerError("payload_too_large", f"the remote image is {length} bytes; the limit is "
                                  f"{cfg.max_image_bytes} (server.max_image_bytes)", param=param)
            buf = bytearray()
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError("too slow")
                piece = resp.read(CHUNK)
                if not piece:
                    return bytes(buf)
                buf += piece
                if len(buf) > cfg.max_image_bytes:
                    raise ServerError("payload_too_large", f"the remote image exceeds {cfg.max_image_bytes} "
                                      "bytes (server.max_image_bytes)", param=param)
    except ServerError:
        raise
    except (OSError, ValueError, urllib.error.URLError) as exc:   # includes timeouts and HTTP errors
        raise ServerError("invalid_image", f"could not fetch the image URL: {exc}", param=param) from None


async def fetch_image(url: str, cfg: ServerConfig, param: str = "messages") -> bytes:
    """The bytes at `url`. 400 invalid_image when refused or unreachable, 413 over the byte cap."""
    if not host_allowed(url, cfg.remote_image_allowlist):
        raise ServerError("invalid_image", "the image URL's host is not in server.remote_image_allowlist",
                          param=param)
    return await asyncio.get_running_loop().run_in_executor(None, _fetch_sync, url, cfg, param)
