"""The whole stack with real GUI-Actor inference (issues 3 and 4): broker + supervisor + frontend
under honcho as the Procfile starts them, two tiny random-weight checkpoints (Qwen2-VL and
Qwen2.5-VL backbones) on MLX on the CPU, driven by the official `openai` client.

The weights are random, so where the model points means nothing; what is checked is everything
around it: points inside the image in both coordinate spaces, scores ordered, the action text
agreeing with the best point, the attention map, token accounting, resizing options, the system
prompt override, images only the worker can reject, and streaming giving the same answer.
One module-scoped stack; max_pixels stays small so each forward pass takes well under a second.
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image, ImageDraw

from tests.stackutil import Stack, tiny_model

pytestmark = pytest.mark.mlx
pytest.importorskip("mlx.core")

V2, V25 = "tiny-qwen2-vl", "tiny-qwen2.5-vl"
MAX_PIXELS = 200_000
CONFIG = {
    # two API keys: the client below uses the first; the screenshot cache is scoped per key
    "server": {"default_model": V2, "request_timeout_s": 60, "api_keys": ["unused", "second-key"]},
    # three preprocessing threads on the qwen2_vl worker, so the multi-thread path runs on 2-core CI
    "models": {V2: tiny_model("qwen2_vl", max_pixels=MAX_PIXELS, prep_threads=3),
               V25: tiny_model("qwen2_5_vl", max_pixels=MAX_PIXELS)},
    "profiles": {"small": {"max_pixels": 60_000}},
}
ACTION = re.compile(r"pyautogui\.click\(x=(\d+), y=(\d+)\)")


def screenshot(w: int = 517, h: int = 333, fmt: str = "PNG") -> bytes:
    """A small UI-like picture with noise (so PNG compression leaves real pixel data to cut)."""
    rng = np.random.default_rng(w * 7 + h)
    im = Image.fromarray(rng.integers(200, 256, (h, w, 3), dtype=np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, w, max(1, h // 10)], fill=(40, 50, 70))
    d.rounded_rectangle([w * 0.6, h * 0.75, w * 0.85, h * 0.9], 4, fill=(37, 99, 235))
    d.text((w * 0.65, h * 0.78), "Save", fill="white")
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


IMG = screenshot()
W, H = 517, 333


def messages(image: bytes = IMG, text: str = "click the Save button", system: str | None = None,
             mime: str = "image/png") -> list[dict]:
    url = f"data:{mime};base64," + base64.b64encode(image).decode()
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": [{"type": "text", "text": text},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("e2e-tiny"), CONFIG)
    try:
        s.start(ready_timeout_s=120, loaded=(V2, V25))
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.http_base + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def ground(client, model=V2, **kw) -> dict:
    extra = kw.pop("extra_body", {})
    resp = client.chat.completions.create(model=model, messages=kw.pop("messages", None) or messages(**kw),
                                          extra_body=extra)
    return resp.model_dump()


def check_grounding(d: dict, w: int, h: int, topk: int = 3) -> dict:
    """Assert the answer is a coherent grounding of a w x h image; return message.grounding."""
    choice = d["choices"][0]
    g = choice["message"]["grounding"]
    assert g["space"] == "pixels" and g["image_size"] == [w, h]
    n_h, n_w = g["grid"]
    assert g["resized_size"] == [n_w * 28, n_h * 28]
    pts = g["points"]
    assert 1 <= len(pts) <= topk   # 3: the model's default
    for p in pts:
        assert 0 <= p["x"] < w and 0 <= p["y"] < h, p
        assert 0 <= p["nx"] <= 1 and 0 <= p["ny"] <= 1, p
        assert p["x"] == pytest.approx(p["nx"] * w) and p["y"] == pytest.approx(p["ny"] * h)
        assert p["score"] > 0
    assert [p["score"] for p in pts] == sorted((p["score"] for p in pts), reverse=True)
    m = ACTION.fullmatch(choice["message"]["content"])
    assert m, choice["message"]["content"]
    best = pts[0]
    assert (int(m[1]), int(m[2])) == (min(round(best["x"]), w - 1), min(round(best["y"]), h - 1))
    assert choice["coordinates"] == {"x": best["nx"], "y": best["ny"]}
    return g


def text_tokens(d: dict) -> int:
    """prompt tokens that are not the image's: the grid's n_h*n_w are, exactly."""
    u, g = d["usage"], d["choices"][0]["message"]["grounding"]
    image_tokens = g["grid"][0] * g["grid"][1]
    assert u["prompt_tokens_details"]["image_tokens"] == image_tokens
    assert u["prompt_tokens"] > image_tokens and u["completion_tokens"] == 0
    assert u["total_tokens"] == u["prompt_tokens"]
    return u["prompt_tokens"] - image_tokens


# ---- completions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [V2, V25])
def test_completion_points_inside_the_image(client, model):
    d = ground(client, model)
    assert d["model"] == model and d["object"] == "chat.completion"
    g = check_grounding(d, W, H)
    assert g["resized_size"][0] * g["resized_size"][1] <= MAX_PIXELS
    assert "attention" not in g
    t = d["timings"]   # the worker's milliseconds
    assert t["forward"] > 0 and t["total"] >= t["forward"] and t["preprocess"] > 0 and t["queue"] >= 0
    # FINISHING went out before the answer (common/protocol.py), except for a question about a
    # kept screenshot (a few tokens' forward)
    cached = (d["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert ("finishing" in t) == (cached == 0)
    assert cached or 0 < t["finishing"] <= t["forward"]
    assert all(v == round(v, 3) for v in t.values())     # milliseconds to the microsecond
    text_tokens(d)


def test_streaming_gives_the_same_answer(client):
    plain = ground(client)
    chunks = list(client.chat.completions.create(model=V2, messages=messages(), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.model_dump() for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 1
    c = content[0]
    delta = c["choices"][0]["delta"]
    pm = plain["choices"][0]["message"]
    assert delta["content"] == pm["content"] and delta["grounding"] == pm["grounding"]   # deterministic
    assert c["choices"][0]["coordinates"] == plain["choices"][0]["coordinates"]
    assert c["timings"]["forward"] > 0 and c["timings"]["total"] >= c["timings"]["forward"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    usage = chunks[-1].model_dump()["usage"]
    assert chunks[-1].choices == [] and usage == plain["usage"]
    assert sum("timings" in ch.model_dump() for ch in chunks) == 1   # only on the content chunk


def test_attention_map(client):
    d = ground(client, extra_body={"return_attention": True, "top_k": 5})
    g = check_grounding(d, W, H, topk=5)
    n_h, n_w = g["grid"]
    att = np.array(g["attention"])
    assert att.shape == (n_h * n_w,) and (att >= 0).all() and att.sum() == pytest.approx(1.0, abs=1e-4)
    # the best point is the centre of the best region: cells above 0.3 * max, so near a hot cell
    best = g["points"][0]
    a = att.reshape(n_h, n_w)
    r, c = min(int(best["ny"] * n_h), n_h - 1), min(int(best["nx"] * n_w), n_w - 1)
    assert a[max(0, r - 2):r + 3, max(0, c - 2):c + 3].max() > 0.3 * a.max()


def test_token_accounting_and_system_prompt(client):
    base = ground(client)
    other_size = ground(client, image=screenshot(300, 700))
    check_grounding(other_size, 300, 700)
    n_text = text_tokens(base)
    assert text_tokens(other_size) == n_text   # same text, another image: only image tokens differ
    short = ground(client, system="Point.")
    assert short["choices"][0]["message"]["grounding"]["grid"] == base["choices"][0]["message"]["grounding"]["grid"]
    assert 0 < text_tokens(short) < n_text   # the authors' long default prompt was replaced
    longer = ground(client, text="click the Save button in the lower right corner of the dialog")
    assert text_tokens(longer) > n_text


def test_a_second_question_about_a_screenshot_reports_cached_tokens(client):
    """The worker's screenshot cache, seen over HTTP as OpenAI reports prompt caching. The
    reference answer is the same question about the same pixels saved as other bytes (a new key)."""
    im = Image.open(io.BytesIO(screenshot(411, 287)))
    fresh, again = io.BytesIO(), io.BytesIO()
    im.save(fresh, "PNG", compress_level=1)
    im.save(again, "PNG", compress_level=9)
    first = ground(client, image=fresh.getvalue(), text="click the Save button")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = ground(client, image=fresh.getvalue(), text="close this window")
    want = ground(client, image=again.getvalue(), text="close this window")
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert want["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert check_grounding(second, 411, 287)["grid"] == check_grounding(want, 411, 287)["grid"]
    image_tokens = second["usage"]["prompt_tokens_details"]["image_tokens"]
    assert image_tokens < cached < second["usage"]["prompt_tokens"]     # system prompt and image
    got, ref = (d["choices"][0]["message"]["grounding"]["points"][0] for d in (second, want))
    assert got["x"] == pytest.approx(ref["x"], abs=1e-3) and got["y"] == pytest.approx(ref["y"], abs=1e-3)
    assert got["score"] == pytest.approx(ref["score"], rel=1e-4)


def test_the_screenshot_cache_shows_in_models_and_metrics(client, stack):
    img = screenshot(401, 263)
    ground(client, image=img, text="click the Save button")
    ground(client, image=img, text="close this window")
    deadline = time.monotonic() + 10          # memory reaches the status with the next heartbeat
    while True:
        memory = {m.id: m.model_dump()["memory"] for m in client.models.list().data}[V2]
        if memory["screenshot_cache_bytes"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 0 < memory["screenshot_cache_bytes"] < memory["active_bytes"]
    metrics = stack.http("GET", "/metrics", headers={"Authorization": "Bearer unused"})[2].decode()
    hits = re.search(r'^grounding_screenshot_cache_hits_total\{model="%s"\} (\S+)$' % V2, metrics, re.M)
    assert hits and float(hits.group(1)) >= 1


def test_each_api_key_has_its_own_screenshot_cache(client, stack):
    img = screenshot(389, 251)
    cached = lambda d: d["usage"]["prompt_tokens_details"]["cached_tokens"]
    first = ground(client, image=img, text="click the Save button")
    with openai.OpenAI(base_url=stack.http_base + "/v1", api_key="second-key", max_retries=0, timeout=60) as other:
        theirs = ground(other, image=img, text="click the Save button")
        theirs_again = ground(other, image=img, text="close this window")
    mine_again = ground(client, image=img, text="close this window")
    assert cached(first) == 0 and cached(theirs) == 0           # the other key's caller learns nothing
    assert cached(theirs_again) > 0 and cached(mine_again) == cached(theirs_again)


def test_a_screenshot_sent_before_its_question_is_kept_for_it(client, stack):
    """POST /v1/screenshots while the agent still decides what to ask: the question then runs
    from the kept state, for the same bytes, profile and system prompt, and for the same key only."""
    img = screenshot(377, 241)
    url = "data:image/png;base64," + base64.b64encode(img).decode()
    shot_body = {"model": V25, "image_url": {"url": url}, "profile": "small", "system": "Point at things."}
    shot = client.post("/screenshots", cast_to=object, body=shot_body)       # as the README shows it
    assert shot["object"] == "screenshot" and shot["model"] == V25
    assert (shot["kept"], shot["already_kept"], shot["not_kept"]) == (True, False, None)
    assert shot["image_tokens"] < shot["cached_tokens"] == shot["prompt_tokens"] and shot["timings"]["forward"] > 0
    status, _, raw = stack.http("POST", "/v1/screenshots", shot_body, headers={"Authorization": "Bearer unused"})
    assert status == 200, raw
    again = json.loads(raw)
    assert (again["kept"], again["already_kept"], again["cached_tokens"]) == (True, True, shot["cached_tokens"])
    cached = lambda d: d["usage"]["prompt_tokens_details"]["cached_tokens"]
    asked = ground(client, image=img, model=V25, system="Point at things.", extra_body={"profile": "small"})
    assert cached(asked) == shot["cached_tokens"]
    assert check_grounding(asked, 377, 241)["grid"] == shot["grid"]
    assert cached(ground(client, image=img, model=V25, extra_body={"profile": "small"})) == 0   # other system prompt
    with openai.OpenAI(base_url=stack.http_base + "/v1", api_key="second-key", max_retries=0, timeout=60) as other:
        assert cached(ground(other, image=img, model=V25, system="Point at things.",
                             extra_body={"profile": "small"})) == 0
    metrics = stack.http("GET", "/metrics", headers={"Authorization": "Bearer unused"})[2].decode()
    for outcome in ("kept", "already_kept"):
        assert re.search(r'^grounding_screenshot_prefills_total\{model="%s",outcome="%s"\} 1\.0$' % (V25, outcome),
                         metrics, re.M), outcome


def test_profile_and_max_pixels_change_resizing(client):
    big = check_grounding(ground(client), W, H)["resized_size"]
    small = check_grounding(ground(client, extra_body={"max_pixels": 60_000}), W, H)["resized_size"]
    profile = check_grounding(ground(client, extra_body={"profile": "small"}), W, H)["resized_size"]
    assert small == profile and small[0] * small[1] <= 60_000 < big[0] * big[1]
    assert abs(small[0] / small[1] - W / H) < 0.3   # aspect ratio kept (up to 28-pixel rounding)


# ---- odd images --------------------------------------------------------------------------------


def test_one_pixel_image(client):
    d = ground(client, image=screenshot(1, 1))
    g = check_grounding(d, 1, 1)
    assert d["choices"][0]["message"]["content"] == "pyautogui.click(x=0, y=0)"
    assert g["resized_size"][0] >= 28 and g["resized_size"][1] >= 28


def test_jpeg_and_webp(client):
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        check_grounding(ground(client, messages=messages(screenshot(W, H, fmt), mime=mime)), W, H)


def test_truncated_png_is_400_from_the_worker(client, stack):
    """The header is intact (the frontend's sniff passes it), the pixel data is cut: only
    decoding finds that, in the worker, which answers invalid_image."""
    cut = IMG[: len(IMG) // 2]
    assert IMG[:33] == cut[:33]
    with pytest.raises(openai.BadRequestError) as ei:
        ground(client, image=cut)
    assert ei.value.status_code == 400 and ei.value.body["code"] == "invalid_image"
    assert "truncated" in ei.value.body["message"] or "corrupt" in ei.value.body["message"]
    check_grounding(ground(client), W, H)   # the worker is fine afterwards
    health = json.loads(stack.http("GET", "/v1/health")[2])
    assert health["status"] == "ok" and health["models"] == {V2: "loaded", V25: "loaded"}


def test_models_report_real_memory(client):
    for m in client.models.list().data:
        d = m.model_dump()
        assert d["status"] == "loaded" and d["memory"]["weights_bytes"] > 0 and d["engine"] == "mlx"
        assert math.isfinite(d["load_seconds"]) and d["load_seconds"] > 0


def test_the_workers_run_without_pytorch_though_this_environment_has_it(stack):
    # transformers, which mlx-vlm's model packages import, would bring PyTorch in: ~5 s of start-up
    # and ~350 MB per worker (workers/torchless.py)
    pytest.importorskip("torch")
    if not Path("/proc/self/maps").exists():
        pytest.skip("reads a process's mapped libraries from /proc (Linux)")
    for model in (V2, V25):
        maps = Path(f"/proc/{stack.worker_pid(model)}/maps").read_text()
        assert "libmlx" in maps and "libtorch" not in maps
