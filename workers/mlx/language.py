"""The language model's forward for GUI-Actor, over mlx-vlm's Qwen2 text-model parameters.

Both backbones (Qwen2-VL, Qwen2.5-VL) use the same Qwen2 decoder with M-RoPE. GUI-Actor needs
one thing from it: the final-norm hidden state at each prompt's <|pointer_pad|>. Why not mlx-vlm's
own forward (bench/RESULTS.md, `bench.lm_ops`, H200, 2B shape, 2,944 tokens, 28 layers):
- q, k and v are three matmuls (2.77 ms in all); one matmul over the concatenated weights takes
  1.65 ms, and gate/up likewise 8.08 -> 7.47 ms;
- the M-RoPE application runs as separate elementwise kernels (2.66 ms); compiled, it is one;
- the last layer's output matters only at the pointer tokens, so its attention runs for those
  queries alone and its MLP for those rows alone.
Same arithmetic otherwise: cos/sin from mlx-vlm's own rotary module, RMSNorm, causal attention.
Quantized language models (`quantize: 8|4`) take the same forward: a packed weight, its scales and
biases concatenate along the output rows just as a plain weight does (MLX's groups run along each
row), so q/k/v and gate/up stay single matmuls. Each matmul is `x @ w.T` for a plain weight and
MLX's quantized matmul for a packed one, or, where `dequantize_rows` says so (CUDA and the CPU:
there MLX's quantized matmul is slower than dequantizing and one plain matmul; bench/RESULTS.md),
the weight dequantized just before its matmul: a transient the size of one plain weight.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from mlx_vlm.models.cache import KVCache

from workers.mlx import cuda_prefix_join
from workers.mlx.cuda_prefix_join import after_prefix, rope, split_heads
from workers.mlx.cuda_rotary import on_cuda
from workers.mlx.run_ahead import RunAhead
from workers.mlx.uncompiled import uncompiled

if TYPE_CHECKING:
    from workers.mlx.split import Split


# Where every matmul of a packed weight dequantizes it first (`dequantize_rows` 1): on CUDA and the
# CPU. On CUDA MLX's quantized matmul took a 1080p prompt's 2,816 rows 2.2-3.6x longer than
# dequantizing and one bf16 matmul, was no faster at a cached question's 16-64 rows (tail 14.2 ms
# against 11.7 ms dequantized, 2B 4-bit, H200), and from 8 rows it runs CUTLASS kernels that MLX
# compiles at run time, 34-44 s each on a machine's first load (bench.first_load). On the CPU it
# is 3-50x slower than dequantizing at any row count (16 rows: 141 against 43 ms for one 8960x1536
# weight). On Metal, MLX's quantized matmul is its tuned path, unmeasured here: it stays.
def dequantize_rows_here() -> int:
    """`FastLanguageModel`'s `dequantize_rows` for the default device."""
    return 0 if mx.default_device() == mx.gpu and mx.metal.is_available() else 1


# The load probe's reference (mlx-vlm's forward) runs a packed model a few tokens at a time through
# its KV cache on CUDA: 2 probe rows x 3 tokens stay below the 8 rows from which MLX's quantized
# matmul compiles a CUTLASS kernel (34-44 s on a machine's first load; under 8 rows a precompiled
# kernel runs). Elsewhere MLX compiles nothing at run time and the reference runs in one call.
PROBE_REFERENCE_STEP = 3


def probe_reference_step_here(packed: bool) -> int:
    """`agrees_with`'s `reference_step` for the default device (0: the whole probe at once)."""
    return PROBE_REFERENCE_STEP if packed and on_cuda() else 0


def _mm(x, w, dequantize_rows: int):
    """x @ W.T for w = (arrays, fmt): arrays (W,) and fmt None for a plain weight; for a packed one
    arrays (packed, scales[, biases]) and fmt (group_size, bits, mode)."""
    arrays, fmt = w
    if fmt is None:
        return x @ arrays[0].T
    group_size, bits, mode = fmt
    if dequantize_rows and x.size // x.shape[-1] >= dequantize_rows:
        return x @ mx.dequantize(*arrays, group_size=group_size, bits=bits, mode=mode).astype(x.dtype).T
    return mx.quantized_matmul(x, *arrays, transpose=True, group_size=group_size, bits=bits, mode=mode)


@mx.compile
def _qkv(x, norm_w, qkv_w, qkv_b, eps, dequantize_rows):
    normed = mx.fast.rms_norm(x, norm_w, eps)
    if qkv_w[1] is None:
        return mx.addmm(qkv_b, normed, qkv_w[0][0].T)
    return _mm(normed, qkv_w, dequantize_rows) + qkv_b


@mx.compile
def _mlp_block(x, o, o_w, norm_w, gate_up_w, down_w, eps, dequantize_rows):
    """Output projection + residual, RMSNorm, SwiGLU MLP + residual."""
    h = x + _mm(o, o_w, dequantize_rows)
    gate, up = mx.split(_mm(mx.fast.rms_norm(h, norm_w, eps), gate_up_w, dequantize_rows), 2, axis=-1)
    return h + _mm(nn.silu(gate) * up, down_w, dequantize_rows)


_PACKED = ("weight", "scales", "biases")


def _weight(linear):
    """A linear layer's weight as `_mm` takes it (no copy)."""
    if isinstance(linear, nn.QuantizedLinear):
        return tuple(linear[k] for k in _PACKED if k in linear), (linear.group_size, linear.bits, linear.mode)
    return (linear.weight,), None


def _concatenated(linears, names) -> tuple:
    """The linears' parameters `names` concatenated along the output rows. The modules' own become
    views into the result: one copy in memory, and mlx-vlm's forward (the load probe) still runs."""
    whole = [mx.concatenate([lin[k] for lin in linears]) for k in names]
    mx.eval(whole)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        for k, w in zip(names, whole):
            lin[k] = w[start:start + rows]
        start += rows
    return tuple(whole)


def _fused(linears):
    """The linears' weights as one, as `_mm` takes them."""
    fmt = _weight(linears[0])[1]
    if any(_weight(lin)[1] != fmt for lin in linears):
        raise ValueError("linears fused into one matmul must share their quantization")
    return _concatenated(linears, [k for k in _PACKED if k in linears[0]]), fmt


def _reference_forward(lm, h, position_ids, step: int) -> mx.array:
    """mlx-vlm's forward over embeddings h [B, L, C] -> [B, L, C]; with `step`, that many tokens
    per call through its KV cache (the same causal attention, fewer rows per matmul)."""
    ids = mx.zeros(h.shape[:2], dtype=mx.int32)
    if not step:
        return lm(ids, inputs_embeds=h, position_ids=position_ids)
    cache = [KVCache() for _ in lm.layers]
    return mx.concatenate([lm(ids[:, i:i + step], inputs_embeds=h[:, i:i + step], cache=cache,
                              position_ids=position_ids[:, :, i:i + step])
                           for i in range(0, h.shape[1], step)], axis=1)


# The language model splits over a vision split's GPUs where that saves at least this many matmul
# FLOPs per layer on each rank. Measured on two H200s (bench/RESULTS.md, 1080p, 2,816 tokens):
# the 7B shape saves 656 GFLOP per layer and its forward 25-30 ms; the 2B shape saves 132 GFLOP and
# gained nothing (at 720p it lost 4 ms): the per-layer exchange of keys and values costs about
# what 150 GFLOP take. The threshold sits at twice that.
SPLIT_MIN_SAVED_FLOP = 300e9


def split_pays(layer_params: int, tokens: int, ranks: int) -> bool:
    """Whether splitting a batch of `tokens` (all its prompts' padded tokens) over `ranks` saves
    each rank enough matmul work per layer (of `layer_params` weights) to pay for the layer's
    collective, whose cost is mostly latency."""
    return 2 * layer_params * tokens * (ranks - 1) / ranks >= SPLIT_MIN_SAVED_FLOP


def _shared_inputs(split: "Split", h: mx.array, position_ids: mx.array) -> tuple[mx.array, mx.array]:
    """Rank 0's embeddings and positions on every rank (the others pass zeros). Collectives must
    run in one order on every rank: the positions' waits for the embeddings' explicitly, since
    nothing else orders two independent arrays in MLX's graph."""
    h = split.share(h)
    return h, split.share(mx.depends(position_ids, h))


class FastLanguageModel:
    """`pointer_states(h, position_ids, pointer_pos)` over mlx-vlm's `Qwen2Model` parameters."""

    def __init__(self, lm, eval_every: int | None = None, dequantize_rows: int = 0):
        """`dequantize_rows`: a packed weight is dequantized before its matmul where at least this
        many rows meet it (0: never; MLX's quantized matmul runs). Read at each call, as is
        `eval_every`, the layers per chunk of the graph (bench.memory_profile): 4 by default, 1 where
        packed weights are dequantized, since each chunk in flight holds its layers' dequantized
        weights (7B shape, 4-bit, H100: peak 14.9 -> 8.95 GB at the same speed; bench.quantized_lm)."""
        self.lm = lm
        self.dequantize_rows = dequantize_rows
        att0 = lm.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = att0.n_heads, att0.n_kv_heads, att0.head_dim
        self.scale = att0.scale
        self.eps = lm.layers[0].input_layernorm.eps
        self.layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            projections = (a.q_proj, a.k_proj, a.v_proj)
            (qkv_b,) = _concatenated(projections, ["bias"])
            qkv_w = _fused(projections)
            gate_up_w = _fused((m.gate_proj, m.up_proj))
            mx.eval(a.parameters(), m.parameters())
            self.layers.append(((layer.input_layernorm.weight, qkv_w, qkv_b),
                                (_weight(a.o_proj), layer.post_attention_layernorm.weight,
                                 gate_up_w, _weight(m.down_proj))))
        mx.clear_cache()
        c, inter = lm.norm.weight.shape[0], lm.layers[0].mlp.gate_proj.weight.shape[0]   # rows: never packed
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.layer_params = c * (2 * q_width + 2 * kv_width) + 3 * c * inter      # q, k, v, o; gate, up, down
        weights = [w for block, rest in self.layers for w in (block[1], rest[0], rest[2], rest[3])]
        self.packed = any(fmt is not None for _, fmt in weights)
        self.eval_every = eval_every if eval_every is not None else 1 if self.packed and dequantize_rows else 4
        # a cached question's q, k, v in one kernel on CUDA (None elsewhere: MLX ops)
        self.prefix_join = cuda_prefix_join.load(self.heads, self.kv_heads, self.head_dim, lm.norm.weight.dtype)
        self._tail_fn = None           # ((join, dequantize_rows) it was traced with, the compiled tail)

    @staticmethod
    def supports(lm) -> bool:
        """False for a layout this forward does not know."""
        try:
            a, m = lm.layers[0].self_attn, lm.layers[0].mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            return (all(type(l) in (nn.Linear, nn.QuantizedLinear) for l in linears) and "bias" in a.q_proj
                    and "bias" not in a.o_proj and "bias" not in m.gate_proj)
        except (AttributeError, IndexError):
            return False

    def agrees_with(self, lm, reference_step: int | None = None) -> bool:
        """A probe at load: two padded rows through this forward and mlx-vlm's. A wrong index, mask
        or rotary is off by the size of the values; kernel choices and bf16 rounding are far below
        the 10 % allowed here. Packed weights are probed in both matmul modes where the configured
        `dequantize_rows` would leave the probe's rows to one of them. `reference_step`: mlx-vlm's
        forward runs that many tokens at a time through its KV cache (0: all at once; None: as
        `probe_reference_step_here` says)."""
        c = lm.norm.weight.shape[0]
        dtype = lm.norm.weight.dtype
        h = (mx.random.normal((2, 70, c), key=mx.random.key(0)) * 0.5).astype(dtype)
        pos = mx.broadcast_to(mx.arange(70)[None, None], (3, 2, 70)).astype(mx.int32)
        ptr = [69, 40]
        step = probe_reference_step_here(self.packed) if reference_step is None else reference_step
        with uncompiled():       # built for this probe only (workers/mlx/uncompiled.py)
            theirs = _reference_forward(lm, h, pos, step)
            theirs = theirs[mx.arange(2), mx.array(ptr)].astype(mx.float32)
        scale = max(mx.abs(theirs).max().item(), 1e-6)
        configured = self.dequantize_rows
        try:
            for rows in {configured, 1 if configured and self.packed else configured}:
                self.dequantize_rows = rows
                ours = self.pointer_states(h, pos, ptr).astype(mx.float32)
                if ours.shape != theirs.shape or mx.abs(ours - theirs).max().item() > 0.1 * scale:
                    return False
            return True
        finally:
            self.dequantize_rows = configured

    def _attention_inputs(self, h, block, cos, sin):
        q, k, v = split_heads(_qkv(h, *block, self.eps, self.dequantize_rows), self.heads, self.kv_heads, self.head_dim)
        q, k = rope(q, k, cos, sin)
        return q, k, v

    def _attention_inputs_after(self, h, block, cos, sin, pk, pv):
        """`_attention_inputs` of a tail, its k and v joined after the kept prefix's (pk, pv)."""
        if self.prefix_join is not None:
            return self.prefix_join(_qkv(h, *block, self.eps, self.dequantize_rows), cos, sin, pk, pv)
        return after_prefix(*self._attention_inputs(h, block, cos, sin), pk, pv)

    def pointer_states(self, h: mx.array, position_ids: mx.array, pointer_pos: list[int],
                       pace: RunAhead | None = None, keep: list[int] | None = None, split: "Split | None" = None):
        """h [B, L, C] input embeddings (image vectors in place), position_ids [3, B, L] M-RoPE
        positions, pointer_pos[b] the <|pointer_pad|> index of row b -> [B, C] after the final norm.
        Every `eval_every` layers the graph is handed to `pace` (workers/mlx/run_ahead.py).

        With `keep` (a prefix length per row, 0 for none) it returns (states, kept): kept[b] holds
        each layer's rotated keys and values over row b's first keep[b] positions, ([1, KV, P, D],
        [1, KV, P, D]) per layer, copied out of the batch, for `pointer_state_after`.

        With `split` (rank 0 of a vision split whose helpers run `helper_layers` in step), every
        layer but the last runs over 1/ranks of the tokens per rank (`_layers_but_last`)."""
        pace = pace or RunAhead()
        b, length, _ = h.shape
        kept: list[list[tuple[mx.array, mx.array]]] = [[] for _ in range(b)]
        if split is not None:                       # the helpers take them from here
            h, position_ids = _shared_inputs(split, h, position_ids)
        cos, sin = self.lm.layers[0].self_attn.rotary_emb(h, position_ids)
        h = self._layers_but_last(h, cos, sin, pace, split, kept, keep)
        block, rest = self.layers[-1]
        q, k, v = self._attention_inputs(h, block, cos, sin)
        self._keep(kept, k, v, keep)
        states = self._at_pointers(h, q, k, v, rest, pointer_pos)
        return (states, kept) if keep is not None else states

    def helper_layers(self, split: "Split", batch: int, length: int, pace: RunAhead) -> None:
        """A helper's part of `pointer_states` with `split`: rank 0's embeddings and positions
        ([batch, length, C], [3, batch, length]) come through the group, then its share of the
        tokens through every layer but the last."""
        c = self.lm.norm.weight.shape[0]
        h, position_ids = _shared_inputs(split, mx.zeros((batch, length, c), self.lm.norm.weight.dtype),
                                         mx.zeros((3, batch, length), mx.int32))
        cos, sin = self.lm.layers[0].self_attn.rotary_emb(h, position_ids)
        mx.eval(self._layers_but_last(h, cos, sin, pace, split))

    def _layers_but_last(self, h, cos, sin, pace: RunAhead, split: "Split | None" = None,
                         kept: list | None = None, keep: list[int] | None = None) -> mx.array:
        """Every layer but the last over h [B, L, C] -> [B, L, C].

        Split: rank r runs tokens [r*L/R, (r+1)*L/R) through the projections and the MLP, and
        every rank's keys and values join after each layer's projection (all_gather, exact), so
        its queries attend over all the tokens before them as in one process: the causal mask
        aligns its last query with the last key it is given. The rows go through the same
        matmuls as in one process, only fewer at a time (identical results in
        tests/test_vision_split.py). The ranks' states join at the end."""
        b, length, _ = h.shape
        if split is not None:
            if length % split.ranks:
                raise ValueError(f"a split language model needs the prompt length ({length}) in "
                                 f"multiples of its {split.ranks} ranks")
            lo, hi, _ = split.rows(length)
            h, cos, sin = h[:, lo:hi], cos[:, lo:hi], sin[:, lo:hi]
        for i, (block, rest) in enumerate(self.layers[:-1]):
            q, k, v = self._attention_inputs(h, block, cos, sin)
            if split is not None:                   # one collective for both, so the ranks' order is one
                kv = split.gather_along(mx.concatenate([k, v], axis=1), 2)
                k, v = kv[:, :self.kv_heads], kv[:, self.kv_heads:]
            copies = self._keep(kept, k, v, keep)
            if split is not None and hi < length:
                k, v = k[:, :, :hi], v[:, :, :hi]
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
            h = _mlp_block(h, o.transpose(0, 2, 1, 3).reshape(b, h.shape[1], -1), *rest, self.eps,
                           self.dequantize_rows)
            if self.eval_every and (i + 1) % self.eval_every == 0:
                pace([h, *copies])
        return split.gather_along(h, 1) if split is not None else h

    def pointer_state_after(self, kept: list[tuple[mx.array, mx.array]], h: mx.array,
                            position_ids: mx.array, pointers: list[int]) -> mx.array:
        """Pointer states of prompts that share one kept prefix (`pointer_states` with `keep`):
        h [B, T, C] the embeddings of each prompt's tokens after the prefix, position_ids
        [3, B, T] their M-RoPE positions, pointers[b] row b's <|pointer_pad|> index among them
        (tokens after it, padding, cannot reach it) -> [B, C]. Same arithmetic as the whole
        prompt's forward; only the prefix's keys and values come from the store instead of being
        recomputed. One graph, evaluated once: handing it to the device every few layers, as the
        whole forward does, made a 1080p screenshot's question 7.1 -> 11.5 ms on an H100 (the
        device waits at each hand-over, and a chunk is too small to hide it; bench.cached_tail).
        The host's encoding of its small kernels sets its time, so on CUDA each layer's q, k and v
        come from one kernel (`prefix_join`, workers/mlx/cuda_prefix_join.py), and the graph is
        traced once per shape (`mx.compile`; tails are padded to TAIL_MULTIPLE rows, so questions
        about a screenshot repeat a few shapes). Building the graph took 1.0-1.5 ms of every tail,
        replaying the trace 0.7-0.9: a 1080p or 720p question 0.06-0.36 ms shorter, the same bits
        (H200, bench/RESULTS.md); a new shape pays its trace once (~3-9 ms)."""
        # what the trace reads besides its inputs; tests swap the join, bench.quantized_lm the rows
        traced_with = (self.prefix_join, self.dequantize_rows)
        if self._tail_fn is None or self._tail_fn[0] != traced_with:
            # through a weak reference: a bound method would keep this object, and the weights its
            # trace holds, alive after an unload until the garbage collector finds the cycle
            me = weakref.ref(self)
            self._tail_fn = (traced_with, mx.compile(lambda *args: me()._tail_layers(*args)))
        # The rotary tables and the pointer rows stay outside the trace: inside it, MLX fused
        # their small elementwise chains into nine kernels of their own, built by NVRTC on a
        # machine's first load (31.9 s of it on an H200; bench/RESULTS.md, thirty-ninth session).
        # Outside it they run as MLX's prebuilt kernels. They are ~25 of ~420 operations.
        cos, sin = (mx.contiguous(x) for x in self.lm.layers[0].self_attn.rotary_emb(h, position_ids))
        h, q, k, v = self._tail_fn[1](kept, h, cos, sin)
        return self._at_pointers(h, q, k, v, self.layers[-1][1], pointers, offset=kept[0][0].shape[2])

    def _tail_layers(self, kept: list[tuple[mx.array, mx.array]], h: mx.array, cos: mx.array,
                     sin: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """`pointer_state_after`'s traced graph: every layer but the last, then the last one's
        inputs -> (h, q, k, v) for `_at_pointers`."""
        b, t, _ = h.shape
        for (block, rest), (pk, pv) in zip(self.layers[:-1], kept[:-1]):
            q, k, v = self._attention_inputs_after(h, block, cos, sin, pk, pv)
            # "causal" aligns the last query with the last key: tail token i sees the prefix and
            # the tail up to itself
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
            h = _mlp_block(h, o.transpose(0, 2, 1, 3).reshape(b, t, -1), *rest, self.eps, self.dequantize_rows)
        return (h, *self._attention_inputs_after(h, self.layers[-1][0], cos, sin, *kept[-1]))

    def _at_pointers(self, h, q, k, v, rest, pointer_pos: list[int], offset: int = 0) -> mx.array:
        """The last layer at the pointer rows only: their queries over the keys up to them (the
        queries' rows sit `offset` positions after the first key), MLP, final norm -> [B, C]."""
        b = h.shape[0]
        rows, ptr = mx.arange(b), mx.array(pointer_pos)
        q_ptr = q[rows, :, ptr][:, :, None]                                         # [B, H, 1, D]
        visible = (mx.arange(k.shape[2])[None, :] <= ptr[:, None] + offset)[:, None, None]
        o = mx.fast.scaled_dot_product_attention(q_ptr, k, v, scale=self.scale, mask=visible)
        out = _mlp_block(h[rows, ptr][:, None], o.transpose(0, 2, 1, 3).reshape(b, 1, -1), *rest, self.eps,
                         self.dequantize_rows)
        return mx.fast.rms_norm(out[:, 0], self.lm.norm.weight, self.lm.norm.eps)

    @staticmethod
    def _keep(kept, k, v, keep: list[int] | None) -> list[mx.array]:
        """Copy each row's prefix keys and values out of the batch (a view would hold the whole
        batch's arrays alive for as long as the entry lives) -> the new arrays."""
        new = []
        for row, p in enumerate(keep or []):
            if p:
                pair = (mx.contiguous(k[row:row + 1, :, :p]), mx.contiguous(v[row:row + 1, :, :p]))
                kept[row].append(pair)
                new.extend(pair)
        return new

    def prefix_agrees(self) -> bool:
        """A probe at load: one prompt's pointer state through `pointer_state_after` from a kept
        prefix and through the whole forward. A wrong mask, offset or position is off by the size
        of the values; kernel choices and bf16 rounding are far below the 10 % allowed."""
        c = self.lm.norm.weight.shape[0]
        h = (mx.random.normal((1, 70, c), key=mx.random.key(1)) * 0.5).astype(self.lm.norm.weight.dtype)
        pos = mx.broadcast_to(mx.arange(70)[None, None], (3, 1, 70)).astype(mx.int32)
        whole, kept = self.pointer_states(h, pos, [60], keep=[40])
        tail = self.pointer_state_after(kept[0], h[:, 40:], pos[:, :, 40:], [20])
        whole, tail = whole.astype(mx.float32), tail.astype(mx.float32)
        scale = max(mx.abs(whole).max().item(), 1e-6)
        return tail.shape == whole.shape and mx.abs(tail - whole).max().item() <= 0.1 * scale
