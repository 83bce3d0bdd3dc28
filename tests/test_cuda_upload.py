"""The one-copy screenshot upload declines off CUDA, and the engine then uploads with mx.array.

The copy itself runs only on MLX's CUDA backend: checked on the GPU machine by bench.upload and by
bench.gpu_ground (whose "device resize = PIL" column reads the image through the engine's upload),
and at every model load by cuda_upload.load's probe, which must get its bytes back exactly.
"""
import mlx.core as mx
import numpy as np

from common.config import ModelSpec
from workers.engine import EngineOptions
from workers.images import PreparedImage
from workers.mlx import cuda_upload
from workers.mlx.engine import MlxEngine


def test_load_declines_without_cuda(tmp_path):
    if mx.cuda.is_available():
        return
    assert cuda_upload.load() is None
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert eng._upload is None
    rgb = np.random.default_rng(1).integers(0, 256, (28, 56, 3), dtype=np.uint8)
    got = eng._resized(PreparedImage(None, (1, 2, 4), (56, 28), (56, 28), rgb))
    np.testing.assert_array_equal(np.array(got), rgb)
