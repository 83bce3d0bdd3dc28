"""Vision attention cost by head dim (GPU): Qwen2-VL's ViT uses 16 heads of 80. Does padding the
head dim to a size the fused kernel prefers pay for the extra FLOPs?  python -m bench.sdpa_dims [N]"""
import statistics
import sys
import time

import mlx.core as mx

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10764
for d in (64, 80, 96, 128):
    q = mx.random.normal((1, 16, N, d)).astype(mx.bfloat16)
    f = lambda: [mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1) for _ in range(8)]
    mx.eval(f())
    ts = []
    for _ in range(10):
        mx.synchronize(); t = time.perf_counter(); mx.eval(f()); mx.synchronize(); ts.append((time.perf_counter() - t) / 8)
    ms = statistics.median(ts) * 1e3
    print(f"sdpa N={N} heads=16 D={d}: {ms:.3f} ms, {4 * N * N * d * 16 / (ms / 1e3) / 1e12:.0f} TFLOP/s", flush=True)
