"""frontend/json_body.py: the same values and the same errors as json.loads, with screenshot payloads
decoded outside the JSON scanner; and the data URL decode that takes their bytes."""
import base64
import json
import random

import pytest

from common.errors import ServerError
from frontend import json_body
from frontend.openai_api import decode_data_url


def _url(rng: random.Random, n: int, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(rng.randbytes(n)).decode()


def _same(body: bytes) -> None:
    try:
        want = ("value", json.loads(body))
    except (ValueError, RecursionError) as exc:
        want = ("error", type(exc), str(exc))
    try:
        got = ("value", json_body.loads(body))
    except (ValueError, RecursionError) as exc:
        got = ("error", type(exc), str(exc))
    assert got == want


def test_a_chat_body_parses_to_json_loads_value_and_its_payload_is_lifted(monkeypatch):
    rng = random.Random(1)
    url = _url(rng, 60_000)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "click ;base64, the button"}, {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    parsed = []
    real = json.loads
    monkeypatch.setattr(json_body.json, "loads", lambda b: parsed.append(len(b)) or real(b))
    value = json_body.loads(body)
    assert value == real(body)
    assert parsed and parsed[0] < 1000     # the scanner saw the body without the payload
    lifted = value["messages"][0]["content"][1]["image_url"]["url"]
    assert isinstance(lifted, json_body.DataURL) and lifted.payload_at == len("data:image/png;base64,")
    assert lifted.data == base64.b64decode(url.split(",", 1)[1])
    assert not isinstance(value["messages"][0]["content"][0]["text"], json_body.DataURL)


@pytest.mark.parametrize("case", [
    "escaped slashes",      # some encoders write "\/" in every base64 string
    "wrapped lines",        # "\n" escapes every 76 characters
    "payload in a key",
    "two images",
    "short payload",
    "not base64",
    "invalid JSON after",
    "invalid JSON before",
    "unterminated string",
    "marker outside strings",
    "utf-8 bom",
    "deep nesting",
    "non-ascii text",
    "token-like text",
])
def test_edge_cases_give_json_loads_values_and_errors(case):
    rng = random.Random(hash(case) & 0xFFFF)
    url = _url(rng, 20_000)
    doc = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    body = json.dumps(doc).encode()
    if case == "escaped slashes":
        body = body.replace(b"/", b"\\/")
    elif case == "wrapped lines":
        head, payload = url.split(",", 1)
        body = json.dumps({"url": head + "," + "\n".join(payload[i:i + 76] for i in range(0, len(payload), 76))}).encode()
    elif case == "payload in a key":
        body = json.dumps({url: 1, "x": [url]}).encode()
    elif case == "two images":
        body = json.dumps([url, {"u": _url(rng, 9000)}, "after"]).encode()
    elif case == "short payload":
        body = json.dumps({"u": _url(rng, 100)}).encode()
    elif case == "not base64":
        body = json.dumps({"u": url[:-10] + "@@@@@@@@@@"}).encode()
    elif case == "invalid JSON after":
        body = body[:-1] + b",}"
    elif case == "invalid JSON before":
        body = b"{\"model\": tru, " + body[1:]
    elif case == "unterminated string":
        body = body[:body.rindex(b'"')]
    elif case == "marker outside strings":
        body = b'{"a": 1};base64,' + base64.b64encode(rng.randbytes(6000)) + b'"'
    elif case == "utf-8 bom":
        body = b"\xef\xbb\xbf" + body
    elif case == "deep nesting":
        body = b"[" * 100 + json.dumps(url).encode() + b"]" * 100
    elif case == "non-ascii text":
        body = json.dumps({"t": "cliquez sur « Envoyer » ✓", "u": url}, ensure_ascii=False).encode()
    elif case == "token-like text":
        body = json.dumps({"t": json_body._TOKEN[:8], "u": url}).encode()
    _same(body)


def test_random_bodies_give_json_loads_values_and_errors():
    rng = random.Random(7)
    pieces = [lambda: json.dumps(_url(rng, rng.choice([10, 5000, 12_000]))), lambda: '";base64,', lambda: "\\/",
              lambda: '"', lambda: "{", lambda: "}", lambda: "[", lambda: "]", lambda: ",", lambda: ":",
              lambda: '"text"', lambda: "1", lambda: "\\", lambda: "\n", lambda: "null"]
    for _ in range(400):
        body = "".join(rng.choice(pieces)() for _ in range(rng.randint(1, 12))).encode()
        _same(body)
        _same(json.dumps({"a": [json.loads(p) for p in (json.dumps(_url(rng, 5000)),)]}).encode())


def _decoded(url: str, max_bytes: int = 1 << 20):
    try:
        return ("bytes", decode_data_url(url, max_bytes=max_bytes, param="p"))
    except ServerError as exc:
        return ("error", exc.code, str(exc))


@pytest.mark.parametrize("url", [
    "data:image/png;base64,{}",             # lifted: its bytes come from the parse
    "data:image/png;x=a,b;base64,{}",       # a comma before the marker: not a base64 data URL
    "data:image/png,x;base64,{}",
    "data:;base64,{}",
    'data:image/png;base64,AB"CD;base64,{}',  # lifted after the second marker: not the URL's payload
])
def test_a_lifted_data_url_decodes_as_its_string_does(url):
    rng = random.Random(3)
    url = url.format(base64.b64encode(rng.randbytes(9000)).decode())
    lifted = json_body.loads(json.dumps({"u": url}).encode())["u"]
    assert isinstance(lifted, json_body.DataURL)
    for max_bytes in (1 << 20, 8000):       # within the limit, and over it (413)
        assert _decoded(lifted, max_bytes) == _decoded(str(url), max_bytes)
    assert _decoded(lifted)[0] == ("error" if "," in url.split(";base64,")[0] or '"' in url else "bytes")


@pytest.mark.parametrize("head", ['data:image\\/png;base64,', 'data:image/png;name=\\u00e9;base64,',
                                  'data:image/png;name=é;base64,', 'x\\"data:;base64,', 'data:image/png;base64,'])
def test_a_payload_after_a_head_with_escapes_or_other_characters_comes_back_whole(head):
    payload = base64.b64encode(random.Random(5).randbytes(9000)).decode()
    body = ('{"u": "' + head + payload + '"}').encode()
    value = json_body.loads(body)
    assert value == json.loads(body) and isinstance(value["u"], json_body.DataURL)
    assert value["u"].data == base64.b64decode(payload) and value["u"][value["u"].payload_at:] == payload
