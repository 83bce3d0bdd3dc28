"""Undo a PNG's row filters on the GPU (MLX CUDA backend only): filtered rows -> RGB pixels.

Why: see workers/png_rows.py; this is the half of Pillow's PNG decode that the CPU no longer does.

How: each row names one of five filters, and a filtered byte is undone from the bytes to its left
(a), above (b) and above-left (c), all already undone; Sub, Average and Paeth make every row a
sequential chain. So the kernel runs a wavefront in one thread block: thread t owns row t (then
t + THREADS, ...), cut into tiles of TILE_BYTES bytes, and does its tile j at step t + j; by then the row
above has finished tiles up to j, and `__syncthreads` between steps makes those writes visible.
The arithmetic is the PNG specification's, in integers, so the bytes are Pillow's; `load` checks
that on a probe with every filter type against Pillow's own decode, and declines (the caller keeps
Pillow) if the kernel cannot be built or disagrees.
"""
from __future__ import annotations

import io
import logging
import zlib

import mlx.core as mx
import numpy as np
from PIL import Image

from workers.mlx.cuda_rotary import kernel_name

log = logging.getLogger(__name__)

THREADS = 512       # rows per wavefront pass: one thread block
VEC = 16            # bytes per vector load
TILE_BYTES = 48     # bytes per wavefront step: 16 RGB pixels, three 16-byte loads

_SOURCE = """
    // data: [height, stride] filtered bytes, rows padded to whole tiles; filters: [height]
    const int height = data_shape[0];
    const int stride = data_shape[1];
    const int t = threadIdx.x;
    const int tiles = stride / TILE_BYTES;
    constexpr int V = TILE_BYTES / 16;
    for (int base = 0; base < height; base += blockDim.x) {
        const int r = base + t;
        const int live = min((int)blockDim.x, height - base);
        const bool mine = r < height;
        const uint8_t* src = data + (int64_t)r * stride;
        uint8_t* dst = out + (int64_t)r * stride;
        const uint8_t* up = dst - stride;
        const int filter = mine ? filters[r] : 0;
        const bool above = r > 0;
        // the pixel to the left (a) and above-left (c) stay in registers from one tile to the next
        int a[C], c[C];
        #pragma unroll
        for (int k = 0; k < C; ++k) { a[k] = 0; c[k] = 0; }
        for (int step = 0; step < live + tiles - 1; ++step) {
            const int j = step - t;
            if (mine && j >= 0 && j < tiles) {
                // whole 16-byte loads and stores: rows are 16-byte aligned, and one load per 16
                // bytes instead of one per byte is what keeps a step short
                uint4 sv[V], bv[V];
                #pragma unroll
                for (int q = 0; q < V; ++q) {
                    sv[q] = reinterpret_cast<const uint4*>(src + j * TILE_BYTES)[q];
                    bv[q] = above ? reinterpret_cast<const uint4*>(up + j * TILE_BYTES)[q] : make_uint4(0, 0, 0, 0);
                }
                uint8_t* s8 = reinterpret_cast<uint8_t*>(sv);
                const uint8_t* b8 = reinterpret_cast<const uint8_t*>(bv);
                #pragma unroll
                for (int i = 0; i < TILE_BYTES; ++i) {
                    const int k = i % C;
                    const int b = b8[i];
                    const int p = a[k] + b - c[k];
                    const int pa = abs(p - a[k]), pb = abs(p - b), pc = abs(p - c[k]);
                    const int paeth = (pa <= pb && pa <= pc) ? a[k] : (pb <= pc ? b : c[k]);
                    // selects, not branches: neighbouring rows in a warp use different filters
                    const int pred = filter == 1 ? a[k] : filter == 2 ? b
                                   : filter == 3 ? (a[k] + b) >> 1 : filter == 4 ? paeth : 0;
                    const int v = (s8[i] + pred) & 255;
                    a[k] = v;
                    c[k] = b;
                    s8[i] = (uint8_t)v;
                }
                #pragma unroll
                for (int q = 0; q < V; ++q) {
                    reinterpret_cast<uint4*>(dst + j * TILE_BYTES)[q] = sv[q];
                }
            }
            __syncthreads();
        }
    }
"""


class PngUnfilter:
    """rows uint8 [H, 1 + W*3] (as workers.png_rows.filtered_rows gives them) -> uint8 [H, W, 3]."""

    def __init__(self, threads: int = THREADS):
        self.threads = threads
        self.kernel = mx.fast.cuda_kernel(name=kernel_name("png_unfilter", _SOURCE), input_names=["data", "filters"],
                                          output_names=["out"], source=_SOURCE)

    def __call__(self, rows: mx.array) -> mx.array:
        height, row_bytes = rows.shape[0], rows.shape[1] - 1
        stride = -(-row_bytes // TILE_BYTES) * TILE_BYTES
        # the layout the kernel wants, made on the device (a fast copy): rows padded to whole tiles,
        # so 16-byte aligned, and the filter bytes apart
        data = mx.pad(rows[:, 1:], [(0, 0), (0, stride - row_bytes)])
        # zero-filled first: a launch that fails (too many registers for the block, say) leaves
        # zeros, which the load probe catches, rather than a recycled buffer's old pixels
        (out,) = self.kernel(inputs=[data, rows[:, 0]], template=[("C", 3), ("TILE_BYTES", TILE_BYTES)],
                             grid=(self.threads, 1, 1), threadgroup=(self.threads, 1, 1),
                             output_shapes=[(height, stride)], output_dtypes=[mx.uint8], init_value=0)
        return out[:, :row_bytes].reshape(height, row_bytes // 3, 3)


def probe_png(width: int, height: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """(an RGB PNG whose rows use every filter type in turn on random bytes, its filtered rows).
    Any bytes are valid filtered data, so this reaches every branch of every filter."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (height, 1 + 3 * width), dtype=np.uint8)
    rows[:, 0] = np.arange(height) % 5
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = lambda kind, body: (len(body).to_bytes(4, "big") + kind + body
                                + zlib.crc32(kind + body).to_bytes(4, "big"))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes()))
           + chunk(b"IEND", b""))
    return png, rows


def load() -> PngUnfilter | None:
    """The kernel if MLX runs on CUDA and it reproduces Pillow's decode on a probe, else None."""
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()) or mx.default_device() != mx.gpu:
        return None
    try:
        unfilter = PngUnfilter()
        # taller than one thread block's rows, with a ragged last tile
        png, rows = probe_png(333, THREADS + 77)
        got = np.array(unfilter(mx.array(rows)))
        want = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        if not np.array_equal(got, want):
            log.warning("PNG unfilter kernel disagrees with Pillow on the probe; Pillow decodes PNGs")
            return None
        return unfilter
    except Exception as exc:       # NVRTC missing or failing: Pillow still decodes
        log.warning("PNG unfilter kernel unavailable (%s: %s); Pillow decodes PNGs", type(exc).__name__, exc)
        return None
