"""The Edit view's switch: inpainting (RePaint) and img2img (SDEdit) arrive with issue 21 in a module
of their own, built in parallel. The page's Edit tab stays hidden until that module's ``inpaint`` and
``img2img`` functions exist; then it says so, and its controls are the next step (drawing a mask on an
image, a strength slider). Nothing here implements an algorithm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: Where the editing functions may land (the first module that has them wins).
MODULES = ("ddpm.edit", "ddpm.editing", "ddpm.inpaint")
FUNCTIONS = ("inpaint", "img2img")


def edit_functions(modules: tuple[str, ...] = MODULES) -> dict[str, Callable[..., Any]]:
    """``{"inpaint": ..., "img2img": ...}`` from the first of ``modules`` that has any of them, else ``{}``."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        found = {f: getattr(module, f) for f in FUNCTIONS if callable(getattr(module, f, None))}
        if found:
            return found
    return {}


def edit_info(functions: dict[str, Callable[..., Any]]) -> dict[str, Any]:
    """What the page's Edit tab hears: off until the library has the functions."""
    return {"available": bool(functions), "functions": sorted(functions),
            "module": next(iter(functions.values())).__module__ if functions else None}
