"""Write a GUI-Actor-shaped random checkpoint (bf16, sharded) for GPU benchmarks.

    python -m bench.write_checkpoint OUT [--shape 2b|7b]
"""
import argparse

from workers.tiny_checkpoint import Dims, write_tiny_checkpoint

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--shape", choices=("2b", "7b"), default="2b")
args = ap.parse_args()
dims = Dims.gui_actor_2b() if args.shape == "2b" else Dims.gui_actor_7b()
print(write_tiny_checkpoint(args.out, "qwen2_vl", seed=0, shards=4 if args.shape == "2b" else 8, dims=dims, dtype="BF16"))
