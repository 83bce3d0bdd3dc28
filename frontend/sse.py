"""Server-Sent Events framing for OpenAI-style streams. Pure.

Each event is `data: <json>\n\n`; the stream ends with `data: [DONE]\n\n`. Errors after the stream
started are an `event: error` whose data is OpenAI's error object (the openai client raises
`APIError` on it).
"""
from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # no proxy buffering
CONTENT_TYPE = "text/event-stream; charset=utf-8"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def event(obj: Any) -> bytes:
    """A data-only event; JSON never contains a raw newline, so one `data:` line suffices."""
    return f"data: {_dumps(obj)}\n\n".encode()


def error_event(body: dict) -> bytes:
    """An error after headers were sent: `event: error` with {"error": {...}} as data."""
    return f"event: error\ndata: {_dumps(body)}\n\n".encode()


def comment(text: str = "") -> bytes:
    """A comment line; clients ignore it. Used as a keep-alive while a job is queued."""
    return f": {text}\n\n".encode()
