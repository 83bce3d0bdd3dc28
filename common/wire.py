"""Frames <-> typed messages. The only module that knows the frame layout or touches msgpack.

Layout after the ROUTER identity frame (added on receipt, stripped on send):
    [magic: b"VLM1" | b"VLW1"] [cmd: 1 byte] [envelope: msgpack map] [blob0] [blob1] ...
Decoding is strict and bounded: every failure raises `ProtocolError` with a short stable `reason`
(used as a metrics label) and never anything else, so a bad peer cannot crash the reader.
"""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from functools import cache
from typing import Any, Iterable, Mapping, Sequence

import msgpack

from common import protocol as p

MAX_ENVELOPE_BYTES = 256 * 1024
MAX_BLOBS = 16
_UNPACK_LIMITS = dict(raw=False, strict_map_key=True, use_list=True, max_array_len=65536,
                      max_map_len=1024, max_str_len=1 << 20, max_bin_len=0, max_ext_len=0)
_MAX_DEPTH = 16  # msgpack itself recurses without limit on nested containers


class ProtocolError(Exception):
    """A frame sequence we refuse. `job_id` is set when the envelope was readable enough to say
    which job it was about, so the broker can answer instead of silently dropping."""

    def __init__(self, reason: str, detail: str, job_id: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.job_id = job_id


FROM_CLIENT = p.registry(*p.CLIENT_TO_BROKER)
TO_CLIENT = p.registry(*p.BROKER_TO_CLIENT)
DIRECT_TO_CLIENT = p.registry(*p.WORKER_TO_CLIENT)
DIRECT_TO_WORKER = p.registry(*p.DIRECT_TO_WORKER)
FROM_WORKER = p.registry(*p.WORKER_TO_BROKER)
TO_WORKER = p.registry(*p.BROKER_TO_WORKER)


def encode(msg: p.Message, blobs: Iterable[Any] = ()) -> list[Any]:
    """Frames for `msg`; blobs (bytes, memoryview or zmq.Frame) are appended untouched so the
    caller can send them with copy=False."""
    env = p.as_dict(msg)
    env["v"] = p.PROTO_MINOR
    return [msg.LINK.value, bytes((msg.CMD,)), msgpack.packb(env, use_bin_type=True), *blobs]


def _raw(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def decode(frames: Sequence[Any], accepted: Mapping[int, type[p.Message]]) -> tuple[p.Message, list[Any]]:
    """Parse frames (without the routing identity) into one of the `accepted` message classes.
    Returns the message and its blob frames, unchanged (zmq.Frame stays zmq.Frame)."""
    if len(frames) < 3:
        raise ProtocolError("short", f"{len(frames)} frames, need at least 3")
    magic, cmd_frame, env_frame, blobs = _raw(frames[0]), _raw(frames[1]), frames[2], list(frames[3:])
    link_magic = next(iter(accepted.values())).LINK.value
    if magic != link_magic:
        raise ProtocolError("bad_magic", f"magic {magic[:8]!r}, expected {link_magic!r}")
    if len(cmd_frame) != 1 or cmd_frame[0] not in accepted:
        raise ProtocolError("bad_command", f"unknown command {cmd_frame[:4].hex()}")
    cls = accepted[cmd_frame[0]]
    env_bytes = _raw(env_frame)
    if len(env_bytes) > MAX_ENVELOPE_BYTES:
        raise ProtocolError("too_large", f"envelope of {len(env_bytes)} bytes")
    if len(blobs) > MAX_BLOBS:
        raise ProtocolError("too_many_blobs", f"{len(blobs)} blob frames, at most {MAX_BLOBS}")
    try:
        env = msgpack.unpackb(env_bytes, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, FormatError...)
        raise ProtocolError("bad_msgpack", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(env, dict):
        raise ProtocolError("bad_envelope", "envelope is not a map")
    job_id = env.get("id") if isinstance(env.get("id"), str) else None
    if _depth(env) > _MAX_DEPTH:  # env is a dict here
        raise ProtocolError("too_deep", f"nesting deeper than {_MAX_DEPTH}", job_id)
    return _build(cls, env, job_id), blobs


def _depth(obj: Any, level: int = 0) -> int:
    """Nesting depth of maps and lists (scalars are not visited: this runs on every message)."""
    if level > _MAX_DEPTH:
        return level
    children = obj.values() if isinstance(obj, dict) else obj
    deepest = level + 1
    for v in children:
        if isinstance(v, (dict, list)):
            deepest = max(deepest, _depth(v, level + 1))
    return deepest


@cache
def _schema(cls: type[p.Message]) -> list[tuple[str, tuple[type, ...], bool, bool]]:
    """(name, allowed types, optional (None ok), required) per field."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        allowed = tuple(a for a in args if a is not type(None))
        if float in allowed:
            allowed += (int,)
        required = f.default is MISSING and f.default_factory is MISSING
        out.append((f.name, allowed, type(None) in args, required))
    return out


def _build(cls: type[p.Message], env: dict, job_id: str | None) -> p.Message:
    kwargs = {}
    for name, allowed, optional, required in _schema(cls):
        if name not in env:
            if required:
                raise ProtocolError("missing_field", f"{cls.__name__}.{name} is missing", job_id)
            continue
        value = env[name]
        if value is None and optional:
            kwargs[name] = None
        elif isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
            kwargs[name] = value
        else:
            raise ProtocolError("bad_field", f"{cls.__name__}.{name} has type {type(value).__name__}", job_id)
    return cls(**kwargs)
