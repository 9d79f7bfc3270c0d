"""Facts about FlashAttention-4 (``flash_attn.cute``) shared by the ``flash_attn4`` and ``flex_flash``
backends (FlexAttention's ``BACKEND="FLASH"`` runs FA4's kernels), which never import each other.

Read from flash-attn-4 4.0.0b36 (``flash_attn/cute/interface.py``: ``_validate_head_dims``,
``_flash_attn_fwd``, ``_flash_attn_bwd``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

from attnkit.backends.base import attention_flops

MODULE = "flash_attn.cute"
ARCHS = (9, 10, 11)  # compute capability majors whose FA4 forward and backward kernels we claim
DTYPES = (torch.float16, torch.bfloat16)  # FA4's fp8 is forward-only on SM100: not claimed


def module():
    """The imported ``flash_attn.cute`` (looked up in sys.modules first, so tests can inject a stand-in)."""
    return importlib.import_module(MODULE)


def find_problem(name: str, package: str) -> str | None:
    """Why module ``name`` (pip package ``package``) is not installed, or None where it is, without
    importing it (``import attnkit`` must stay fast: the CuTe DSL takes seconds to import; it is imported at
    the first call that could run on it). ``find_spec`` of a submodule imports its parent packages: whatever
    they raise (not only ImportError) is the reason."""
    if name in sys.modules:
        return None
    missing = f"{name} (pip package {package}) is not installed"
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as e:
        parent = e.name or ""
        if parent and (name == parent or name.startswith(parent + ".")):
            return missing  # a parent package is not there
        return f"{name} ({package}) does not import: {type(e).__name__}: {e}"
    except Exception as e:  # a broken parent package: a reason, never a crash
        return f"{name} ({package}) does not import: {type(e).__name__}: {e}"
    return None if found else missing


def findable(name: str) -> bool:
    """Whether module ``name`` is installed (:func:`find_problem` finds none), without importing it."""
    return find_problem(name, name) is None


_IMPORT_ERROR: list = []


def import_error() -> str | None:
    """Why ``flash_attn.cute`` does not import (checked once, at the first call that asks), or None."""
    if not _IMPORT_ERROR:
        try:
            module()
            _IMPORT_ERROR.append(None)
        except Exception as e:  # a broken install is a reason, never a crash of the dispatcher
            _IMPORT_ERROR.append(f"{MODULE} (flash-attn-4) does not import: {type(e).__name__} {e}")
    return _IMPORT_ERROR[0]


def availability() -> tuple[bool, str | None]:
    """(True, None) where flash_attn.cute is installed and a GPU of a served architecture is present; the
    import itself waits for the first call (:func:`import_error`)."""
    problem = find_problem(MODULE, "flash-attn-4")
    if problem is not None:
        return False, problem
    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major not in ARCHS:
        return False, f"needs an SM90 or SM100/SM110 GPU; this one is sm_{major}{minor}"
    return True, None


def head_dim_reasons(D: int, Dv: int, major: int, softcap: bool = False, grad: bool = False) -> list[str]:
    """Why FA4 cannot take head dims (D, Dv) on a GPU of compute capability ``major`` (empty: it can)."""
    if D % 8 or Dv % 8:
        return [f"head dims D={D}, Dv={Dv}: FA4 needs multiples of 8 (16-byte rows in 16-bit dtypes)"]
    if major == 9:
        if not (8 <= D <= 256 and 8 <= Dv <= 256):
            return [f"head dims D={D}, Dv={Dv}: FA4 on SM90 supports 8..256"]
        return []
    ok = (8 <= D <= 128 and 8 <= Dv <= 128) or (D, Dv) in ((192, 128), (256, 256))
    if not ok:
        return [f"head dims D={D}, Dv={Dv}: FA4 on SM100 supports 8..128, (192, 128) or (256, 256)"]
    if (D, Dv) == (256, 256) and softcap and grad:
        return ["FA4's SM100 backward at head dim 256 has no softcap"]
    return []


def common_reasons(call) -> list[str]:
    """Device, dtype and head-dim reasons that hold for every FA4 kernel."""
    if call.device.type != "cuda":
        return [f"FA4 kernels run on CUDA only (device {call.device.type})"]
    err = import_error()
    if err is not None:
        return [err]
    r = []
    if call.dtype not in DTYPES:
        r.append(f"dtype {call.dtype}: FA4 supports float16 and bfloat16")
    major = torch.cuda.get_device_capability(call.device)[0]
    r += head_dim_reasons(call.D, call.Dv, major, call.softcap is not None, call.requires_grad)
    if major == 9 and call.requires_grad and call.Hq != call.Hk and call.Dv != call.D:
        r.append(f"FA4's SM90 GQA backward needs D == Dv (D={call.D}, Dv={call.Dv}; flash_bwd_sm90.py)")
    if call.dropout_p > 0:
        r.append("FA4 has no dropout")
    return r


# FA4 TFLOP/s (visible-pair FLOPs) on an H200, bf16, measured by `attnkit bench kernels --quick` in one run
# with our kernels and cuDNN (2026-12-02 15:20 UTC; git show
# e8f5ec7:docs/results/2026-12-02-h200-b/kernels.csv; tests/test_dispatch.py holds them to run D's table,
# docs/results/2026-12-02-h200-d/): (fwd, fwd+bwd) by (long or short sequence, D <= 64, causal). Long: the
# mean of the S=4096 and S=16384 rows; short: S=512, B=32.
_RATES = {
    ("long", False, False): (661e12, 615e12),
    ("long", False, True): (614e12, 576e12),
    ("long", True, False): (539e12, 520e12),
    ("long", True, True): (465e12, 461e12),  # (the 20:20 UTC run, docs/results/2026-12-02-h200-d/)
    ("short", False, False): (457e12, 274e12),
    ("short", False, True): (268e12, 140e12),
    ("short", True, False): (326e12, 277e12),
    ("short", True, True): (150e12, 170e12),  # not measured (the run was cut): below the D=128 rows
}
_SOFTCAP_FACTOR = 0.5  # tanh softcap 30 ran at ~300 TFLOP/s fwd and fwd+bwd vs ~600 dense (docs/anchors.md)


def compute_seconds(call) -> float:
    """FA4's compute time for ``call`` at the measured rates (flash_attn4's, and flex_flash's base: the
    same kernels)."""
    short = "short" if call.Sk <= 1024 else "long"
    causal = call.causal or call.window is not None
    rate = _RATES[(short, call.D <= 64, causal)][1 if call.requires_grad else 0]
    if call.softcap is not None:
        rate *= _SOFTCAP_FACTOR
    return attention_flops(call, call.requires_grad) / rate
