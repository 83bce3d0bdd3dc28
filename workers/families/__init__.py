"""Grounding families: `model_type` (config.json) -> the module that knows its prompts and
post-processing. A new family is one module here plus one entry in FAMILIES."""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {"qwen2_vl": "gui_actor", "qwen2_5_vl": "gui_actor"}


def family_for(model_type: str | None) -> ModuleType:
    """The family module for a checkpoint's `model_type`; ValueError naming it when unknown."""
    name = FAMILIES.get(model_type or "")
    if name is None:
        raise ValueError(f"unknown model_type {model_type!r} in config.json; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return importlib.import_module(f"{__name__}.{name}")
