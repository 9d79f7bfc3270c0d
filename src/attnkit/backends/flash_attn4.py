"""FlashAttention-4 backend (``flash_attn4``): ``flash_attn.cute`` (CuTe DSL kernels, pip ``flash-attn-4``).

Read from flash-attn-4 4.0.0b36's ``flash_attn/cute/interface.py`` (``flash_attn_func``,
``flash_attn_varlen_func``); what this backend serves and how it maps attnkit's arguments:

- CUDA, SM90 (Hopper) or SM100/SM110 (Blackwell) only (the only ones FA4 has forward and backward kernels
  for that we claim; SM80/SM120 are refused). float16 / bfloat16 (FA4's fp8 is forward-only: not claimed).
- Head dims: SM90 any D, Dv in [8, 256] that are multiples of 8; SM100 D, Dv <= 128 (multiples of 8), or
  (192, 128), or (256, 256) (no softcap backward at 256). D != Dv is allowed in those ranges.
- Layouts: bshd as is, bhsd as a transposed view (FA4 only needs the last dim contiguous), thd through
  ``flash_attn_varlen_func`` with attnkit's int32 cu_seqlens and max_seqlen. Output comes back (B, Sq, Hq, Dv)
  / (Tq, Hq, Dv); lse (B, Hq, Sq) / (Hq, Tq) float32, which is exactly attnkit's lse shape.
- causal and window are bottom-right aligned in FA4 as in attnkit (``mask.py``: the column limit of row i
  is ``i + Sk - Sq + right``, per sequence for varlen), so they pass through: a side of -1 becomes None
  (FA4 reads a negative side literally unless both are negative), causal keeps ``causal=True`` (FA4 then
  sets the right side to 0, which is attnkit's causal-and-window intersection).
- softcap: FA4's ``softcap * tanh(scale * qk / softcap)``, the same as attnkit's step 2.
- GQA / MQA natively (Hq a multiple of Hk). Rows with no visible key: out 0, lse -inf (FA4's finalize).
- deterministic backward: FA4's ``deterministic=True`` (SM90 and SM100 kernels have it).
- return_lse with gradients only where FA4's lse carries a gradient: its ``FlashAttnFunc`` /
  ``FlashAttnVarlenFunc`` mark the lse non-differentiable ("LSE gradient is not supported yet") in the
  sources we could read, and a loss through the lse (context parallelism's merge) would silently get no
  gradient from it. :func:`lse_grad_problem` reads the installed ``interface.py``: claimed only where the
  backward takes a ``dlse`` and nothing marks the lse non-differentiable.
- thd (varlen) with a window and gradients is refused: FA4 4.0.0b36's varlen backward with a window gave
  wrong dQ on an H200 (measured 2026-12-02, tests/test_backends.py ``thd_window``: grad q error 1.6-2.3
  against a budget of 0.05-0.08, forward and lse right). Dense (bhsd/bshd) windows with gradients passed.
- Refused: bias, ALiBi, score_mod, masks other than causal/window (FA4's own score_mod/mask_mod are CuTe
  DSL functions, not PyTorch callables), dropout.
Under torch.compile the call runs outside the graph (``torch.compiler.disable``: one graph break).
"""

from __future__ import annotations

import importlib
import inspect

import torch

from attnkit import _compile
from attnkit._call import AttentionCall
from attnkit.backends import _cute
from attnkit.backends._roofline import tile_programs
from attnkit.backends.base import Backend, to_bhsd

_LAUNCH_S = 25e-6
# the host's time a call takes (the CuTe DSL's Python launch path): H200 run K, `attnkit bench decode`, B=1
# with 1k keys, where its 8 programs read 4 MB of K/V in ~10 us: 0.0557 ms a call (raw SDPA 0.0247)
_HOST_S = 55e-6


def window_args(call: AttentionCall) -> tuple[bool, int | None, int | None]:
    """(causal, window_left, window_right) for FA4 / FlashAttention-style kernels: -1 sides become None."""
    if call.window is None:
        return call.causal, None, None
    left, right = call.window
    left = None if left < 0 else left
    right = None if right < 0 else right
    if call.causal:
        right = None  # FA sets it to 0 with causal=True: the intersection of causal and the window
    return call.causal, left, right


def fa4_arguments(call: AttentionCall) -> tuple[str, tuple, dict]:
    """(function name, positional args, keyword args) of the FA4 call serving ``call``."""
    causal, left, right = window_args(call)
    kw = dict(
        softmax_scale=call.scale,
        causal=causal,
        window_size=(left, right),
        softcap=0.0 if call.softcap is None else float(call.softcap),
        deterministic=call.deterministic,
        return_lse=call.return_lse,
    )
    if call.layout == "thd":
        kw.update(
            cu_seqlens_q=call.cu_seqlens_q,
            cu_seqlens_k=call.cu_seqlens_k,
            max_seqlen_q=call.Sq,
            max_seqlen_k=call.Sk,
        )
        return "flash_attn_varlen_func", (call.q, call.k, call.v), kw  # (T, H, D)
    if call.layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))  # (B, S, H, D) views
    else:
        q, k, v = call.q, call.k, call.v
    return "flash_attn_func", (q, k, v), kw


def feature_reasons(call: AttentionCall) -> list[str]:
    """What FA4 refuses in any call, whatever the device (the device, dtype and head dims: _cute)."""
    r = []
    for name in ("bias", "alibi_slopes", "score_mod"):
        if getattr(call, name) is not None:
            r.append(f"FA4 takes no {name} (its score_mod is CuTe DSL code, not a PyTorch callable)")
    if call.mask is not None or call.block_mask is not None:
        r.append("FA4 takes only causal and window masks here (a mask_mod would need CuTe DSL code)")
    if call.layout == "thd" and call.window is not None and call.requires_grad:
        r.append(
            "thd with a window and gradients: FA4's varlen backward with a window gave wrong dQ "
            "(measured on an H200, 2026-12-02, flash-attn-4 4.0.0b36)"
        )
    return r


def lse_grad_problem_of(interface) -> str | None:
    """Why the lse of FA4's autograd Functions in module ``interface`` carries no gradient, or None where
    both Functions' backward take one (a ``dlse``) and neither marks the lse non-differentiable."""
    for name in ("FlashAttnFunc", "FlashAttnVarlenFunc"):
        fn = getattr(interface, name, None)
        try:
            fwd, bwd = (inspect.getsource(getattr(fn, m)).replace(" ", "") for m in ("forward", "backward"))
        except (AttributeError, OSError, TypeError):
            return f"FA4's {name} source could not be read: the lse gradient is not known to be there"
        if "mark_non_differentiable(lse)" in fwd:
            return f"FA4's {name} marks its lse non-differentiable (no gradient through return_lse)"
        if "dlse" not in bwd:
            return f"FA4's {name}.backward takes no lse gradient (no gradient through return_lse)"
    return None


_LSE_GRAD: list = []


def lse_grad_problem() -> str | None:
    """:func:`lse_grad_problem_of` the installed ``flash_attn.cute.interface`` (read once)."""
    if not _LSE_GRAD:
        try:
            _LSE_GRAD.append(lse_grad_problem_of(importlib.import_module(_cute.MODULE + ".interface")))
        except Exception as e:  # unreadable: not claimed
            _LSE_GRAD.append(f"FA4's interface does not import ({type(e).__name__}): lse gradient unknown")
    return _LSE_GRAD[0]


@_compile.outside_graph
def _run_fa4(fn, args, kw):
    return fn(*args, **kw)


class FlashAttn4Backend(Backend):
    name = "flash_attn4"
    description = "FlashAttention-4 (flash_attn.cute, CuTe DSL), SM90/SM100"

    def _check_available(self):
        return _cute.availability()

    def why_not(self, call: AttentionCall) -> list[str]:
        r = _cute.common_reasons(call)
        if call.device.type != "cuda":
            return r
        r += feature_reasons(call)
        if not r and call.return_lse and call.requires_grad and lse_grad_problem():
            r.append(f"return_lse with gradients: {lse_grad_problem()}")
        return r

    def compute_seconds(self, call: AttentionCall) -> float:
        return _cute.compute_seconds(call)

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        # No split of the key range (num_splits=1): one program per (batch, KV head, 128 packed GQA rows);
        # at B=1, Hk=8, Sk=128k it read K+V at 0.40 TB/s (8 programs, 132 SMs; H200, issue 15)
        return tile_programs(call, 128, pack_gqa=True), 1.0, 0.0

    def overhead_seconds(self, call: AttentionCall) -> float:
        return _LAUNCH_S

    def host_seconds(self, call: AttentionCall) -> float:
        return _HOST_S if call.device.type == "cuda" else 0.0

    def notes(self, call: AttentionCall) -> list[str]:
        n = ["rates from docs/anchors.md (2026-12-02, one H200 run), not yet re-measured by attnkit"]
        n.append("first call of a shape family compiles CuTe DSL kernels (seconds)")
        if torch.compiler.is_compiling():
            n.append("under torch.compile: runs outside the graph (a graph break)")
        return n

    def run(self, call: AttentionCall):
        fname, args, kw = fa4_arguments(call)
        out, lse = _run_fa4(getattr(_cute.module(), fname), args, kw)
        if call.layout == "bhsd":
            out = to_bhsd(out, "bshd")  # (B, Sq, Hq, Dv) -> (B, Hq, Sq, Dv) view
        return out, (lse if call.return_lse else None)


BACKEND = FlashAttn4Backend()
