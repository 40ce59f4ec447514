"""The Edit view's switch: inpainting (RePaint) and img2img (SDEdit) came with issue 21, as
:func:`ddpm.inpaint.inpaint` and :func:`ddpm.img2img.img2img`. The page's Edit tab stays hidden until the
library has such functions; then it says so, and its controls are the next step (drawing a mask on an
image, a strength slider). Nothing here implements an algorithm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: Where the editing functions are looked for (for each function, the first module that has it wins).
MODULES = ("ddpm.edit", "ddpm.editing", "ddpm.inpaint", "ddpm.img2img")
FUNCTIONS = ("inpaint", "img2img")


def edit_functions(modules: tuple[str, ...] = MODULES) -> dict[str, Callable[..., Any]]:
    """``{"inpaint": ..., "img2img": ...}``, each from the first of ``modules`` that has it (``{}``: none)."""
    found: dict[str, Callable[..., Any]] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        for f in FUNCTIONS:
            if f not in found and callable(getattr(module, f, None)):
                found[f] = getattr(module, f)
    return found


def edit_info(functions: dict[str, Callable[..., Any]]) -> dict[str, Any]:
    """What the page's Edit tab hears: off until the library has the functions."""
    modules = list(dict.fromkeys(f.__module__ for f in functions.values()))
    return {"available": bool(functions), "functions": sorted(functions),
            "module": ", ".join(modules) if modules else None}
