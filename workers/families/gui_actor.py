"""GUI-Actor (Qwen2-VL / Qwen2.5-VL + pointer head): prompts, token names, region extraction and
back-projection. Pure Python / NumPy; the spec is docs/gui-actor.md (sections 3, 5 and 8).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

BACKBONES = ("qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGenerationWithPointer",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGenerationWithPointer"}
HEAD_PREFIX = "multi_patch_pointer_head."
HEAD_HEADS = 8                          # the head's self-attention uses 8 heads at every size
SELECT_RATIO = 0.3                      # patches with score > 0.3 * max form the regions

POINTER_START, POINTER_END, POINTER_PAD = "<|pointer_start|>", "<|pointer_end|>", "<|pointer_pad|>"
RECIPIENT, DIFF_MARKER = "<|recipient|>", "<|diff_marker|>"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
# config key -> token that the tokenizer must map to the same id (checked at load time)
CONFIG_TOKEN_KEYS = {"pointer_start_token_id": POINTER_START, "pointer_end_token_id": POINTER_END,
                     "pointer_pad_token_id": POINTER_PAD, "image_token_id": IMAGE_PAD,
                     "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END}

SYSTEM_PROMPTS = {
    "qwen2_vl": ("You are a GUI agent. You are given a task and a screenshot of the screen. You need to "
                 "perform a series of pyautogui actions to complete the task."),
    "qwen2_5_vl": ("You are a GUI agent. Given a screenshot of the current GUI and a human instruction, "
                   "your task is to locate the screen element that corresponds to the instruction. You "
                   "should output a PyAutoGUI action that performs a click on the correct position. To "
                   "indicate the click location, we will use some special tokens, which is used to refer "
                   "to a visual patch later. For example, you can output: "
                   "pyautogui.click(<your_special_token_here>)."),
}
ASSISTANT_STARTER = f"<|im_start|>assistant{RECIPIENT}os\npyautogui.click({POINTER_START}{POINTER_PAD}"


def prompt_parts(system: str, instruction: str) -> tuple[str, str]:
    """The prompt as (text before the image pads, text after them). The image sits between
    `<|vision_start|>` (end of the first part) and `<|vision_end|>` (start of the second); the
    prompt stops at `<|pointer_pad|>` (causal attention: the dropped tail cannot change it)."""
    before = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{VISION_START}"
    after = f"{VISION_END}{instruction}<|im_end|>\n{ASSISTANT_STARTER}"
    return before, after


def full_prompt(system: str, instruction: str, n_image_tokens: int = 1, cut: bool = True) -> str:
    """The whole prompt text with `n_image_tokens` image pads; `cut=False` adds the reference's
    `<|pointer_end|>)` tail."""
    before, after = prompt_parts(system, instruction)
    return before + IMAGE_PAD * n_image_tokens + after + ("" if cut else f"{POINTER_END})")


def mrope_positions(length: int, image_start: int, n_h: int, n_w: int) -> np.ndarray:
    """Qwen M-RoPE position ids [3 (t, h, w), length] for one still image whose n_h*n_w visual
    tokens start at `image_start`: text counts up on all three axes; image tokens get
    (start, start + row, start + col); text after the image resumes at start + max(n_h, n_w)."""
    n = n_h * n_w
    pos = np.empty((3, length), dtype=np.int64)
    pos[:, :image_start] = np.arange(image_start)
    idx = np.arange(n)
    pos[0, image_start:image_start + n] = image_start
    pos[1, image_start:image_start + n] = image_start + idx // n_w
    pos[2, image_start:image_start + n] = image_start + idx % n_w
    tail = length - image_start - n
    pos[:, image_start + n:] = image_start + max(n_h, n_w) + np.arange(tail)
    return pos


@dataclass(frozen=True)
class Region:
    """A 4-connected set of selected visual tokens. `score`: mean attention of its tokens;
    `point`: (x, y) score-weighted mean of token centres, normalised to [0, 1];
    `indices`: row-major token indices in BFS order."""
    score: float
    point: tuple[float, float]
    indices: tuple[int, ...]


def extract_regions(scores, n_h: int, n_w: int, ratio: float = SELECT_RATIO) -> list[Region]:
    """Regions of the first pointer's attention map `scores` (n_h*n_w, row-major), best first.

    Tokens with score > ratio*max (strict) are selected; visited in ascending index, each unvisited
    one seeds a BFS over selected 4-neighbours (up, down, left, right); regions are sorted by mean
    score, descending and stable. Arithmetic in Python floats, in the reference's order."""
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if s.size != n_h * n_w:
        raise ValueError(f"scores has {s.size} entries, grid is {n_h}x{n_w}")
    # torch compares a float32 tensor with a Python float in float32: round the threshold alike
    selected = s > np.float32(float(s.max()) * ratio)
    sel = np.flatnonzero(selected)
    visited = np.zeros(s.size, dtype=bool)
    regions: list[Region] = []
    vals = s.tolist()
    for seed in sel.tolist():
        if visited[seed]:
            continue
        visited[seed] = True
        order, queue = [seed], deque([seed])
        while queue:
            c = queue.popleft()
            cy, cx = divmod(c, n_w)
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < n_h and 0 <= nx < n_w:
                    n = ny * n_w + nx
                    if selected[n] and not visited[n]:
                        visited[n] = True
                        order.append(n)
                        queue.append(n)
        weights = [vals[i] for i in order]
        centres = [((i % n_w + 0.5) / n_w, (i // n_w + 0.5) / n_h) for i in order]
        total = sum(weights)
        point = (sum(c[0] * w for c, w in zip(centres, weights)) / total,
                 sum(c[1] * w for c, w in zip(centres, weights)) / total)
        regions.append(Region(sum(weights) / len(weights), point, tuple(order)))
    return sorted(regions, key=lambda r: r.score, reverse=True)  # sorted() is stable


def to_points(regions: list[Region], topk: int, image_size: tuple[int, int]) -> list[dict]:
    """The first `topk` regions as points: `x`, `y` in original-image pixels (floats; the resize
    maps each axis linearly, so a fraction of the resized image is the same fraction of the
    original), `nx`, `ny` normalised, `score` the region's mean attention."""
    w, h = image_size
    return [{"x": r.point[0] * w, "y": r.point[1] * h, "nx": r.point[0], "ny": r.point[1],
             "score": r.score} for r in regions[:topk]]


def check_config(config: dict, token_ids: dict[str, int | None]) -> None:
    """Raise ValueError unless config.json's token ids exist and match the tokenizer's ids."""
    for key, token in CONFIG_TOKEN_KEYS.items():
        cid = config.get(key)
        if not isinstance(cid, int):
            raise ValueError(f"config.json: {key} is missing (a GUI-Actor checkpoint has it)")
        tid = token_ids.get(token)
        if tid is None:
            raise ValueError(f"tokenizer.json has no token {token}")
        if tid != cid:
            raise ValueError(f"config.json: {key} is {cid} but tokenizer.json maps {token} to {tid}")
