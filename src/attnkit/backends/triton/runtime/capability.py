"""What the Triton backend's kernels can do, written once: the capability table that ``backend.py``
(``why_not`` / ``cost`` / ``notes``), the launchers and the Gluon host code all read, and the predicates
built on it (a plain call, Gluon eligibility, whether Triton interprets).

``TRITON``: the plain-Triton kernels (``kernels/fwd.py``, ``bwd.py``, ``bwd_dq.py``), every feature.
``GLUON_FWD`` / ``GLUON_BWD``: the Hopper Gluon kernels (``kernels/hopper/``), plain calls only; the Gluon
host code (``ops/gluon_fwd.py``, ``ops/gluon_bwd.py``) then checks strides and alignment, which the table
cannot know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_INTERPRETING: list[bool] = []


def interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter. Triton decides that once, when the kernels are
    decorated (imported), from ``TRITON_INTERPRET``; so is it read here once, on the first ask (every
    launch asks: an environment read is ~1 us of host time)."""
    if not _INTERPRETING:
        _INTERPRETING.append(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    return _INTERPRETING[0]


_CAPS: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, asked of the driver once per device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPS:
        _CAPS[idx] = torch.cuda.get_device_capability(idx)
    return _CAPS[idx]


@dataclass(frozen=True)
class Kernels:
    """One kernel family's limits. ``capabilities``: the compute capabilities it compiles for (None: any
    at least ``min_capability``); ``head_dims``: the head dims it takes (None: any up to
    ``max_head_dim``); ``same_dv``: D must equal Dv; ``sk_multiple``: Sk must be a multiple of it."""

    dtypes: tuple
    layouts: tuple[str, ...]
    min_capability: tuple[int, int] = (8, 0)
    capabilities: tuple | None = None
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int = 256
    same_dv: bool = False
    sk_multiple: int = 1
    positive_scale: bool = False
    switches: tuple[str, ...] = ()  # environment variables that turn the family off with "0"

    def takes(self, cap, layout: str, D: int, Dv: int, dtype, Sk: int, scale) -> bool:
        """Whether a call of these properties is one this family serves (features aside)."""
        return (
            (cap in self.capabilities if self.capabilities is not None else cap >= self.min_capability)
            and layout in self.layouts
            and dtype in self.dtypes
            and (D in self.head_dims if self.head_dims is not None else max(D, Dv) <= self.max_head_dim)
            and (Dv == D or not self.same_dv)
            and Sk % self.sk_multiple == 0
            and (scale > 0 or not self.positive_scale)
            and all(os.environ.get(name, "1") != "0" for name in self.switches)
        )


_HALF = (torch.float16, torch.bfloat16)
TRITON = Kernels(dtypes=_HALF + (torch.float32,), layouts=("bhsd", "bshd", "thd"))
# the Gluon kernels: sm_90 only (wgmma, TMA, setmaxnreg), plain calls, D == Dv, a positive scale (folded
# into one FMA a score); the forward's key tiles never cross a sequence end (Sk % 64 == 0)
_GLUON = dict(
    dtypes=_HALF, layouts=("bhsd", "bshd"), capabilities=((9, 0),), same_dv=True, positive_scale=True
)
GLUON_FWD = Kernels(head_dims=(64, 128), sk_multiple=64, switches=("ATTNKIT_TRITON_GLUON",), **_GLUON)
# the Gluon forward on the tile lists of a mask carried as data (``ops/gluon_fwd.try_listed``): head dim 128
GLUON_LISTED = Kernels(
    head_dims=(128,),
    sk_multiple=64,
    switches=("ATTNKIT_TRITON_GLUON", "ATTNKIT_TRITON_GLUON_LISTED"),
    **_GLUON,
)
GLUON_BWD = Kernels(
    head_dims=(64, 128), switches=("ATTNKIT_TRITON_GLUON", "ATTNKIT_TRITON_GLUON_BWD"), **_GLUON
)
# the Gluon dK/dV on the transposed tile lists of a mask carried as data (``ops/gluon_bwd.listed_args``)
GLUON_LISTED_BWD = Kernels(
    head_dims=(64, 128),
    switches=("ATTNKIT_TRITON_GLUON", "ATTNKIT_TRITON_GLUON_BWD", "ATTNKIT_TRITON_GLUON_LISTED_BWD"),
    **_GLUON,
)

# every family's off switches, once each (the replay key of ``ops/attention.py`` reads them all)
_FAMILIES = (GLUON_FWD, GLUON_LISTED, GLUON_BWD, GLUON_LISTED_BWD)
SWITCHES = tuple(dict.fromkeys(s for k in _FAMILIES for s in k.switches))


def plain_features(bias, alibi_slopes, softcap, window_left: int, window_right: int, dropout_p) -> bool:
    """A plain call: no bias, ALiBi, softcap, window or dropout (causal is fine). The one definition:
    :meth:`FwdParams.plain` and :func:`plain_call` ask here."""
    return (
        bias is None
        and alibi_slopes is None
        and not softcap
        and window_left < 0
        and window_right < 0
        and not dropout_p
    )


def plain_call(call) -> bool:
    """:func:`plain_features` of an ``AttentionCall``, on a CUDA device."""
    wl, wr = call.window if call.window is not None else (-1, -1)
    plain = plain_features(call.bias, call.alibi_slopes, call.softcap, wl, wr, call.dropout_p)
    # (masked calls and score mods: the Triton kernels)
    return plain and call.mask is None and call.score_mod is None and call.device.type == "cuda"


def data_mask_call(call) -> bool:
    """An ``AttentionCall`` whose features, besides a mask and the causal / window flags, are none (no bias,
    ALiBi, softcap, dropout or score mod), on a CUDA device, not thd: what the Gluon listed kernels may take
    once its mask lowers to data (``backend.py``'s cost; the launchers ask ``FwdParams.data_mask_only``)."""
    return (
        call.device.type == "cuda"
        and call.score_mod is None
        and call.layout != "thd"
        and plain_features(call.bias, call.alibi_slopes, call.softcap, -1, -1, call.dropout_p)
    )


def gluon_forward_eligible(cap, layout: str, D: int, Dv: int, dtype, Sk: int, causal: bool, scale) -> bool:
    """Whether a plain forward goes to the Hopper Gluon kernel (``kernels/hopper/fwd.py``: warp-specialized,
    TMA, FA3's overlap), judged from the call alone; ``ops/gluon_fwd.try_forward`` then checks strides and
    alignment. Where it is faster on the H200 (docs/triton_notes.md versions 5 and 8, same process as the
    plain-Triton kernel): head dim 128 at every measured length (S = 4k: 690 against 463 TFLOP/s; S = 512:
    509 against 299, causal 238 against 174), head dim 64 without a causal mask (S = 512, persistent: 381
    against 311; causal: 147 against 209). ``ATTNKIT_TRITON_GLUON=0`` turns it off."""
    return GLUON_FWD.takes(cap, layout, D, Dv, dtype, Sk, scale) and (D == 128 or not causal)


def gluon_listed_eligible(cap, layout: str, D: int, Dv: int, dtype, Sk: int, scale, band: bool) -> bool:
    """Whether a forward whose only features are a mask carried as data and the causal / window flags goes
    to the Hopper Gluon kernel on its tile lists (``kernels/hopper/fwd.py`` with LISTED), judged from the
    call alone; ``ops/gluon_fwd.try_listed`` then checks strides, alignment and the lists. Not for a band
    (``band``: a left window bound, or a mask of ``masks._intervals._BANDS``): most of its tiles are
    partial, and the listed Triton kernel at 64 x 64 tiles was faster (H200, bf16, B=2 H=16 S=8k D=128,
    2026-12-03, run G: global + window 0.639 against 0.565 ms; documents, prefix-LM and a shared prefix
    0.456 / 1.046 / 0.601 against 0.569 / 1.495 / 0.841). ``ATTNKIT_TRITON_GLUON_LISTED=0`` turns it off
    (the listed Triton kernel then runs it)."""
    return GLUON_LISTED.takes(cap, layout, D, Dv, dtype, Sk, scale) and not band


def gluon_backward_eligible(cap, layout: str, D: int, Dv: int, dtype, scale) -> bool:
    """Whether a plain backward's dK/dV goes to the Hopper Gluon kernel (``kernels/hopper/bwd.py``: TMA
    producer warp, two consumer warpgroups), judged from the call alone; ``ops/gluon_bwd.tma_views`` then
    checks strides and alignment. ``ATTNKIT_TRITON_GLUON=0`` turns off both Gluon kernels,
    ``ATTNKIT_TRITON_GLUON_BWD=0`` this one alone."""
    return GLUON_BWD.takes(cap, layout, D, Dv, dtype, 0, scale)


FUSED_DQ_HEAD_DIMS = (64,)  # where adding dQ in the dK/dV kernel measured faster than the dQ pass ...
FUSED_DQ_MIN_LEN = 4096  # ... from this many queries and keys on (H200, run L: 0.71x at B=16 S=1k)


def gluon_fused_dq(D: int, Sq: int, Sk: int, deterministic: bool) -> bool:
    """Whether the Gluon dK/dV kernel also adds dQ (TMA reduce-adds into a float32 buffer: the sum's order
    varies from run to run, so never with ``deterministic``) instead of the separate dQ pass: at the head
    dims of FUSED_DQ_HEAD_DIMS from FUSED_DQ_MIN_LEN queries and keys; ``ATTNKIT_TRITON_GLUON_DQ=1`` /
    ``=0`` forces it on / off. Never where Sq % 4 != 0: the kernel TMA-loads the row statistics as (B Hq, Sq)
    float32 rows, whose stride must be a multiple of 16 bytes."""
    if deterministic or Sq % 4:
        return False
    forced = os.environ.get("ATTNKIT_TRITON_GLUON_DQ")
    if forced in ("0", "1"):
        return forced == "1"
    return D in FUSED_DQ_HEAD_DIMS and min(Sq, Sk) >= FUSED_DQ_MIN_LEN


def gluon_listed_backward_eligible(cap, layout: str, D: int, Dv: int, dtype, scale) -> bool:
    """Whether the dK/dV of a backward whose only features are a mask carried as data and the causal / window
    flags goes to the Hopper Gluon kernel on the transposed tile lists (``kernels/hopper/bwd.py`` with
    LISTED), judged from the call alone; ``ops/gluon_bwd.tma_views`` and ``listed_args`` then check strides,
    alignment and the lists. ``ATTNKIT_TRITON_GLUON_LISTED_BWD=0`` turns it off (the listed Triton kernel then
    runs dK/dV)."""
    return GLUON_LISTED_BWD.takes(cap, layout, D, Dv, dtype, 0, scale)


def gluon_forward_for_call(call) -> bool:
    """:func:`gluon_forward_eligible` for a plain ``AttentionCall`` (``backend.py``'s cost and notes)."""
    return plain_call(call) and gluon_forward_eligible(
        capability(call.device), call.layout, call.D, call.Dv, call.dtype, call.Sk, call.causal, call.scale
    )


def gluon_backward_for_call(call) -> bool:
    """:func:`gluon_backward_eligible` for a plain ``AttentionCall``."""
    return plain_call(call) and gluon_backward_eligible(
        capability(call.device), call.layout, call.D, call.Dv, call.dtype, call.scale
    )
