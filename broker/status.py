"""Replies of the broker's own query services: mmi.models status objects and mmi.stats.

Times in replies are unix seconds (monotonic + the wall-clock offset given to the core); memory
figures are bytes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from broker import scheduler as s
from broker.scheduler import ModelState

if TYPE_CHECKING:
    from broker.core import Broker


def _int(d: dict, key: str) -> int:
    v = d.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _unix(b: "Broker", t: float | None) -> float | None:
    return None if t is None else round(t + b.wall_offset, 3)


def _memory(m: ModelState) -> dict:
    return {"weights_bytes": m.weights or (_int(m.mem, "weights") if m.charge else 0),
            "active_bytes": _int(m.mem, "active"), "peak_bytes": _int(m.mem, "peak"),
            "cache_bytes": _int(m.mem, "cache"), "screenshot_cache_bytes": _int(m.mem, "screenshots"),
            "committed_bytes": m.charge}


HELPER_KINDS = ("weights", "active", "peak", "cache")


def _helper_memory(m: ModelState) -> list[dict]:
    """A split replica's helper GPUs, each with its memory as the worker last reported it (zeros
    before the first report). Outside the broker's budget: config gives these GPUs to the replica alone."""
    reported = m.mem.get("helpers")
    reported = [h if isinstance(h, dict) else {} for h in reported] if isinstance(reported, list) else []
    reported += [{}] * (len(m.helpers) - len(reported))
    return [{"device": d, **{f"{k}_bytes": _int(h, k) for k in HELPER_KINDS}} for d, h in zip(m.helpers, reported)]


def model_status(b: "Broker", m: ModelState) -> dict:
    """One unit's status object: GET /v1/models' object for a model without replicas."""
    w = b.registry.for_model(m.id)
    engine = w.capabilities.get("engine") if w is not None else None
    return {
        "id": m.id, "object": "model", "status": m.state, "enabled": m.spec.enabled,
        "pinned": m.spec.pin, "engine": engine if isinstance(engine, str) else m.spec.engine,
        "memory": _memory(m), "last_used": _unix(b, m.last_used), "loaded_at": _unix(b, m.loaded_at),
        "load_seconds": m.load_seconds, "last_error": m.last_error, "failures": m.failures,
        "queue_depth": b.jobs.queue_depth(m.group), "inflight": w.busy if w is not None else 0,
        "worker": {"pid": w.pid, "uid": w.uid, "state": w.state} if w is not None else None,
    }


# A model with replicas shows its most available unit's state: it serves while any one is loaded.
STATE_RANK = (s.LOADED, s.LOADING, s.DRAINING, s.UNLOADING, s.FAILED, s.UNLOADED)


def group_status(b: "Broker", group: str) -> dict:
    """A model's status object (GET /v1/models/{id}). With replicas (`devices`): the units'
    figures summed, the state of the most available one, and each replica's own under
    `replicas` (its `device`, and under `devices` every GPU it runs on: with gpus_per_replica,
    its helpers' too; `memory` is its worker's own GPU's, `helper_memory` each helper GPU's).
    With helpers, `memory` also sums theirs as helper_<kind>_bytes."""
    units = b.groups[group]
    if len(units) == 1 and units[0].device is None:
        return model_status(b, units[0])
    each = [model_status(b, m) for m in units]
    best = min(each, key=lambda u: STATE_RANK.index(u["status"]))
    used = [t for t in (m.last_used for m in units) if t is not None]
    loaded = [t for t in (m.loaded_at for m in units) if t is not None]
    replicas = [{"device": m.device, "devices": [m.device, *m.helpers], **u,
                 **({"helper_memory": _helper_memory(m)} if m.helpers else {})} for m, u in zip(units, each)]
    memory = {k: sum(u["memory"][k] for u in each) for k in best["memory"]}
    helpers = [h for r in replicas for h in r.get("helper_memory", ())]
    if helpers:
        memory.update({f"helper_{k}_bytes": sum(h[f"{k}_bytes"] for h in helpers) for k in HELPER_KINDS})
    return {
        **best, "id": group, "worker": None, "replicas": replicas, "memory": memory,
        "last_used": _unix(b, max(used)) if used else None, "loaded_at": _unix(b, min(loaded)) if loaded else None,
        "failures": sum(u["failures"] for u in each), "inflight": sum(u["inflight"] for u in each),
        "last_error": next((u["last_error"] for u in each if u["last_error"]), None),
    }


def stats(b: "Broker", now: float) -> dict:
    """mmi.stats: counters, per-model gauges, memory and workers (for /metrics)."""
    models = {}
    for group in b.groups:
        g = group_status(b, group)
        models[group] = {"queue_depth": g["queue_depth"], "inflight": g["inflight"],
                         "state": g["status"], "memory": g["memory"]}
    workers = [{"uid": w.uid, "pid": w.pid, "host": w.host, "model_id": w.model_id, "state": w.state,
                "free_slots": w.free_slots, "inflight": w.busy, "doomed": w.doomed, "running": w.running,
                "heartbeat_age_s": round(now - w.last_seen, 3)} for w in b.registry.workers.values()]
    memory = {"budget": b.budget(), "committed": b.committed()}
    if any(m.device is not None for m in b.models.values()):   # replicas: each device's own
        memory["devices"] = [{"device": d, "budget": b.budget(d), "committed": b.committed(d)} for d in b.devices()]
    supervisors = [{"host": sup.host, "mem_total": sup.mem_total, "mem_available": sup.mem_available,
                    "heartbeat_age_s": round(now - sup.last_seen, 3)} for sup in b.registry.supervisors.values()]
    return {
        "incarnation": b.incarnation,
        "uptime_s": round(now - (b.started_at if b.started_at is not None else now), 3),
        "counters": dict(sorted(b.counters.items())),
        "models": models,
        "memory": memory,
        "workers": workers,
        "supervisors": supervisors,
        "jobs": {"live": len(b.jobs), "queued": b.jobs.queued_total},
        "shutting_down": b.shutting_down,
    }
