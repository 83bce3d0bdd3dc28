"""Logging setup shared by the processes: one line per record, key=value context appended.

`configure_logging(role, level)` is called once from a `__main__`; modules log through
`logging.getLogger(__name__)` and pass context as `extra={"ctx": {"job_id": ..., "model": ...}}`.
"""
from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__("%(asctime)s %(levelname)-5s " + role + "[%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = getattr(record, "ctx", None)
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return line


def configure_logging(role: str, level: str = "info") -> None:
    """Log to stderr (honcho and systemd collect it). `level`: debug/info/warning/error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
