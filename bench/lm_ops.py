"""Where the language model's prefill goes (GPU; mlx-vlm's Qwen2-VL text model, random bf16 weights).

    python -m bench.lm_ops [--shape 2b|7b] [--tokens 2944] [--reps N]

Times mlx-vlm's whole text model and ours (workers/mlx/language.py) to the final norm over one
GUI-Actor prompt (M-RoPE positions of a 1080p screenshot), then one decoder layer's ops, each repeated once per layer in one graph, with
TFLOP/s, and two fusions: q/k/v and gate/up as single matmuls.
"""
from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
from mlx_vlm.models.qwen2_vl.language import LanguageModel, apply_multimodal_rotary_pos_emb
from mlx_vlm.models.qwen2_vl.config import ModelConfig, TextConfig

from bench.timing import median_ms
from workers.families.gui_actor import mrope_positions
from workers.mlx.language import FastLanguageModel

SHAPES = {"2b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                     num_key_value_heads=2),
          "7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=tuple(SHAPES), default="2b")
    ap.add_argument("--tokens", type=int, default=2944)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    d = SHAPES[a.shape]
    tc = TextConfig.from_dict(dict(d, model_type="qwen2_vl", rms_norm_eps=1e-6, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0,
                                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}))
    mc = ModelConfig.from_dict(dict(model_type="qwen2_vl", text_config=tc, vision_config={}))
    lm = LanguageModel(tc, mc)
    lm.set_dtype(mx.bfloat16)
    mx.eval(lm.parameters())
    n, c, depth = a.tokens, d["hidden_size"], d["num_hidden_layers"]
    heads, kvh, hd, inter = d["num_attention_heads"], d["num_key_value_heads"], c // d["num_attention_heads"], d["intermediate_size"]
    h = (mx.random.normal((1, n, c)) * 0.1).astype(mx.bfloat16)
    grid = (39, 69) if n > 2711 else (1, max(1, n - 40))          # a 1080p screenshot's tokens
    pos = mx.array(mrope_positions(n, 20, *grid)[:, None, :].astype("int32"))
    dummy = mx.zeros((1, n), dtype=mx.int32)
    layer = lm.model.layers[0]
    att = layer.self_attn
    cos, sin = att.rotary_emb(h, pos)
    q = att.q_proj(h).reshape(1, n, heads, hd).transpose(0, 2, 1, 3)
    k = att.k_proj(h).reshape(1, n, kvh, hd).transpose(0, 2, 1, 3)
    v = att.v_proj(h).reshape(1, n, kvh, hd).transpose(0, 2, 1, 3)
    g = layer.mlp.gate_proj(h)
    mx.eval(cos, sin, q, k, v, g)
    qkv_w = mx.concatenate([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
    qkv_b = mx.concatenate([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
    gu_w = mx.concatenate([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
    mx.eval(qkv_w, qkv_b, gu_w)
    swiglu = mx.compile(lambda a_, b_: nn.silu(a_) * b_)
    mm = lambda m, kk, nn_: 2 * m * kk * nn_
    cases = [
        ("input RMSNorm", lambda: layer.input_layernorm(h), 0),
        ("q, k, v projections (three matmuls)", lambda: (att.q_proj(h), att.k_proj(h), att.v_proj(h)), mm(n, c, c + 2 * kvh * hd)),
        ("q, k, v as one matmul", lambda: mx.addmm(qkv_b, h, qkv_w.T), mm(n, c, c + 2 * kvh * hd)),
        ("M-RoPE on q, k", lambda: apply_multimodal_rotary_pos_emb(q, k, cos, sin), 0),
        ("causal sdpa (GQA)", lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, mask="causal"),
         2 * n * n * c),
        ("o projection", lambda: att.o_proj(h), mm(n, c, c)),
        ("gate, up projections (two matmuls)", lambda: (layer.mlp.gate_proj(h), layer.mlp.up_proj(h)), 2 * mm(n, c, inter)),
        ("gate, up as one matmul", lambda: h @ gu_w.T, 2 * mm(n, c, inter)),
        ("silu(gate) * up", lambda: swiglu(g, g), 0),
        ("down projection", lambda: layer.mlp.down_proj(g), mm(n, inter, c)),
        ("whole decoder layer (mlx-vlm)", lambda: layer(h, "causal", None, pos, (cos, sin)), 0),
    ]
    full = median_ms(lambda: lm.model(dummy, inputs_embeds=h, position_ids=pos), a.reps)
    fast = FastLanguageModel(lm.model)
    ours = median_ms(lambda: fast.pointer_states(h, pos, [n - 1]), a.reps)
    diff = mx.abs(fast.pointer_states(h, pos, [n - 1]).astype(mx.float32)
                  - lm.model(dummy, inputs_embeds=h, position_ids=pos)[:, n - 1].astype(mx.float32)).max().item()
    print(f"device {mx.default_device()}  {a.shape}: {n} tokens, {depth} layers; to the final norm: mlx-vlm "
          f"{full:.2f} ms, ours (workers/mlx/language.py, pointer row) {ours:.2f} ms; max |diff| {diff:.3g}"
          f"\n\n| op (x{depth}) | ms | TFLOP/s |\n|---|---|---|")
    for name, fn, flop in cases:
        ms = median_ms(lambda: [fn() for _ in range(depth)], a.reps)
        print(f"| {name} | {ms:.2f} | {f'{depth * flop / ms / 1e9:.0f}' if flop else '-'} |", flush=True)


if __name__ == "__main__":
    main()
