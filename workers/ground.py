"""Ground one instruction on one screenshot from the command line (no server):

    python -m workers.ground --model PATH --image FILE --instruction TEXT [--system TEXT]
        [--topk K] [--max-pixels N] [--dtype float32|bfloat16|float16] [--attention]

Prints one JSON object: `points` ([{x, y, nx, ny, score}], x/y in original pixels, best first),
`image_size` [w, h], `resized_size` [w, h], `grid` [n_h, n_w] and, with --attention, `attention`
(n_h*n_w floats, row-major). Bad arguments, files or checkpoints: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from common.config import AppConfig, ModelSpec, expand_path
from workers.torchless import keep_torch_and_transformers_out


def _positive(name: str, low: int = 1, high: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{name} must be within {low}..{high or 'inf'}, got {v}")
        return v
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.ground", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder, HF repo id (local cache) or tiny:<backbone>")
    ap.add_argument("--image", required=True, help="PNG / JPEG / WebP file")
    ap.add_argument("--instruction", required=True)
    ap.add_argument("--system", default=None, help="system prompt (default: the authors' for the backbone)")
    ap.add_argument("--topk", type=_positive("--topk", 1, 100), default=3)
    ap.add_argument("--max-pixels", type=_positive("--max-pixels", 784), default=5_720_064,
                    help="area of the resized image in pixels")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--attention", action="store_true", help="include the full attention map")
    ap.add_argument("--cache-dir", default=AppConfig.cache_dir, help="where tiny:<backbone> checkpoints go")
    args = ap.parse_args(argv)
    if not args.instruction.strip():
        ap.error("--instruction must not be empty")
    return args


def main(argv: list[str] | None = None) -> int:
    keep_torch_and_transformers_out()
    args = parse_args(argv)
    try:
        with open(args.image, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        print(f"error: cannot read image {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    from workers.engine import EngineOptions, GroundingRequest, JobError
    from workers.mlx.checkpoint import CheckpointError
    from workers.mlx.engine import MlxEngine
    spec = ModelSpec(path=args.model, dtype=args.dtype or "auto", topk=args.topk,
                     max_pixels=args.max_pixels, min_pixels=min(3136, args.max_pixels),
                     max_context_length=1 << 20, max_batch=1)
    options = EngineOptions(model_id="cli", cache_dir=expand_path(args.cache_dir, os.environ),
                            max_image_pixels=1 << 30, hf_home=os.environ.get("HF_HOME"))
    engine = MlxEngine(spec, options)
    try:
        engine.load()
        job = engine.prepare(GroundingRequest(job_id="cli", image=data, instruction=args.instruction,
                                              system=args.system, return_attention=args.attention))
        (result,) = engine.run([job])
    except CheckpointError as exc:
        print(f"error: cannot load model {args.model}: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    if isinstance(result, JobError):
        print(f"error: {result.code}: {result.message}", file=sys.stderr)
        return 1
    out = {"points": result.points, "image_size": list(result.image_size),
           "resized_size": list(result.resized_size), "grid": list(result.grid)}
    if args.attention:
        out["attention"] = np.frombuffer(result.attention, dtype="<f4").tolist()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
