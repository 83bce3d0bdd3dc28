"""OpenAI chat-completions vocabulary <-> grounding jobs. Pure: no I/O, no Sanic.

`parse_chat_request` turns a decoded JSON body into a `ChatRequest` (or raises `ServerError` with
the offending `param`); the builders turn a job's result into `chat.completion` objects and
`chat.completion.chunk`s. Coordinates: `x`, `y` are original-image pixels, `nx`, `ny` normalised
to [0, 1] (architecture.md section 13).
"""
from __future__ import annotations

import array
import base64
import binascii
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import pybase64

from common.config import AppConfig
from common.errors import ServerError
from frontend.images import ImageInfo, sniff
from frontend.json_body import DataURL

MAX_JSON_DEPTH = 32           # OpenAI bodies nest about 6 deep; deeper is hostile or broken
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 64 * 1024    # instruction + system prompt, each
MAX_PIXELS_LIMIT = 16384 * 16384
MIN_PIXELS_LIMIT = 28 * 28    # one visual token
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Parameters whose meaning a grounding model cannot honour: refused, never silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call")
# Sampling parameters: accepted for compatibility and ignored (grounding is one forward pass, nothing
# is sampled), but checked as OpenAI checks them, so that a client's mistake is not taken for a
# setting. name -> (integer only, lowest, highest); None: no bound.
SAMPLING = {"temperature": (False, 0, 2), "top_p": (False, 0, 1), "presence_penalty": (False, -2, 2),
            "frequency_penalty": (False, -2, 2), "max_tokens": (True, 1, None),
            "max_completion_tokens": (True, 1, None), "seed": (True, None, None)}
MAX_STOP = 4
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)


def bad(message: str, param: str | None = None, code: str = "bad_request") -> ServerError:
    return ServerError(code, message, param=param)


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise bad_request when containers nest deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if d > limit:
            raise bad(f"the JSON body nests deeper than {limit} levels")
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))


@dataclass(frozen=True)
class ChatRequest:
    """A validated grounding request. Exactly one of `image` (decoded bytes) and `image_url`
    (an http(s) URL the route fetches, only when server.allow_remote_images) is set."""
    model: str
    params: dict                       # SUBMIT params (workers/engine.py GroundingRequest.from_job)
    image: bytes | None
    image_info: ImageInfo | None
    image_url: str | None
    image_param: str                   # where the image sits in the body, for error messages
    stream: bool
    include_usage: bool
    ttl_s: float


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: Mapping, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer within {lo}..{hi}", name)
    return v


def _opt_bool(body: Mapping, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad(f"{name} must be true or false", name)
    return v


def _b64decode(payload: str) -> bytes:
    """The standard library's strict base64 (`validate=True`), after removing spaces and line breaks
    (some clients wrap it), in pybase64's SIMD decoder: a realistic 1080p screenshot's ~780 KB of
    base64 took 0.9 ms with the standard library on the CI box and 3.3 ms on one H100 host
    (bench.body_cost), on the event loop that every request shares; pybase64 gives the same bytes
    in ~0.03 ms. Where it refuses (wrapped lines, or padding the standard library tolerates, such
    as "abcd="), the standard library decides, so the verdicts and bytes are its own."""
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    if any(c in payload for c in " \n\r\t"):
        payload = "".join(payload.split())
    return base64.b64decode(payload, validate=True)


def decode_data_url(url: str, *, max_bytes: int, param: str) -> bytes:
    """Bytes of a base64 `data:` URL. 400 for a malformed URL or bad base64; 413 over `max_bytes`."""
    m = DATA_URL.match(url)
    if m is None or ";base64" not in m.group("params").lower():
        raise bad("image data URLs must look like data:image/png;base64,<data>", param, "invalid_image")
    if (len(url) - m.end()) // 4 * 3 > max_bytes + 3:
        raise bad(f"the image is larger than {max_bytes} bytes (server.max_image_bytes)", param,
                  "payload_too_large")
    if isinstance(url, DataURL) and url.payload_at == m.end():
        data = url.data                 # decoded while the body was parsed (frontend/json_body.py)
    else:
        try:
            data = _b64decode(url[m.end():])
        except (binascii.Error, ValueError) as exc:
            raise bad(f"the image data URL is not valid base64: {exc}", param, "invalid_image") from None
    if len(data) > max_bytes:
        raise bad(f"the image is {len(data)} bytes; the limit is {max_bytes} (server.max_image_bytes)",
                  param, "payload_too_large")
    return data


def _text(content: Any, param: str) -> str:
    """Text of a system/developer message (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("system messages take text parts only", f"{param}[{i}]")
            out.append(part["text"])
        return "\n".join(out)
    raise bad("content must be a string or a list of content parts", param)


def _user_parts(content: Any, param: str) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(image url, its param path)]) of a user message."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad("content must be a string or a list of content parts", param)
    texts, images = [], []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        if not isinstance(part, dict):
            raise bad("each content part must be an object", p)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad("text parts need a string 'text'", f"{p}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str) or not url:
                raise bad("image_url parts need image_url.url, a string", f"{p}.image_url.url")
            images.append((url, f"{p}.image_url.url"))
        else:
            raise bad(f"unsupported content part type {kind!r}; use 'text' or 'image_url'", f"{p}.type")
    return "\n".join(texts), images


def _messages(body: Mapping) -> tuple[str, str | None, str, str]:
    """(instruction, system prompt or None, image url, its param path) from `messages`."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise bad(f"at most {MAX_MESSAGES} messages", "messages")
    system: list[str] = []
    last_user: tuple[Any, str] | None = None
    for i, msg in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad("each message must be an object", p)
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"role must be one of {', '.join(ROLES)}", f"{p}.role")
        if role in ("system", "developer"):
            system.append(_text(msg.get("content"), f"{p}.content"))
        elif role == "user":
            last_user = (msg.get("content"), f"{p}.content")
    if last_user is None:
        raise bad("no user message: the last user message carries the screenshot and the instruction",
                  "messages")
    text, images = _user_parts(*last_user)
    if not images:
        raise bad("the last user message has no image: send the screenshot as an image_url part",
                  last_user[1])
    if len(images) > 1:
        raise bad(f"the last user message has {len(images)} images; grounding takes exactly one",
                  last_user[1])
    text = text.strip()
    if not text:
        raise bad("the last user message has no text instruction", last_user[1])
    sys_text = "\n".join(system).strip() or None
    if len(text) > MAX_TEXT_CHARS or (sys_text and len(sys_text) > MAX_TEXT_CHARS):
        raise bad(f"instruction and system prompt are limited to {MAX_TEXT_CHARS} characters", "messages")
    return text, sys_text, images[0][0], images[0][1]


def _refuse_unsupported(body: Mapping) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n > 1 is not supported: grounding answers one choice (use top_k for candidates)",
                  "n", "unsupported_parameter")
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise bad(f"{name} is not supported by grounding models", name, "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("response_format is not supported; read message.grounding for structured output",
                  "response_format", "unsupported_parameter")
    if body.get("logprobs"):
        raise bad("logprobs are not supported; point scores are in message.grounding",
                  "logprobs", "unsupported_parameter")


def _check_sampling(body: Mapping) -> None:
    """400 for a sampling parameter of the wrong type or out of OpenAI's range (null is fine)."""
    for name, (integer, lo, hi) in SAMPLING.items():
        v = body.get(name)
        if v is None:
            continue
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or v != v:
            raise bad(f"{name} must be {kind}, got {type(v).__name__}", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            within = f"within {lo}..{hi}" if hi is not None else f">= {lo}"
            raise bad(f"{name} must be {kind} {within}", name)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= MAX_STOP
                                                            and all(isinstance(x, str) for x in stop))):
        raise bad(f"stop must be a string or a list of up to {MAX_STOP} strings", "stop")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user must be a string", "user")


def _model(body: Mapping, cfg: AppConfig) -> str:
    """The body's model, or the default one; 404 for one that does not exist."""
    model = body.get("model")
    if model is None or model == "":
        model = cfg.default_model
        if model is None:
            raise bad("no model given and no enabled model configured", "model", "unknown_model")
    if not isinstance(model, str):
        raise bad("model must be a string", "model")
    if model not in cfg.models:
        raise bad(f"the model {model!r} does not exist", "model", "unknown_model")
    return model


def _pixel_limits(body: Mapping, cfg: AppConfig) -> tuple[int | None, int | None]:
    """(max_pixels, min_pixels) from `profile` and the explicit fields (which win); None: the model's."""
    profile = body.get("profile")
    max_pixels = min_pixels = None
    if profile is not None:
        if not isinstance(profile, str) or profile not in cfg.profiles:
            raise bad(f"profile must be one of {', '.join(sorted(cfg.profiles))}", "profile")
        max_pixels, min_pixels = cfg.profiles[profile].max_pixels, cfg.profiles[profile].min_pixels
    max_pixels = _opt_int(body, "max_pixels", MIN_PIXELS_LIMIT, MAX_PIXELS_LIMIT) or max_pixels
    min_pixels = _opt_int(body, "min_pixels", MIN_PIXELS_LIMIT, MAX_PIXELS_LIMIT) or min_pixels
    if max_pixels and min_pixels and min_pixels > max_pixels:
        raise bad("min_pixels must be <= max_pixels", "min_pixels")
    return max_pixels, min_pixels


def _ttl_s(body: Mapping, cfg: AppConfig) -> float:
    """The job's deadline in seconds: `timeout_s`, at most server.request_timeout_s."""
    timeout_s = body.get("timeout_s", cfg.server.request_timeout_s)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s:
        raise bad("timeout_s must be a positive number of seconds", "timeout_s")
    return float(min(timeout_s, cfg.server.request_timeout_s))


def _image_source(url: str, param: str, cfg: AppConfig) -> tuple[bytes | None, ImageInfo | None, str | None]:
    """(image bytes, their header info, None) for a data: URL, or (None, None, url) for a remote
    one the route fetches (where server.allow_remote_images); 400 / 413 otherwise."""
    if url.startswith("data:"):
        image = decode_data_url(url, max_bytes=cfg.server.max_image_bytes, param=param)
        return image, sniff(image, max_pixels=cfg.server.max_image_pixels, param=param), None
    if url.lower().startswith(("http://", "https://")):
        if not cfg.server.allow_remote_images:
            raise bad("remote image URLs are disabled on this server (server.allow_remote_images); "
                      "send a data: URL", param, "invalid_image")
        return None, None, url
    raise bad("image_url must be a data: URL (or http(s) when enabled); local paths are refused",
              param, "invalid_image")


def parse_chat_request(body: Any, cfg: AppConfig) -> ChatRequest:
    """Validate a /v1/chat/completions body. Raises ServerError (400 / 404 / 413) naming the param."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_depth(body)
    _refuse_unsupported(body)
    _check_sampling(body)
    model = _model(body, cfg)
    spec = cfg.models[model]

    stream = _opt_bool(body, "stream") or False
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options must be an object", "stream_options")
    if so is not None and so.get("include_usage") is not None and not isinstance(so["include_usage"], bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options.include_usage")
    include_usage = bool(stream and so and so.get("include_usage"))

    max_pixels, min_pixels = _pixel_limits(body, cfg)
    if body.get("top_k") is not None and body.get("topk") is not None:
        raise bad("give top_k or topk, not both", "topk")
    topk = _opt_int(body, "top_k", 1, 100) if body.get("top_k") is not None else _opt_int(body, "topk", 1, 100)
    return_attention = _opt_bool(body, "return_attention") or False
    _opt_int(body, "max_context", 1, 1 << 30)  # seed field: validated, not used (one image, no generation)
    ttl_s = _ttl_s(body, cfg)
    fake = _fake(body, spec)

    instruction, system, url, url_param = _messages(body)
    image, info, remote = _image_source(url, url_param, cfg)

    params = {"instruction": instruction, "system": system, "topk": topk, "max_pixels": max_pixels,
              "min_pixels": min_pixels, "return_attention": return_attention}
    if fake:
        params["fake"] = fake
    return ChatRequest(model=model, params=params, image=image, image_info=info, image_url=remote, image_param=url_param,
                       stream=stream, include_usage=include_usage, ttl_s=ttl_s)


def _fake(body: Mapping, spec) -> dict | None:
    """The test-only fault injection object (workers/fake_engine.py), for fake-engine models only."""
    fake = body.get("fake")
    if fake is not None and (spec.engine != "fake" or not isinstance(fake, dict)):
        raise bad("fake (fault injection) is accepted only for fake-engine models", "fake",
                  "unsupported_parameter")
    return fake


# Fields of POST /v1/screenshots (and `fake` for fake-engine models, not advertised); anything else
# is refused (a misspelt field must not go unnoticed, and an instruction here would be silently
# unanswered)
SCREENSHOT_FIELDS = ("model", "image_url", "system", "profile", "max_pixels", "min_pixels", "timeout_s")


def parse_screenshot_request(body: Any, cfg: AppConfig) -> ChatRequest:
    """Validate a POST /v1/screenshots body: keep a screenshot's state in the model's worker so
    that later questions about it (same image bytes, pixel limits and system prompt) run from it.
    -> a ChatRequest whose params make a prefill job (never streamed). 400 / 404 / 413 naming the param."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_depth(body)
    for name in body:
        if name not in SCREENSHOT_FIELDS and name != "fake":
            hint = " (ask questions with POST /v1/chat/completions)" if name in ("messages", "instruction") else ""
            raise bad(f"unknown field {name!r}{hint}; this endpoint takes {', '.join(SCREENSHOT_FIELDS)}",
                      name, "unsupported_parameter")
    model = _model(body, cfg)
    iu = body.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    url_param = "image_url.url" if isinstance(iu, dict) else "image_url"
    if not isinstance(url, str) or not url:
        raise bad("image_url must be the screenshot's URL (a data: URL), as a string or {\"url\": ...}", url_param)
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("system must be a string: the system prompt the later questions will use", "system")
    system = system.strip() if system else None
    if system and len(system) > MAX_TEXT_CHARS:
        raise bad(f"system is limited to {MAX_TEXT_CHARS} characters", "system")
    max_pixels, min_pixels = _pixel_limits(body, cfg)
    ttl_s = _ttl_s(body, cfg)
    image, info, remote = _image_source(url, url_param, cfg)
    params = {"prefill": True, "system": system, "max_pixels": max_pixels, "min_pixels": min_pixels}
    fake = _fake(body, cfg.models[model])
    if fake:
        params["fake"] = fake
    return ChatRequest(model=model, params=params, image=image, image_info=info, image_url=remote,
                       image_param=url_param, stream=False, include_usage=False, ttl_s=ttl_s)


# ---- responses ---------------------------------------------------------------------------------


def attention_list(blob: bytes | memoryview, grid: list[int]) -> list[float]:
    """The float32 little-endian attention map as a flat row-major list of n_h*n_w floats."""
    a = array.array("f")
    a.frombytes(bytes(blob))
    if sys.byteorder == "big":
        a.byteswap()
    if len(grid) == 2 and len(a) != grid[0] * grid[1]:
        raise ServerError("internal", f"attention map has {len(a)} values for grid {grid}")
    return [round(v, 6) for v in a]


def grounding_block(result: Mapping, blobs: list, return_attention: bool) -> dict:
    """message.grounding: `points` best first, each `x`, `y` in original-image pixels (floats,
    `space: "pixels"` names that space), `nx`, `ny` normalised to [0, 1] and `score`; sizes
    `image_size`, `resized_size` [w, h] in pixels; `grid` [n_h, n_w] visual tokens; with
    return_attention, `attention`: n_h*n_w floats, row-major, the pointer head's distribution."""
    out = {"points": [{"x": p["x"], "y": p["y"], "nx": p["nx"], "ny": p["ny"], "score": p["score"]}
                      for p in result.get("points", [])],
           "image_size": result.get("image_size"), "resized_size": result.get("resized_size"),
           "grid": result.get("grid"), "space": "pixels"}
    ab = result.get("attention_blob")
    if return_attention and ab is not None and ab < len(blobs):
        out["attention"] = attention_list(blobs[ab], result.get("grid") or [])
    return out


def best_point(result: Mapping) -> tuple[int, int] | None:
    """The best point in original-image pixels, rounded and clamped to [0, W-1] x [0, H-1]."""
    points = result.get("points") or []
    if not points:
        return None
    w, h = result.get("image_size") or (1, 1)
    x = min(max(int(round(points[0]["x"])), 0), max(w - 1, 0))
    y = min(max(int(round(points[0]["y"])), 0), max(h - 1, 0))
    return x, y


def action_text(result: Mapping) -> str:
    pt = best_point(result)
    return "" if pt is None else f"pyautogui.click(x={pt[0]}, y={pt[1]})"


def coordinates(result: Mapping) -> dict | None:
    """The seed's `choices[i].coordinates`: the best point normalised to [0, 1]."""
    points = result.get("points") or []
    return {"x": points[0]["nx"], "y": points[0]["ny"]} if points else None


def usage_block(usage: Mapping) -> dict:
    """prompt_tokens counts text + image tokens (`prompt_tokens_details.image_tokens` of them are
    the image's); `prompt_tokens_details.cached_tokens`, as OpenAI reports prompt caching: those
    whose state the worker's screenshot cache supplied (the system prompt and the image, when the
    same screenshot was asked about before); completion_tokens is 0: the pointer head emits a
    point, not tokens (the action text is formatted here, not generated)."""
    prompt = int(usage.get("prompt_tokens", 0))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    details = {k: usage[k] for k in ("cached_tokens", "image_tokens")
               if isinstance(usage.get(k), int) and not isinstance(usage.get(k), bool)}
    if details:     # image_tokens is an extension: how many of the prompt's are the image's
        out["prompt_tokens_details"] = details
    return out


def timings_block(timings: Mapping) -> dict:
    """The worker's own timings in milliseconds (queue, preprocess, forward, head, total) and its
    batch size: an extension field, so callers can tell serving time from model time."""
    return {k: v for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def completion(*, completion_id: str, model: str, created: int, result: Mapping, usage: Mapping,
               blobs: list, return_attention: bool, finish_reason: str = "stop",
               timings: Mapping | None = None) -> dict:
    """A `chat.completion`. Beside OpenAI's fields: `choices[0].message.grounding` (see
    `grounding_block`), `choices[0].coordinates` (the seed's best point, normalised; null when
    there is none) and top-level `timings`: the worker's milliseconds (see `timings_block`)."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": action_text(result), "refusal": None,
                        "grounding": grounding_block(result, blobs, return_attention)},
            "coordinates": coordinates(result),
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": usage_block(usage),
        "timings": timings_block(timings or {}),
    }


def chunk(*, completion_id: str, model: str, created: int, delta: dict | None = None,
          finish_reason: str | None = None, usage: dict | None = None, include_usage: bool = False,
          extra_choice: dict | None = None, timings: Mapping | None = None) -> dict:
    """One chat.completion.chunk. `delta=None` makes the usage-only chunk (choices: []).
    `timings` (the worker's milliseconds, as in `completion`) rides on the content chunk."""
    out: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "system_fingerprint": None}
    if delta is None:
        out["choices"] = []
    else:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        choice.update(extra_choice or {})
        out["choices"] = [choice]
    if include_usage:
        out["usage"] = usage
    if timings is not None:
        out["timings"] = timings_block(timings)
    return out


def screenshot_object(*, screenshot_id: str, model: str, created: int, result: Mapping, usage: Mapping,
                      timings: Mapping | None = None) -> dict:
    """The answer of POST /v1/screenshots. `kept`: later questions about this screenshot run from
    its kept state, and report `cached_tokens` of their prompt as cached; `already_kept`: it was
    kept before this call (nothing ran); `not_kept`: why it is not kept (the cache is off for
    this model, or the state would not fit it). Sizes and `grid` as in message.grounding."""
    cached, kept = int(usage.get("cached_tokens") or 0), int(usage.get("kept_tokens") or 0)
    return {"id": screenshot_id, "object": "screenshot", "created": created, "model": model,
            "kept": bool(cached or kept), "already_kept": bool(cached), "cached_tokens": cached or kept,
            "not_kept": result.get("not_kept"), "image_size": result.get("image_size"),
            "resized_size": result.get("resized_size"), "grid": result.get("grid"),
            "image_tokens": usage.get("image_tokens"), "prompt_tokens": usage.get("prompt_tokens"),
            "timings": timings_block(timings or {})}


def model_object(status: Mapping, *, created: int, owned_by: str = "gui-grounding-server") -> dict:
    """OpenAI's model object plus the broker's status fields (status, memory, last_used, ...)."""
    out = {"id": status["id"], "object": "model", "created": created, "owned_by": owned_by}
    out.update({k: v for k, v in status.items() if k not in out})
    return out
