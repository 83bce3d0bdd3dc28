"""Memory accounting and eviction choice: per-model runtime state, the budget, and pure planning.

Accounting (bytes). Each model has a `charge`, the memory the broker counts for it:
- LOAD sent: the reservation `need = estimated weights + learned working memory`;
- loaded: `weights (from LOADED) + working memory`;
- 0 once the worker reports the memory released (UNLOADED, MEMORY after_unload, a failed load)
  or the worker is gone. Unloading and draining models stay charged until then.
`committed = sum(charge)`. Working memory is learned from RESULT.peak_mem_job (the device peak
during the job's batch, weights included) and is charged while the model is resident, not only
while it is busy: dispatch then never needs a memory check and cannot deadlock on one.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from common.config import ModelSpec

UNLOADED, LOADING, LOADED, DRAINING, UNLOADING, FAILED = (
    "unloaded", "loading", "loaded", "draining", "unloading", "failed")
AUTO_FRACTION = 0.8    # headroom for the OS and the other processes (Ollama uses the same)
WORK_SAMPLES = 32      # recent per-job working-memory observations kept per model


@dataclass(eq=False)
class ModelState:
    """One unit's state (common.config.Unit): a model, or one replica of a model with `devices`."""
    id: str                          # the unit id: its worker's name on the broker link
    spec: ModelSpec
    order: int                       # position in the config (preload order)
    group: str = ""                  # the model id clients ask for (default: `id`)
    device: int | None = None        # CUDA device of a replica; None: the default device
    helpers: tuple = ()              # its vision split's helper GPUs (gpus_per_replica), its alone
    state: str = UNLOADED
    charge: int = 0                  # bytes counted in `committed`
    est_weights: int = 0             # bytes: READY capabilities.est_weights_bytes, then LOADED
    weights: int = 0                 # bytes reported by LOADED (0 when not loaded)
    seen_weights: int = 0            # bytes a load last reported: beats any later estimate
    work_samples: deque = field(default_factory=lambda: deque(maxlen=WORK_SAMPLES))
    since: float = 0.0               # when `state` was entered (monotonic s)
    escalation: int = 0              # unload escalation steps taken (exit, then kill)
    loaded_at: float | None = None   # monotonic s
    last_used: float | None = None   # monotonic s: last dispatch or answer
    load_seconds: float = 0.0
    last_error: str | None = None
    failures: int = 0
    want_unload: bool = False        # mmi.unload arrived while loading: unload once loaded
    wanted_at: float | None = None   # mmi.load asked for this unit (monotonic s): a demand
    fail_streak: int = 0             # failed loads in a row
    retry_at: float = 0.0            # a failed replica loads no sooner (lifecycle.REPLICA_RETRY_S)
    mem: dict = field(default_factory=dict)   # the worker's last report {active, peak, cache, ...}

    def __post_init__(self) -> None:
        self.group = self.group or self.id

    @property
    def device_key(self) -> int:
        """The device whose memory it uses: a worker without `devices` runs on the default one, 0."""
        return self.device or 0

    @property
    def work(self) -> int:
        return max(self.work_samples, default=0)

    def need(self) -> int:
        """Bytes to reserve for a load."""
        return max(self.est_weights, self.weights) + self.work

    def resident(self) -> int:
        return self.weights + self.work

    def learn_work(self, peak_mem_job: int) -> None:
        if peak_mem_job > 0:
            # the job's peak includes the weights: the measured figure when loaded, not the
            # estimate (which may be far off, e.g. the 100 MB default for generated tiny models)
            base = self.weights if self.weights > 0 else self.est_weights
            self.work_samples.append(max(0, peak_mem_job - base))
            if self.state in (LOADED, DRAINING, UNLOADING):
                self.charge = self.resident()


def budget_bytes(setting: int | float | str, device_total: int, host_total: int) -> int | None:
    """The memory budget in bytes, or None while unknown (no device or host size reported yet;
    then loads are not limited). `setting`: bytes (int), a fraction (float) or "auto"."""
    if isinstance(setting, int) and not isinstance(setting, bool):
        return setting
    fraction = AUTO_FRACTION if setting == "auto" else float(setting)
    total = device_total or host_total
    return int(fraction * total) if total else None


def committed(models: Iterable[ModelState]) -> int:
    return sum(m.charge for m in models)


@dataclass(frozen=True)
class Plan:
    """What to do for a model that must be loaded. `action`:
    load  - it fits now: reserve and send LOAD;
    evict - UNLOAD `idle` now and drain `busy` (no new dispatch, UNLOAD once idle); load later;
    wait  - memory being freed suffices, or not enough is evictable yet (min residency);
    never - it cannot fit even with every unpinned model evicted."""
    action: str
    idle: tuple[ModelState, ...] = ()
    busy: tuple[ModelState, ...] = ()


def _lru_key(m: ModelState) -> tuple:
    # Least recently used first; ties: the larger one, then the cheaper one to load again.
    last = m.last_used if m.last_used is not None else (m.loaded_at or 0.0)
    return (last, -m.charge, m.load_seconds)


def evictable(m: ModelState, now: float, min_residency_s: float) -> bool:
    return (m.state == LOADED and not m.spec.pin and m.loaded_at is not None
            and now - m.loaded_at >= min_residency_s)


def plan_load(target: ModelState, models: Iterable[ModelState], budget: int | None, now: float,
              min_residency_s: float, is_busy: Callable[[ModelState], bool]) -> Plan:
    models = [m for m in models if m is not target]
    need = target.need()
    if budget is None:
        return Plan("load")
    pinned = sum(m.charge for m in models if m.spec.pin and m.state not in (DRAINING, UNLOADING))
    if need > budget - pinned:
        return Plan("never")
    used = committed(models) + target.charge
    if used + need <= budget:
        return Plan("load")
    pending = sum(m.charge for m in models if m.state in (DRAINING, UNLOADING))
    deficit = used - pending + need - budget
    if deficit <= 0:
        return Plan("wait")
    candidates = sorted((m for m in models if evictable(m, now, min_residency_s)), key=_lru_key)
    idle, busy = [], []
    for m in [m for m in candidates if not is_busy(m)] + [m for m in candidates if is_busy(m)]:
        if deficit <= 0:
            break
        (busy if is_busy(m) else idle).append(m)
        deficit -= m.charge
    if deficit > 0:
        return Plan("wait")
    return Plan("evict", tuple(idle), tuple(busy))


def plan_relief(models: Iterable[ModelState], budget: int | None, now: float,
                min_residency_s: float, is_busy: Callable[[ModelState], bool]) -> list[ModelState]:
    """Idle victims to UNLOAD when learned working memory pushed `committed` past the budget."""
    models = list(models)
    if budget is None:
        return []
    excess = committed(models) - sum(m.charge for m in models if m.state in (DRAINING, UNLOADING)) - budget
    victims = []
    for m in sorted((m for m in models if evictable(m, now, min_residency_s) and not is_busy(m)), key=_lru_key):
        if excess <= 0:
            break
        victims.append(m)
        excess -= m.charge
    return victims
