"""Reading a checkpoint's tensors on several threads (workers/mlx/cuda_weights.py).

The device copy itself runs only on MLX's CUDA backend: checked on the GPU machine, where every
tensor of the 2B-shaped checkpoint came back bit for bit (bench/RESULTS.md), and at every load by
`read`'s comparison with mx.load. Here the planning and the threaded reads run for real on real
safetensors files, their copies landing in host arrays (`ctypes.memmove`, as `cuMemcpyHtoD` would
into device buffers)."""
import ctypes
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.mlx import cuda_weights
from workers.mlx.checkpoint import read_checkpoint, read_header
from workers.tiny_checkpoint import write_safetensors, write_tiny_checkpoint


def _buffers(n: int, size: int):
    keep = [(ctypes.c_uint8 * size)() for _ in range(n)]
    return keep, [(memoryview(b).cast("B"), ctypes.addressof(b)) for b in keep]


def _read_to_host(tensors, threads: int, chunk: int, gap: int = cuda_weights.GAP) -> dict[str, np.ndarray]:
    """cuda_weights' plan and threads, each tensor's bytes landing in a numpy array."""
    out = {name: np.zeros(t.end - t.start, np.uint8) for name, t in tensors.items()}
    runs = cuda_weights.plan(((t.file, t.start, t.end, out[name].ctypes.data) for name, t in tensors.items()),
                             chunk, gap)
    _keep, buffers = _buffers(threads, max(r.end - r.start for r in runs))
    cuda_weights.execute(runs, buffers, lambda dst, src, n: ctypes.memmove(dst, src, n))
    return out


def _stored_bytes(path, name) -> np.ndarray:
    a = mx.load(str(path))[name]
    return np.array(a.view(mx.uint8) if a.dtype != mx.bfloat16 else a.view(mx.uint16)).view(np.uint8).ravel()


@pytest.mark.parametrize("threads, chunk", [(1, cuda_weights.CHUNK), (3, 4096), (8, 1000)])
def test_every_tensor_arrives_as_stored(tmp_path, threads, chunk):
    ckpt = read_checkpoint(write_tiny_checkpoint(tmp_path / "ckpt", shards=2, dtype="BF16"))
    wanted = {k: t for i, (k, t) in enumerate(sorted(ckpt.tensors.items())) if i % 3}   # gaps between them
    got = _read_to_host(wanted, threads, chunk, gap=64)
    assert len({t.file for t in wanted.values()}) == 2
    for name, t in wanted.items():
        np.testing.assert_array_equal(got[name], _stored_bytes(t.file, name), err_msg=name)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40), st.booleans()), min_size=1, max_size=30),
       chunk=st.integers(1, 500), gap=st.integers(0, 100))
def test_a_plan_covers_each_wanted_byte_once_in_runs_no_longer_than_a_chunk(sizes, chunk, gap):
    spans, pos = [], 100          # (start, end, destination, wanted) laid out with gaps, as in a file
    for i, (size, skip, wanted) in enumerate(sizes):
        pos += skip
        spans.append((pos, pos + size, 10**6 * (i + 1), wanted))
        pos += size
    runs = cuda_weights.plan([("f", s, e, d) for s, e, d, w in spans if w], chunk, gap)
    written = {}
    for r in runs:
        assert 0 < r.end - r.start <= chunk
        for offset, n, dst in r.pieces:
            assert 0 <= offset and offset + n <= r.end - r.start and n > 0
            for k in range(n):
                assert dst + k not in written
                written[dst + k] = r.start + offset + k
    expected = {d + k: s + k for s, e, d, w in spans if w for k in range(e - s)}
    assert written == expected
    starts = [r.start for r in runs]
    assert starts == sorted(starts)


def test_a_file_shorter_than_its_header_says_fails_the_read(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": np.ones((8, 8), np.float32), "b": np.ones((300,), np.float32)})
    tensors = read_header(path)
    with open(path, "r+b") as fh:        # cut after the header was read: a file changed underfoot
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(OSError, match="ends before"):
        _read_to_host(tensors, 2, 64)


def test_a_failed_copy_stops_every_thread_and_is_raised(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {f"t{i}": np.full((64,), i, np.float32) for i in range(50)})
    runs = cuda_weights.plan([(path, t.start, t.end, 0) for t in read_header(path).values()], 256, 0)
    copies = []

    def copy(dst, src, n):
        copies.append(n)
        if len(copies) == 5:
            raise RuntimeError("CUDA error 700")
    _keep, buffers = _buffers(4, 256)
    with pytest.raises(RuntimeError, match="CUDA error 700"):
        cuda_weights.execute(runs, buffers, copy)
    assert len(copies) < len(runs)


def test_tensors_mlx_cannot_hold_as_stored_are_left_to_mx_load(tmp_path):
    from workers.mlx.checkpoint import TensorInfo
    f = tmp_path / "w.safetensors"
    assert cuda_weights.readable(TensorInfo(f, "BF16", (3, 4), 100, 124))
    assert cuda_weights.readable(TensorInfo(f, "BOOL", (0, 4), 100, 100))
    assert not cuda_weights.readable(TensorInfo(f, "BF16", (3, 4), 100, 120))        # fewer bytes than its shape
    assert not cuda_weights.readable(TensorInfo(f, "F8_E4M3", (3, 4), 100, 112))     # a dtype MLX does not hold
    assert not cuda_weights.readable(TensorInfo(f, "F64", (2,), 0, 16))


def test_read_declines_off_cuda(tmp_path):
    if mx.cuda.is_available():
        pytest.skip("the CUDA backend is here")
    ckpt = read_checkpoint(write_tiny_checkpoint(tmp_path / "ckpt"))
    assert cuda_weights.read(ckpt.tensors) is None


def test_header_entries_give_each_tensors_bytes(tmp_path):
    path = tmp_path / "w.safetensors"
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.full((4,), 7, np.float32)}
    write_safetensors(path, arrays)
    raw = path.read_bytes()
    for name, t in read_header(path).items():
        assert t.end - t.start == math.prod(t.shape) * 4
        np.testing.assert_array_equal(np.frombuffer(raw[t.start:t.end], np.float32), arrays[name].ravel())
