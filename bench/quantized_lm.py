"""Quantized language models (`quantize: 8|4`) on our forward: MLX's quantized matmul or the weight
dequantized before a bf16 matmul, against bf16 weights and against mlx-vlm's forward.

    python -m bench.quantized_lm CHECKPOINT [--size 1920x1080] [--bits 8,4] [--reps 10]

1. One language-model layer's four matmuls (q/k/v, o, gate/up, down, the checkpoint's sizes) at
   several row counts: bf16, quantized matmul, dequantize + matmul. Where dequantizing starts to pay
   sets the engine's `dequantize_rows`.
2. Per weight format, one engine: the whole forward of one screenshot (vision tower + language
   model to the pointer state) with mlx-vlm's language model and with ours in each matmul mode and
   chunk size, its peak memory; and a second question about the screenshot from the screenshot
   cache (the tail).
Medians of --reps, mx.synchronize() around each.
"""
from __future__ import annotations

import argparse
import tempfile

import mlx.core as mx

from bench.screens import png_bytes
from bench.timing import median_ms
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.backbone import pointer_state_after
from workers.mlx.checkpoint import QUANT_GROUP
from workers.mlx.engine import MlxEngine


def matmul_rows(hidden: int, qkv_out: int, inter: int, bits_list: list[int], rows_list: list[int],
                reps: int) -> list[str]:
    """Milliseconds for one layer's four matmuls, per row count and weight format."""
    key = iter(mx.random.split(mx.random.key(0), 8))
    shapes = [(qkv_out, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    weights = [(mx.random.normal(s, key=next(key)) * 0.02).astype(mx.bfloat16) for s in shapes]
    packed = {b: [mx.quantize(w, QUANT_GROUP, b) for w in weights] for b in bits_list}
    mx.eval(weights, packed)
    head = "| rows | bf16 ms | " + " | ".join(f"{b}-bit quantized matmul ms | {b}-bit dequantize + matmul ms"
                                            for b in bits_list) + " |"
    out = ["", head, "|" + "---|" * (2 + 2 * len(bits_list))]
    for rows in rows_list:
        xs = [(mx.random.normal((rows, s[1]), key=mx.random.key(rows)) * 0.5).astype(mx.bfloat16) for s in shapes]
        mx.eval(xs)
        cells = [median_ms(lambda: [x @ w.T for x, w in zip(xs, weights)], reps)]
        for b in bits_list:
            qmm = lambda: [mx.quantized_matmul(x, *p, transpose=True, group_size=QUANT_GROUP, bits=b)
                           for x, p in zip(xs, packed[b])]
            deq = lambda: [x @ mx.dequantize(*p, group_size=QUANT_GROUP, bits=b).astype(x.dtype).T
                           for x, p in zip(xs, packed[b])]
            cells += [median_ms(qmm, reps), median_ms(deq, reps)]
        out.append(f"| {rows} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return out


def engine_rows(path: str, bits: int | None, w: int, h: int, reps: int, tmp: str):
    """-> (table rows, the language model's (hidden, q/k/v rows, intermediate) sizes)."""
    eng = MlxEngine(ModelSpec(path=path, quantize=bits, max_pixels=5_720_064, warmup=[]),
                    EngineOptions("q", tmp, 1 << 30))
    report = eng.load()
    name = f"{bits}-bit" if bits else str(eng.dtype).split(".")[-1]
    layer = eng._model.language_model.model.layers[0]
    dims = (layer.self_attn.o_proj.weight.shape[0],
            sum(layer.self_attn[p].weight.shape[0] for p in ("q_proj", "k_proj", "v_proj")),
            layer.mlp.gate_proj.weight.shape[0])
    img = png_bytes(w, h, seed=3)
    job = eng.prepare(GroundingRequest("q", img, "click the search button"))
    eng.run([job])                                                     # stored in the cache
    asked = eng.prepare(GroundingRequest("q", img, "open the second menu"))
    entry = asked.cached
    tail_args = ([asked.input_ids[entry.prefix:]], [asked.position_ids[:, entry.prefix:]])
    ours = eng._lm
    every = ours.eval_every
    modes = [("mlx-vlm's", None, 0, every)] + ([("ours, quantized matmul", ours, 0, 4)] + [
        (f"ours, dequantized from {rows} row(s), 1 layer per chunk", ours, rows, 1)
        for rows in (512, 1)] if bits else [("ours", ours, 0, every)])
    out = []
    for label, lm, dequantize_rows, eval_every in modes:
        eng._lm = lm
        if lm is not None:
            lm.dequantize_rows, lm.eval_every = dequantize_rows, eval_every
        whole = median_ms(lambda: eng.forward([job])[1], reps)
        eng.reset_peak()
        eng.forward([job])
        peak = eng.memory().peak / 1e9
        tail = "-" if lm is None else \
            f"{median_ms(lambda: pointer_state_after(eng._model, lm, entry.kept, *tail_args), reps):.2f}"
        out.append(f"| {name} | {report.weights_bytes / 1e9:.2f} | {label} | {whole:.1f} | {peak:.2f} | {tail} |")
        print(out[-1], flush=True)
    eng._lm = ours
    ours.eval_every = every
    eng.unload()
    mx.clear_cache()
    return out, dims


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.quantized_lm")
    ap.add_argument("checkpoint")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--rows", default="16,64,256,1024,2816")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    bits_list = [int(b) for b in a.bits.split(",") if b]
    print(f"device {mx.default_device()}", flush=True)
    lines = ["| weights | weights GB | language model | whole forward ms | peak GB | cached question's tail ms |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in [None, *bits_list]:
            rows, dims = engine_rows(a.checkpoint, bits, w, h, a.reps, tmp)
            lines += rows
    if a.rows:
        lines += matmul_rows(*dims, bits_list, [int(r) for r in a.rows.split(",")], a.reps)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
