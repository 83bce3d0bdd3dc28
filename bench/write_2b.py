"""Write a GUI-Actor-2B-shaped random checkpoint (bf16, 4 shards) for GPU benchmarks: python -m bench.write_2b OUT"""
import sys

from workers.tiny_checkpoint import Dims, write_tiny_checkpoint

print(write_tiny_checkpoint(sys.argv[1], "qwen2_vl", seed=0, shards=4, dims=Dims.gui_actor_2b(), dtype="BF16"))
