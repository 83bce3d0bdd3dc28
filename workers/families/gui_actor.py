"""GUI-Actor (Qwen2-VL / Qwen2.5-VL + pointer head): prompts, token names, region extraction and
back-projection. Python and NumPy, the regions in C where that was built (workers/regions.c); the
spec is docs/gui-actor.md (sections 3, 5 and 8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from workers import _regions
except ImportError:         # built without a C compiler (setup.py): NumPy finds them, ~0.5 ms slower cold
    _regions = None

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
    `indices`: its row-major token indices, ascending."""
    score: float
    point: tuple[float, float]
    indices: tuple[int, ...]


class NonFiniteScores(ValueError):
    """The attention map holds a NaN or an infinity (a dtype too narrow for the weights, say)."""


def extract_regions(scores, n_h: int, n_w: int, ratio: float = SELECT_RATIO, first: int | None = None) -> list[Region]:
    """Regions of the first pointer's attention map `scores` (n_h*n_w, row-major), best first
    (only the `first` best, where given). Raises NonFiniteScores if a score is NaN or infinite.

    Tokens with score > ratio*max (strict) are selected; 4-connected (up, down, left, right)
    selected tokens form a region; regions are numbered in the order of their first token (the
    reference's BFS seeds them in ascending index) and sorted by mean score, descending and
    stable. Sums are in float64 in ascending token order rather than the BFS's: the last bits of
    a score can differ, which only matters between regions whose means tie to the last bit.

    In C where it was built: right after a forward, this thread's caches are cold, and the NumPy
    version's ~40 calls then take 0.5-0.9 ms for a 1080p map, the C pass 0.1-0.25 (bench/RESULTS.md,
    thirty-fifth session). Both give the same regions to the last bit."""
    s = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    if s.size != n_h * n_w:
        raise ValueError(f"scores has {s.size} entries, grid is {n_h}x{n_w}")
    if _regions is None:
        return regions_numpy(s, n_h, n_w, ratio, first)
    found = _regions.regions(s, n_h, n_w, ratio, -1 if first is None else first)
    if found is None:
        raise NonFiniteScores("the attention map holds a non-finite score")
    return [Region(mean, (x, y), members) for mean, x, y, members in found]


def regions_numpy(s: np.ndarray, n_h: int, n_w: int, ratio: float = SELECT_RATIO,
                  first: int | None = None) -> list[Region]:
    """extract_regions in NumPy, for a float32 map of n_h*n_w scores: the same regions as the
    reference's BFS, which in Python took 3-7 ms on a flat 1080p map (bench/RESULTS.md,
    twenty-fourth session)."""
    if not np.all(np.isfinite(s)):
        raise NonFiniteScores("the attention map holds a non-finite score")
    # torch compares a float32 tensor with a Python float in float32: round the threshold alike
    selected = s > np.float32(float(s.max()) * ratio)
    rows, starts, lengths = _runs(selected.reshape(n_h, n_w))
    label = _run_components(rows, starts, lengths, n_w)
    first_runs = label == np.arange(len(label))        # a region's first run labels it
    region = np.repeat((np.cumsum(first_runs) - 1)[label], lengths)   # per selected token
    n = int(first_runs.sum())
    tokens = np.flatnonzero(selected)                  # row-major, so run by run
    w = s[tokens].astype(np.float64)
    count = np.bincount(region, minlength=n)
    total = np.bincount(region, w, n)
    mean = total / count
    cx = np.bincount(region, (tokens % n_w + 0.5) / n_w * w, n) / total
    cy = np.bincount(region, (tokens // n_w + 0.5) / n_h * w, n) / total
    members = tokens[np.argsort(region, kind="stable")]     # region by region, ascending within
    ends = np.cumsum(count)
    best = np.argsort(-mean, kind="stable")[:first]
    return [Region(float(mean[k]), (float(cx[k]), float(cy[k])), tuple(members[ends[k] - count[k]:ends[k]].tolist()))
            for k in best.tolist()]


def _runs(selected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of selected tokens, row-major: (row, first column, length) per run."""
    padded = np.zeros((selected.shape[0], selected.shape[1] + 2), np.int8)
    padded[:, 1:-1] = selected
    edges = np.diff(padded)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges.reshape(-1) == -1)[0] % edges.shape[1]
    return rows, starts, ends - starts


def _run_components(rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_w: int) -> np.ndarray:
    """For each run, the index of the first run of its 4-connected component. Two runs touch when
    they sit in adjacent rows and share a column; labels fall to the smallest run index along
    those edges, each round also jumping to the label's own label, until nothing changes (a few
    rounds for blob-like regions; a winding one takes more, each round a few NumPy calls)."""
    stride = n_w + 1                                   # (row, column) as one key, ascending with run order
    key = rows * stride
    # for each run, the runs of the row above that overlap it: a contiguous range [lo, hi)
    lo = np.searchsorted(key + starts + lengths, key - stride + starts, side="right")
    hi = np.searchsorted(key + starts, key - stride + starts + lengths, side="left")
    n = np.maximum(hi - lo, 0)
    below = np.repeat(np.arange(len(rows)), n)
    above = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(len(below))
    label = np.arange(len(rows))
    while True:
        new = label.copy()
        np.minimum.at(new, below, label[above])        # above < below: the smaller label flows down...
        np.minimum.at(new, above, new[below])          # ...and back up
        new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


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
