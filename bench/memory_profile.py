"""Peak device memory of each stage of one 1080p grounding forward (GPU): which part sets the peak?

    python -m bench.memory_profile CHECKPOINT [W H]
"""
import sys
import time

import mlx.core as mx
import numpy as np

from bench.gpu_ground import screenshot
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.backbone import encode_image, pointer_states
from workers.mlx.engine import MlxEngine
from workers.mlx.vision import normalized_patches

path = sys.argv[1]
W, H = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (1920, 1080)
eng = MlxEngine(ModelSpec(path=path, dtype="bfloat16", max_context_length=65536), EngineOptions("m", "/tmp", 1 << 30))
eng.load()
job = eng.prepare(GroundingRequest("m", screenshot(W, H), "click OK"))
mx.synchronize()
mx.clear_cache()
base = mx.get_active_memory()
print(f"weights active {base / 1e9:.2f} GB", flush=True)


def stage(name, fn):
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    print(f"{name:<40} peak over weights {(mx.get_peak_memory() - base) / 1e9:6.2f} GB   {1e3 * (time.perf_counter() - t):7.1f} ms",
          flush=True)
    return out


fv = eng._vision
from workers.mlx.vision import FastQwen2Vision
args = ([normalized_patches(eng._resized(job.image), fv.dtype)], [job.image.grid_thw[1:]])
for every in (0, 1, 2, 4, 8, 16):
    fvp = FastQwen2Vision(eng._model.vision_tower, eval_every=every)
    for _ in range(3):
        stage(f"fast vision, eval every {every} blocks", lambda: fvp(*args))
for _ in range(2):
    stage("fast vision (warm)", lambda: fv([normalized_patches(eng._resized(job.image), fv.dtype)], [job.image.grid_thw[1:]]))
enc = stage("fast vision", lambda: fv([normalized_patches(eng._resized(job.image), fv.dtype)], [job.image.grid_thw[1:]]))
from workers.images import pixel_values_of
pv = pixel_values_of(job.image.rgb)
stage("mlx-vlm vision tower", lambda: encode_image(eng._model, pv, job.image.grid_thw))
dec = stage("language model to pointer state", lambda: pointer_states(eng._model, job.input_ids, job.image_start, enc,
                                                                        job.position_ids, [job.pointer_pos]))
stage("pointer head", lambda: eng._head(enc, dec))
stage("engine.run (whole job)", lambda: mx.array(0) if eng.run([job]) else None)
stage("engine.run batch of 4", lambda: mx.array(0) if eng.run([job] * 4) else None)
q = mx.random.normal((1, 16, job.image.grid_thw[1] * job.image.grid_thw[2], 80)).astype(mx.bfloat16)
stage("one vision sdpa (16 heads, D=80)", lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1))
q = mx.random.normal((1, 12, len(job.input_ids), 128)).astype(mx.bfloat16)
k = mx.random.normal((1, 2, len(job.input_ids), 128)).astype(mx.bfloat16)
stage("one LM sdpa causal (12/2 heads, D=128)", lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1, mask="causal"))
