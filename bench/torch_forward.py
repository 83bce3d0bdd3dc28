"""PyTorch baseline of one GUI-Actor-shaped forward (transformers Qwen2-VL, random weights, bf16).

    python -m bench.torch_forward torch W H REPS [sdpa|eager|flash_attention_2]
                                  [--shape 2b|7b|3b-qwen2.5|7b-qwen2.5] [--energy]

The same measurement as the reference `prefill_floor.py torch ...` (whose command line it accepts,
so bench.gpu_ground can run either), for the 7B shape and the Qwen2.5-VL backbones as well: the
reference knows only the 2B.
Prints one line with the median and min over REPS after 2 warm-ups, and the peak memory; with
--energy, between them a line with the joules per forward, median power and SM clock over the timed
forwards (bench/gpu_energy.py; bench.energy reads it).
"""
import contextlib
import math
import statistics
import sys
import time

SHAPES = {
    "2b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
               num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
    "3b-qwen2.5": dict(hidden_size=2048, num_hidden_layers=36, intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=2, tie_word_embeddings=True),
    "7b-qwen2.5": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False),
}
IMG, TEXT = 151655, 60


def smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=5720064):
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    return hb, wb


def main(argv):
    shape = "2b"
    energy = "--energy" in argv
    argv = [a for a in argv if a != "--energy"]
    if "--shape" in argv:
        i = argv.index("--shape")
        shape = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    _, w, h, reps = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    attn = argv[4] if len(argv) > 4 else "sdpa"
    import torch
    import transformers
    rh, rw = smart_resize(h, w)
    gh, gw = rh // 14, rw // 14
    n_vis = gh * gw // 4
    ids = [151644] * 20 + [151652] + [IMG] * n_vis + [151653] + [872] * (TEXT - 22)
    txt = dict(SHAPES[shape], rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=32768,
               rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    if shape.endswith("qwen2.5"):
        vis = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=txt["hidden_size"],
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3, hidden_act="silu")
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vis = dict(depth=32, embed_dim=1280, hidden_size=txt["hidden_size"], num_heads=16, mlp_ratio=4,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    cfg = config_cls(text_config=txt, vision_config=vis, image_token_id=IMG, video_token_id=151656,
                     vision_start_token_id=151652, vision_end_token_id=151653,
                     tie_word_embeddings=txt["tie_word_embeddings"])
    cfg._attn_implementation = attn
    with torch.device("cuda"):
        model = model_cls(cfg).to(torch.bfloat16).eval()
    input_ids = torch.tensor([ids], device="cuda")
    pv = torch.randn(gh * gw, 1176, device="cuda", dtype=torch.bfloat16)
    grid = torch.tensor([[1, gh, gw]], device="cuda")

    @torch.inference_mode()
    def step():
        return model(input_ids=input_ids, pixel_values=pv, image_grid_thw=grid, logits_to_keep=1,
                     mm_token_type_ids=(input_ids == IMG).long()).logits
    for _ in range(2):
        step()
    times = []
    meter = None
    if energy:
        try:
            from bench.gpu_energy import EnergyMeter
        except ImportError:     # run as a script without the project on the path: bench/ is sys.path[0]
            from gpu_energy import EnergyMeter
        meter = EnergyMeter()
    torch.cuda.synchronize()
    with meter or contextlib.nullcontext():
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    print(f"torch {shape}: {w}x{h} -> {rw}x{rh}, visual tokens {n_vis}, total {len(ids)}, "
          f"median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms, reps {reps}", flush=True)
    if meter:
        print(f"energy {meter.joules / reps:.1f} J per forward, {meter.watts:.0f} W, {meter.sm_mhz:.0f} MHz", flush=True)
    print("peak GB", torch.cuda.max_memory_allocated() / 1e9)


if __name__ == "__main__":
    main(sys.argv[1:])
