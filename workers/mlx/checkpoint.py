"""Find and check a checkpoint before any weight is read: path resolution (local folder, Hugging
Face repo id from the local cache only, or `tiny:<backbone>`), config, tokenizer and safetensors
headers. Every failure is a CheckpointError whose message names the file or tensor. No MLX here.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workers.families import family_for
from workers.families.gui_actor import HEAD_PREFIX

TINY_PREFIX = "tiny:"
QUANT_GROUP = 64      # `quantize: 8|4`: MLX affine groups of this many weights, one scale and bias each
_LM_LINEAR = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.[a-z_]+_proj\.weight$")
# Qwen2.5-VL's ViT MLP (SwiGLU, 3420 wide in the released checkpoints) is widened with zeros to a
# multiple of this at load (workers/mlx/vision_qwen2_5.py, `widened_mlp`: 2.3x faster on CUDA)
VISION_MLP_ALIGN = 64
_VISION_MLP = re.compile(r"(?:^|\.)visual\.blocks\.\d+\.mlp\.(?:(?:gate|up)_proj\.(?:weight|bias)|down_proj\.weight)$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def packed_by_quantize(name: str, shape) -> bool:
    """Whether `quantize: 8|4` packs this weight: a linear weight of the language model's layers
    (the ViT is small and sensitive, the head stays float32) whose rows split into whole groups.
    One rule for the load (workers/mlx/backbone.py, over module paths) and the estimate below (over
    tensor names), which cannot import MLX."""
    return bool(_LM_LINEAR.search(name)) and shape[-1] % QUANT_GROUP == 0


def kept_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the engine keeps of a checkpoint tensor: Qwen2.5-VL's ViT MLP widened to a multiple
    of VISION_MLP_ALIGN (gate and up: rows and bias; down: columns), everything else as stored."""
    if not _VISION_MLP.search(name):
        return shape
    axis = len(shape) - 1 if "down_proj" in name else 0
    return tuple(d + (-d % VISION_MLP_ALIGN) if i == axis else d for i, d in enumerate(shape))


class CheckpointError(Exception):
    """The checkpoint cannot be loaded; the message names the file or tensor (-> load_failed)."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str                      # safetensors dtype name (F32, BF16, ...)
    shape: tuple[int, ...]
    start: int                      # its bytes in the file: [start, end) from the file's beginning
    end: int


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder: parsed config.json, the weight files and every tensor's
    header entry (name -> TensorInfo), and the backbone (`model_type`)."""
    path: Path
    config: dict
    model_type: str
    weight_files: tuple[Path, ...]
    tensors: dict


def resolve_path(spec_path: str, cache_dir: str, hf_home: str | None = None) -> Path:
    """`spec_path` -> a local folder. `tiny:<backbone>` is generated (seed 0) into
    `<cache_dir>/tiny-<backbone>` when absent; `org/name` is looked up in the local Hugging Face
    cache (never downloaded); anything else must be an existing folder."""
    if spec_path.startswith(TINY_PREFIX):
        return ensure_tiny(spec_path[len(TINY_PREFIX):], cache_dir)
    p = Path(os.path.expanduser(spec_path))
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"model path {spec_path} is not a folder")
    parts = spec_path.split("/")
    if len(parts) == 2 and all(parts) and not spec_path.startswith((".", "/", "~")):
        return _from_hf_cache(spec_path, hf_home)
    raise CheckpointError(f"model path {spec_path} does not exist")


def estimate_weight_bytes(spec_path: str, cache_dir: str, hf_home: str | None = None,
                          quantize: int | None = None, dtype_bytes: int | None = None) -> int | None:
    """Bytes the model's weights will take once loaded, from the safetensors headers alone (nothing
    generated, no weight read), for the broker's reservation before the first load; None where no
    checkpoint is found yet. Counts what the engine keeps: no `lm_head` (grounding computes no
    vocabulary logits), the pointer head in float32, the language model's linear weights packed
    where `quantize` is set, everything else at `dtype_bytes` (None: the checkpoint's own dtype)."""
    if spec_path.startswith(TINY_PREFIX):
        path = Path(cache_dir) / f"tiny-{spec_path[len(TINY_PREFIX):]}"     # not generated here
    else:
        try:
            path = resolve_path(spec_path, cache_dir, hf_home)
        except CheckpointError:
            return None
    try:
        tensors = _headers(_weight_files(path))
    except CheckpointError:
        return None
    total = 0
    for name, info in tensors.items():
        if name.startswith("lm_head."):
            continue
        count = math.prod(kept_shape(name, info.shape))
        size = dtype_bytes or _DTYPE_BYTES.get(info.dtype, 2)
        if name.startswith(HEAD_PREFIX):
            total += 4 * count
        elif quantize and packed_by_quantize(name, info.shape):
            total += count * quantize // 8 + 2 * size * (count // QUANT_GROUP)
        else:
            total += size * count
    return total


def _from_hf_cache(repo_id: str, hf_home: str | None) -> Path:
    home = Path(hf_home) if hf_home else Path.home() / ".cache" / "huggingface"
    name = "models--" + repo_id.replace("/", "--")
    # hf_home may be $HF_HOME (holding hub/) or $HF_HUB_CACHE (the hub folder itself)
    repo = next((r for r in (home / "hub" / name, home / name) if r.is_dir()), home / "hub" / name)
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    found = sorted(snapshots.glob("*"), key=lambda s: s.stat().st_mtime) if snapshots.is_dir() else []
    if found:
        return found[-1]
    raise CheckpointError(f"{repo_id} is not a local folder and is not in the Hugging Face cache "
                          f"({repo}); download it first (huggingface-cli download {repo_id}) — "
                          "the server never downloads on its own")


def ensure_tiny(backbone: str, cache_dir: str) -> Path:
    """`<cache_dir>/tiny-<backbone>`, generated atomically (temp folder + rename) if absent."""
    from workers.tiny_checkpoint import BACKBONES, FORMAT, MARKER, write_tiny_checkpoint
    if backbone not in BACKBONES:
        raise CheckpointError(f"unknown tiny backbone {backbone!r}; use tiny:qwen2_vl or tiny:qwen2_5_vl")
    final = Path(cache_dir) / f"tiny-{backbone}"

    def current() -> bool:
        try:
            return json.loads((final / MARKER).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    if current():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{backbone}-", dir=final.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write the tiny checkpoint under {cache_dir}: {exc.strerror}") from None
    stale = final.with_name(tmp.name + ".stale")
    try:
        write_tiny_checkpoint(tmp, backbone, seed=0)
        if final.exists() and not current():   # written by an older generator: swap it out
            os.rename(final, stale)
        try:
            os.rename(tmp, final)
        except OSError:
            if not current():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo from a safetensors header (reads only the header)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path.name}: corrupt safetensors header (length {n})")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            out[name] = TensorInfo(path, meta["dtype"], tuple(int(d) for d in meta["shape"]),
                                   8 + n + int(start), 8 + n + int(end))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: bad header entry for tensor {name}") from None
        if end > size - 8 - n:
            raise CheckpointError(f"{path.name}: tensor {name} lies past the end of the file (truncated?)")
    return out


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index.name}: not a valid safetensors index") from None
        files = []
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{shard} (named by {index.name}) is missing from {path}")
            files.append(path / shard)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(p for p in path.glob("*.safetensors") if p.name != "consolidated.safetensors")
    if not files:
        raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json) in {path}")
    return files


def _headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor's header entry across the weight files."""
    return {name: info for f in files for name, info in read_header(f).items()}


def read_checkpoint(path: Path) -> Checkpoint:
    """Check config.json (GUI-Actor architecture, supported model_type), tokenizer.json and the
    safetensors headers; the index's tensor -> file map must agree with the shards."""
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"config.json is missing from {path}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"config.json in {path} is unreadable: {exc}") from None
    model_type = config.get("model_type")
    try:
        family = family_for(model_type)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    arch = config.get("architectures") or []
    if family.ARCHITECTURES.get(model_type) not in arch:
        raise CheckpointError(f"config.json: unknown architecture {arch} for model_type {model_type!r}; "
                              f"expected {family.ARCHITECTURES[model_type]} (a GUI-Actor checkpoint)")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer.json is missing from {path} (the checkpoint's own tokenizer is required)")
    files = _weight_files(path)
    tensors = _headers(files)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or tensors[name].file.name != shard:
                raise CheckpointError(f"tensor {name} is listed in {index.name} under {shard} but is not in that file")
    return Checkpoint(path, config, model_type, tuple(files), tensors)
