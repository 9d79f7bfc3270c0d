"""Optional third-party attention packages that attnkit lists in ``attnkit info`` but has no backend for yet.

Only an import probe (``importlib.util.find_spec``: nothing is imported, so a broken CUDA extension cannot
crash ``attnkit info``). Each needs an adapter tested on a GPU where it installs before it becomes a
backend (issue 16); until then it is reported as not installed, or installed without an adapter.
"""

from __future__ import annotations

import importlib.util

# backend name -> (module probed, pip package)
WITHOUT_ADAPTER = {
    "flash_attn": ("flash_attn.flash_attn_interface", "flash-attn (FlashAttention-2)"),
    "flash_attn3": ("flash_attn_interface", "FlashAttention-3 (hopper/ build of flash-attention)"),
    "transformer_engine": ("transformer_engine", "transformer-engine"),
    "flashinfer": ("flashinfer", "flashinfer-python"),
}


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # a parent package missing, or a broken one (it may raise anything)
        return False


def probe() -> list[dict]:
    """One record per package: name, available (always False: no adapter), reason."""
    out = []
    for name, (module, package) in WITHOUT_ADAPTER.items():
        if _found(module):
            why = f"{module} is installed, but attnkit has no adapter for it yet"
        else:
            why = f"not installed (no module {module}; pip package {package}); attnkit has no adapter yet"
        out.append({"name": name, "available": False, "reason": why, "description": package})
    return out
