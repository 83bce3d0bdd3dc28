"""What the language model's tail tests share: the tiny model loaded with a screenshot kept."""
from bench.screens import png_bytes
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine


def engine_keeping_a_screenshot(tmp_path) -> tuple[MlxEngine, bytes]:
    """The tiny model loaded, with one screenshot's state in its cache -> (engine, the PNG)."""
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", max_pixels=200_704), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    img = png_bytes(400, 300, 1)
    eng.run([eng.prepare(GroundingRequest("0", img, "click OK"))])
    return eng, img
