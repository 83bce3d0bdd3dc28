"""Request bodies as JSON, with a screenshot's base64 kept out of the JSON scanner.

Why: a realistic 1080p screenshot (text and photos) is a ~780 KB base64 string in the body, and
`json.loads` walks it a character at a time: 1.5-1.6 ms on an H200 host's CPU, and 2.6 ms from the
handler's start to the parsed request inside the running stack, against 0.26 for a plain screenshot
(bench/RESULTS.md, twenty-ninth session). pybase64 checks and decodes the same payload in ~0.1 ms.

So each long payload after `;base64,` that is strict base64 is cut out of the body before parsing,
decoded once, and put back into the parsed value as a `DataURL`: the very string json.loads gives,
carrying the decoded bytes, so the data URL is not decoded again (frontend/openai_api.py). The
value equals `json.loads(body)` exactly:
- strict base64 holds no quote, backslash or control character, so inside a JSON string it stands
  for itself, and the first quote after it closes that string;
- anything else (escapes such as `\\/`, wrapped lines, a short payload) is left to json.loads;
- if the shortened body does not parse, or a payload does not come back at the end of a string
  value (it was in an object key, or outside any string), the body is parsed as it came, so errors
  read exactly as json.loads's.

(Tried once before, in the eighth session, and reverted: on that host json.loads took 0.1-0.4 ms
inside the stack. This one also hands the decoded bytes on, where that one decoded them twice.)
"""
from __future__ import annotations

import binascii
import json
import secrets
from typing import Any

import pybase64

MARKER = b";base64,"
MIN_LIFT = 4096       # shorter payloads cost json.loads next to nothing
MAX_DEPTH = 64        # deeper values go to json.loads whole (and are refused by openai_api.check_depth)
_TOKEN = secrets.token_hex(16)   # stands in for a payload; unguessable, so no body holds it


class DataURL(str):
    """A string of a parsed body that ends in a base64 payload: `data` is the payload decoded,
    `payload_at` where the payload starts in the string."""

    data: bytes
    payload_at: int

    def __new__(cls, text: str, payload_at: int, data: bytes) -> "DataURL":
        self = super().__new__(cls, text)
        self.data, self.payload_at = data, payload_at
        return self


def loads(body: bytes) -> Any:
    """`json.loads(body)`, with long base64 payloads decoded outside the JSON scanner and returned
    as `DataURL`s."""
    parts: list[bytes] = []
    payloads: dict[str, tuple[int, int, bytes]] = {}
    view, start = memoryview(body), 0
    at = body.find(MARKER)
    while at >= 0:
        begin = at + len(MARKER)
        end = body.find(b'"', begin)
        if end < 0:
            break
        data = _strict_base64(view[begin:end]) if end - begin >= MIN_LIFT else None
        if data is not None:
            token = f"{_TOKEN}{len(payloads)}"
            parts += [body[start:begin], token.encode()]
            payloads[token] = (begin, end, data)
            start = end
        at = body.find(MARKER, end)
    if not payloads:
        return json.loads(body)
    parts.append(body[start:])
    try:
        value = json.loads(b"".join(parts))
    except ValueError:
        return json.loads(body)          # the same error, at its real position
    restored: list[str] = []
    try:
        value = _restore(value, view, payloads, restored, MAX_DEPTH)
    except _TooDeep:
        return json.loads(body)
    return value if sorted(restored) == sorted(payloads) else json.loads(body)


class _TooDeep(Exception):
    pass


def _strict_base64(span: memoryview) -> bytes | None:
    try:
        return pybase64.b64decode(span, validate=True)
    except (binascii.Error, ValueError):
        return None


def _joined(head: str, body: memoryview, begin: int, end: int) -> str:
    """head + the body's payload bytes [begin, end) as text: in one copy where the body holds head
    just before the payload as it is (no escapes: the usual "data:image/png;base64,"), else two."""
    raw = head.encode("utf-8", "surrogatepass")
    if begin >= len(raw) and body[begin - len(raw):begin] == raw:
        return str(body[begin - len(raw):end], "utf-8", "surrogatepass")   # as json.loads decodes
    return head + str(body[begin:end], "ascii")


def _restore(value: Any, body: memoryview, payloads: dict[str, tuple[int, int, bytes]], restored: list[str],
             depth: int) -> Any:
    """`value` with each string that ends in a token given its payload back (its token appended
    to `restored`)."""
    if isinstance(value, str):
        cut = value.rfind(_TOKEN)
        found = payloads.get(value[cut:]) if cut >= 0 else None
        if found is None:
            return value
        restored.append(value[cut:])
        begin, end, data = found
        return DataURL(_joined(value[:cut], body, begin, end), cut, data)
    if depth <= 0 and isinstance(value, (list, dict)):
        raise _TooDeep
    if isinstance(value, list):
        return [_restore(v, body, payloads, restored, depth - 1) for v in value]
    if isinstance(value, dict):
        return {k: _restore(v, body, payloads, restored, depth - 1) for k, v in value.items()}
    return value
