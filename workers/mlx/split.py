"""One replica's forward over several GPUs: the vision tower's attention heads and the language
model's tokens shared with helper processes.

Why: on one GPU a 1080p screenshot's forward is ~110 ms, and half of it is the ViT's attention,
already at cuDNN's speed (bench/RESULTS.md). With `gpus_per_replica: 2` the worker (rank 0) starts
a helper process (rank 1) on a second GPU.
- Vision tower: each rank computes its share of every block's heads, and `all_gather` joins them;
  then each rank runs its share of the tokens (rows) through the output projection and the MLP,
  on the whole width, and a second `all_gather` joins the rows, so every rank holds the same
  residual stream for the next block. On two H200s the 2B shape's 1080p tower went from 83 ms to
  59 ms with the heads split, and to 50 ms with the rows too (`bench.tp_probe`). Splitting the MLP
  Megatron-style (summing partial products) measured 54 ms, and its sums round differently from
  one GPU's; this split keeps one GPU's arithmetic: each head's attention is the same kernel on
  the same values, and each row meets the same weights in the same order, in shorter matmuls.
- Language model (where our forward runs it and the batch is large enough to pay for the
  exchanges: `language.SPLIT_MIN_SAVED_FLOP`): rank 0 shares the prompts' embeddings, each rank
  runs its share of the tokens through every layer but the last, with the keys and values joined
  at every layer, and rank 0 runs the last layer at the pointer tokens as before: the 7B shape's
  1080p forward on two H200s 0.85 -> 0.69 of one GPU's. Each token's row meets the same weights as in one process, only with fewer rows per
  matmul, so again no sum is regrouped.
Identical bits in tests/test_vision_split.py (CPU) and in bench.tp_probe's tower (1080p and 1440p,
two H200s); a GPU library could in principle pick another matmul algorithm for a narrower or
shorter matmul, which would change low bits only.

Control: rank 0 writes one JSON line per step to each helper's stdin (`load`, `forward` with the
batch's patch grids and prompt shape, `unload`); a helper answers each step with one line that
carries its GPU's memory (and, for `load`, whether it loaded and runs our language-model forward),
read by a thread per helper so that a forward never waits on it. The worker reports those figures
beside its own (`Helpers.memory`). This pipe stays inside the worker (a worker and its own
helpers), so it is not the broker's wire format. Tensors go over MLX's distributed backend: NCCL
between CUDA GPUs; the ring backend over loopback on the CPU (the tests). Collectives must run in
the same order on every rank; each depends on the one before it in the graph. A helper exits when
its stdin closes (its worker is gone). The worker exits (status 70) when a helper dies, or when a
forward fails after the helpers were told to run it: the ranks' collectives would then be out of
step, and the supervisor's restart is the clean way back. Helpers hold the backbone without the
pointer head; the broker budgets rank 0's GPU only, so config gives a helper's GPU to its replica
alone (common/config.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import mlx.core as mx

from common.zmqutil import free_port
from workers.torchless import keep_torch_and_transformers_out

log = logging.getLogger(__name__)

FATAL_EXIT = 70            # the worker's status for "broken, restart me" (workers/worker.py)
START_TIMEOUT_S = 300      # helpers joining the group; a load answering
REPORT_WAIT_S = 0.01       # how long a memory report after a batch waits for the helpers' answers
UNLOAD_WAIT_S = 10         # ... and one after an unload (the memory just freed is its point)
PARENT_POLL_S = 0.5        # how soon an orphaned helper notices


class Split:
    """One rank's view of the group: its number, the group's size, and the two collectives."""

    def __init__(self, group, rank: int, ranks: int):
        self.group, self.rank, self.ranks = group, rank, ranks

    def rows(self, n: int) -> tuple[int, int, int]:
        """This rank's share of n rows (tokens): (lo, hi, share), `share` = ceil(n / ranks) rows
        per rank; where the ranks do not divide n, the last shares are shorter (hi - lo < share)."""
        share = -(-n // self.ranks)
        return min(n, self.rank * share), min(n, (self.rank + 1) * share), share

    def gather_along(self, x: mx.array, axis: int) -> mx.array:
        """Each rank's x -> every rank's, joined along `axis` in rank order (the vision tower's
        attention heads: [N, w] along 1; the language model's tokens). all_gather stacks the
        ranks' arrays along axis 0 as they are; their blocks then move to `axis` in one copy."""
        g = mx.distributed.all_gather(x, group=self.group).reshape(self.ranks, *x.shape)
        shape = list(x.shape)
        shape[axis] *= self.ranks
        return mx.moveaxis(g, 0, axis).reshape(shape)

    def share(self, x: mx.array) -> mx.array:
        """Rank 0's `x` on every rank (the others pass zeros of its shape; adding zeros is exact)."""
        return mx.distributed.all_sum(x, group=self.group)


def _backend() -> str:
    return "nccl" if mx.default_device() == mx.gpu else "ring"


def _join(rank: int, ranks: int) -> Split:
    group = mx.distributed.init(strict=True, backend=_backend())
    if (group.rank(), group.size()) != (rank, ranks):
        raise RuntimeError(f"joined as rank {group.rank()} of {group.size()}, expected {rank} of {ranks}")
    return Split(group, rank, ranks)


def _fatal(why: str) -> None:
    log.critical("vision split broken: %s; exiting so the supervisor restarts this worker", why)
    logging.shutdown()
    os._exit(FATAL_EXIT)


class Helpers:
    """Rank 0's side: starts one helper per extra GPU, joins the group with them, and steps them.
    `gpus`: the CUDA device ids the helpers see (None on the CPU). `on_death` is called (from a
    watcher thread) when a helper exits unasked; by default the worker exits."""

    def __init__(self, ranks: int, gpus: list[str] | None, on_death: Callable[[str], None] = _fatal):
        if ranks < 2:
            raise ValueError("a split needs at least two ranks")
        if gpus is not None and len(gpus) != ranks - 1:
            raise ValueError(f"{ranks} ranks need {ranks - 1} helper GPU(s), got {gpus}")
        self.ranks = ranks
        self._closing = False
        self._on_death = on_death
        # what the reader threads learn, under _answered: each helper's answers counted, its last
        # memory figures, its last load answer; _sent counts the steps sent, _load_step the pending load's
        self._answered = threading.Condition()
        self._answers = [0] * (ranks - 1)
        self._memory: list[dict] = [{} for _ in range(ranks - 1)]
        self._load_answers: list[dict] = [{} for _ in range(ranks - 1)]
        self._exited = [False] * (ranks - 1)
        self._sent = 0
        self._load_step: int | None = None
        env = {"MLX_WORLD_SIZE": str(ranks), "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(free_port())}
        self._hostfile = None
        if gpus is None:                                     # the ring backend: one address per rank
            fd, self._hostfile = tempfile.mkstemp(prefix="vision-split-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)], f)
            env["MLX_HOSTFILE"] = self._hostfile
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, ranks):
            child_env = {**os.environ, **env, "MLX_RANK": str(rank)}
            if gpus is not None:
                child_env["CUDA_VISIBLE_DEVICES"] = gpus[rank - 1]
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "workers.mlx.split", "--rank", str(rank), "--ranks", str(ranks),
                 "--parent", str(os.getpid())],
                env=child_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))
        for i, p in enumerate(self.procs):
            threading.Thread(target=self._read, args=(i, p), name=f"split-helper-{p.pid}", daemon=True).start()
        os.environ.update(env, MLX_RANK="0")       # MLX reads the group's settings from the environment
        try:
            with self._deadline("joining the helpers' group"):
                self.split = _join(0, ranks)
        except BaseException:
            self.close()
            raise

    def _read(self, i: int, p: subprocess.Popen) -> None:
        """Helper i's answers, until its stdout closes; then its exit is a death unless asked for."""
        for line in p.stdout:
            answer = json.loads(line)
            with self._answered:
                self._answers[i] += 1
                self._memory[i] = answer.get("memory", self._memory[i])
                if "loaded" in answer:
                    self._load_answers[i] = answer
                self._answered.notify_all()
        code = p.wait()
        with self._answered:
            self._exited[i] = True
            self._answered.notify_all()
        if not self._closing:
            self._on_death(f"helper process {p.pid} exited with status {code}")

    def _all_answered(self, step: int) -> bool:
        return all(n >= step or gone for n, gone in zip(self._answers, self._exited))

    @contextmanager
    def _deadline(self, what: str):
        """A collective or a helper's answer that never comes would block this thread for ever."""
        timer = threading.Timer(START_TIMEOUT_S, lambda: self._on_death(f"{what} took over {START_TIMEOUT_S} s"))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _send(self, op: dict) -> None:
        line = json.dumps(op) + "\n"
        with self._answered:
            self._sent += 1
        for p in self.procs:
            p.stdin.write(line)
            p.stdin.flush()

    def load(self, path: Path, dtype: str, quantize: int | None) -> None:
        """Start the helpers' loads (they run beside rank 0's own); `wait_loaded` collects them."""
        with self._answered:
            self._load_answers = [{} for _ in self.procs]
        self._send({"op": "load", "path": str(path), "dtype": dtype, "quantize": quantize})
        self._load_step = self._sent

    @property
    def language(self) -> bool:
        """Whether every helper loaded our language-model forward (the language model can split)."""
        with self._answered:
            return all(a.get("language") for a in self._load_answers)

    def wait_loaded(self) -> None:
        """Raises RuntimeError with a helper's reason if its load failed."""
        if self._load_step is None:
            return
        step, self._load_step = self._load_step, None
        with self._answered:
            if not self._answered.wait_for(lambda: self._all_answered(step), START_TIMEOUT_S):
                self._on_death(f"a helper's load took over {START_TIMEOUT_S} s")
            errors = [a.get("error") or ("it exited" if gone else "no answer")
                      for a, gone in zip(self._load_answers, self._exited) if not a.get("loaded")]
        if errors:
            raise RuntimeError(f"the vision split's helper could not load: {errors[0]}")

    def memory(self, wait_s: float = REPORT_WAIT_S) -> list[dict]:
        """Each helper's GPU memory in bytes ({active, peak, cache, weights}; {} before its first
        answer), as of its answer to the last step sent, or the one before if that is more than
        `wait_s` late. The worker asks after each batch, once it has sent the batch's answers, so
        the wait delays no answer and is short: a helper's part of a forward ends before rank 0's
        (the last language-model layer and the pointer head are rank 0's alone), so its answer is
        normally there already, and a late one only leaves the report a batch behind."""
        with self._answered:
            self._answered.wait_for(lambda: self._all_answered(self._sent), wait_s)
            return [dict(m) for m in self._memory]

    def unload(self) -> None:
        """Unload the helpers' models; returns once they answer (or UNLOAD_WAIT_S), so that a
        memory report after it shows the memory freed."""
        try:
            self.wait_loaded()               # rank 0's own load failed first: read what is owed
        except RuntimeError:
            pass
        self._send({"op": "unload"})
        self.memory(wait_s=UNLOAD_WAIT_S)

    @contextmanager
    def forward(self, patches: mx.array, grids: list[tuple[int, int]], prompts: tuple[int, int] | None = None):
        """Tell the helpers to run a tower forward over these grids, and with `prompts` (batch,
        padded length) their share of the language model's, and yield the patches as the group
        shares them (rank 0 must compute with that array, so the share runs on its side too).
        Any error from here on leaves the ranks out of step: the worker exits."""
        self._send({"op": "forward", "grids": [list(g) for g in grids], "prompts": prompts and list(prompts)})
        try:
            yield self.split.share(patches)
        except BaseException as exc:
            _fatal(f"a forward failed with helpers in it ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        self._closing = True
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._hostfile:
            Path(self._hostfile).unlink(missing_ok=True)


def _end_with_parent(parent: int) -> None:
    """Exit once this process's parent is no longer `parent` (passed in, not read at start: the
    worker may be gone before the helper has imported MLX)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def helper_main(rank: int, ranks: int, parent: int) -> int:
    """A helper: join the group, then serve rank 0's steps from stdin until it closes."""
    from mlx.utils import tree_flatten

    from workers.mlx.backbone import load_backbone, resolve_dtype
    from workers.mlx.checkpoint import read_checkpoint
    from workers.mlx.engine import RUN_AHEAD, fast_language_model, fast_vision
    from workers.mlx.run_ahead import RunAhead
    from workers.mlx.vision import PATCH_VALUES

    # Signals sent to the worker's process group (Ctrl-C where a worker runs in a terminal) must not
    # end a helper before its worker, which would take that for a failure: a helper ends when its
    # stdin does, or, inside a collective that its dead worker will never join, once re-parented.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_end_with_parent, args=(parent,), daemon=True).start()
    split = _join(rank, ranks)
    out = sys.stdout
    sys.stdout = sys.stderr                 # stray prints must not corrupt the answers

    def load(path: str, dtype: str, quantize: int | None):
        ckpt = read_checkpoint(Path(path))
        model, _ = load_backbone(ckpt, resolve_dtype(dtype), quantize)
        vision = fast_vision(ckpt.model_type, model.vision_tower)
        vision.share_heads(split)
        lm = fast_language_model(model.language_model.model)     # None: rank 0 runs it alone
        # what only rank 0 uses: the token embeddings (it shares the prompt's) and the merger
        model.language_model.model.pop("embed_tokens")
        model.vision_tower.pop("merger")
        return vision, lm, sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    def forward(grids: list[tuple[int, int]], prompts: list[int] | None) -> None:
        n = sum(gh * gw for gh, gw in grids)
        patches = split.share(mx.zeros((n, PATCH_VALUES), vision.dtype))
        pace = RunAhead(RUN_AHEAD)
        mx.eval(vision([patches], grids, pace))
        if prompts:
            lm.helper_layers(split, *prompts, pace)

    vision, lm, weights = None, None, 0
    for line in sys.stdin:
        op = json.loads(line)
        answer = {}
        if op["op"] == "load":
            vision, lm, weights = None, None, 0          # the previous model's memory goes first
            try:
                vision, lm, weights = load(op["path"], op["dtype"], op["quantize"])
                answer = {"loaded": True, "language": lm is not None}
            except Exception as exc:
                answer = {"loaded": False, "error": f"{type(exc).__name__}: {exc}"}
        elif op["op"] == "forward":
            mx.reset_peak_memory()                   # a forward's peak, as the worker reports its batch's
            forward([tuple(g) for g in op["grids"]], op["prompts"])
        elif op["op"] == "unload":
            vision, lm, weights = None, None, 0
            mx.clear_cache()
        answer["memory"] = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(),
                            "cache": mx.get_cache_memory(), "weights": weights}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


def main() -> int:
    keep_torch_and_transformers_out()
    ap = argparse.ArgumentParser(prog="python -m workers.mlx.split", description="A vision split's helper rank.")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True, help="the worker's pid")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s vision-split-helper[{a.rank}] %(levelname)s %(message)s")
    return helper_main(a.rank, a.ranks, a.parent)


if __name__ == "__main__":
    sys.exit(main())
