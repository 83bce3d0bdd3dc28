import msgpack
import pytest
from hypothesis import given, strategies as st

from common import protocol as p
from common import wire

ALL = [*p.CLIENT_TO_BROKER, *p.BROKER_TO_CLIENT, *p.WORKER_TO_BROKER, *p.BROKER_TO_WORKER]


def test_command_bytes_are_unique_per_direction():
    for group in (p.CLIENT_TO_BROKER, p.BROKER_TO_CLIENT, p.WORKER_TO_BROKER, p.BROKER_TO_WORKER):
        assert len({c.CMD for c in group}) == len(group)


def test_round_trip_keeps_blobs_untouched():
    msg = p.Submit(id="j1", model="m", params={"instruction": "click ok", "topk": 3},
                   blob_meta=[{"mime": "image/png", "len": 5}], ttl_ms=500, stream=True)
    blob = memoryview(b"\x89PNG!")
    frames = wire.encode(msg, [blob])
    assert frames[0] == b"VLM1" and frames[1] == b"\x01" and frames[3] is blob
    back, blobs = wire.decode(frames, wire.FROM_CLIENT)
    assert back == msg and blobs == [blob]


def test_worker_messages_round_trip():
    for msg in (p.Ready(worker_uid="u", pid=1, host="h", model_id="m", state="empty", capabilities={"max_slots": 2}),
                p.Result(id="j", result={"points": []}, usage={"prompt_tokens": 3}),
                p.WorkerError(id=None, code="load_failed", message="missing model.safetensors"),
                p.Host(host="h", mem_total=1, mem_available=1, exited=[12])):
        assert wire.decode(wire.encode(msg), wire.FROM_WORKER)[0] == msg
    job = p.Job(id="j", params={}, ttl_ms=10)
    assert wire.decode(wire.encode(job, [b"x"]), wire.TO_WORKER) == (job, [b"x"])


def _env(**kv):
    return msgpack.packb(kv)


@pytest.mark.parametrize("frames, reason", [
    ([b"VLM1", b"\x01"], "short"),
    ([b"VLM2", b"\x01", _env(id="a")], "bad_magic"),
    ([b"VLW1", b"\x01", _env(id="a")], "bad_magic"),            # worker magic on the client link
    ([b"VLM1", b"\x7f", _env(id="a")], "bad_command"),
    ([b"VLM1", b"\x01\x01", _env(id="a")], "bad_command"),
    ([b"VLM1", b"\x11", _env(id="a")], "bad_command"),           # a broker->client command from a client
    ([b"VLM1", b"\x01", b"\xc1\xc1"], "bad_msgpack"),
    ([b"VLM1", b"\x01", msgpack.packb([1, 2])], "bad_envelope"),
    ([b"VLM1", b"\x01", _env(id="a", model="m")], "missing_field"),
    ([b"VLM1", b"\x01", _env(id="a", model=5, params={})], "bad_field"),
    ([b"VLM1", b"\x01", _env(id="a", model="m", params={}, ttl_ms=True)], "bad_field"),
    ([b"VLM1", b"\x01", _env(id="a", model="m", params={}, x=b"bin")], "bad_msgpack"),  # no bin in envelopes
    ([b"VLM1", b"\x01", b"\x80" + b"\x00" * (wire.MAX_ENVELOPE_BYTES)], "too_large"),
    ([b"VLM1", b"\x01", _env(id="a", model="m", params={})] + [b""] * 17, "too_many_blobs"),
])
def test_malformed_frames_are_refused_with_a_reason(frames, reason):
    with pytest.raises(wire.ProtocolError) as err:
        wire.decode(frames, wire.FROM_CLIENT)
    assert err.value.reason == reason


def test_deep_nesting_is_refused_and_names_the_job():
    deep: dict = {}
    cur = deep
    for _ in range(500):
        cur["a"] = {}
        cur = cur["a"]
    frames = [b"VLM1", b"\x01", msgpack.packb({"id": "j9", "model": "m", "params": deep})]
    with pytest.raises(wire.ProtocolError) as err:
        wire.decode(frames, wire.FROM_CLIENT)
    assert err.value.reason in ("too_deep", "bad_msgpack")


def test_unknown_envelope_keys_are_ignored():
    frames = [b"VLM1", b"\x04", msgpack.packb({"seq": 3, "v": 9, "trace": "00-ab"})]
    assert wire.decode(frames, wire.FROM_CLIENT)[0] == p.Ping(seq=3)


@given(st.binary(max_size=64), st.binary(max_size=2), st.binary(max_size=256))
def test_decoder_never_raises_anything_but_protocol_error(magic, cmd, env):
    for table in (wire.FROM_CLIENT, wire.FROM_WORKER, wire.TO_CLIENT, wire.TO_WORKER):
        try:
            wire.decode([magic, cmd, env], table)
        except wire.ProtocolError:
            pass


@given(st.sampled_from([b"VLM1", b"VLW1"]), st.integers(0, 255),
       st.dictionaries(st.sampled_from(["id", "model", "params", "seq", "code", "message", "ttl_ms",
                                        "result", "state", "pid"]),
                       st.one_of(st.none(), st.integers(-2**63, 2**64 - 1), st.text(max_size=5), st.booleans(),
                                 st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=3))))
def test_fuzzed_envelopes_decode_or_refuse(magic, cmd, env):
    for table in (wire.FROM_CLIENT, wire.FROM_WORKER, wire.TO_CLIENT, wire.TO_WORKER):
        try:
            msg, _ = wire.decode([magic, bytes([cmd]), msgpack.packb(env)], table)
        except wire.ProtocolError:
            continue
        assert isinstance(msg, tuple(ALL))
