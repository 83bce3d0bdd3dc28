"""Write a GUI-Actor-shaped random checkpoint (bf16, sharded) for GPU benchmarks.

    python -m bench.write_checkpoint OUT [--shape 2b|7b|3b-qwen2.5|7b-qwen2.5]
"""
import argparse

from workers.tiny_checkpoint import Dims, write_tiny_checkpoint

SHAPES = {"2b": ("qwen2_vl", Dims.gui_actor_2b, 4), "7b": ("qwen2_vl", Dims.gui_actor_7b, 8),
          "3b-qwen2.5": ("qwen2_5_vl", Dims.gui_actor_3b_qwen2_5, 4),
          "7b-qwen2.5": ("qwen2_5_vl", Dims.gui_actor_7b_qwen2_5, 8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="2b")
    args = ap.parse_args()
    backbone, dims, shards = SHAPES[args.shape]
    print(write_tiny_checkpoint(args.out, backbone, seed=0, shards=shards, dims=dims(), dtype="BF16"))


if __name__ == "__main__":
    main()
