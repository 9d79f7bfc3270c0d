"""xFormers backend (``xformers``): ``xformers.ops.memory_efficient_attention``.

Read from xformers 0.0.35 (``xformers/ops/fmha/__init__.py``, ``attn_bias.py``, ``dispatch.py``). xFormers
picks one of its operators (FlashAttention-3 / FlashAttention-2 / CUTLASS) per call; after attnkit's own
rules below, ``why_not`` asks xFormers' dispatcher (``_dispatch_fw`` / ``_dispatch_bw``) with the real
tensors and bias and reports its reasons, so a claimed call is one xFormers really runs.

How attnkit's arguments map (inputs go in as BMHK = (B, S, H, D): bshd as is, bhsd as a transposed view,
thd as (1, T, H, D)):

- causal (bottom-right) -> ``LowerTriangularFromBottomRightMask``; with a window of left side l ->
  ``LowerTriangularFromBottomRightLocalAttentionMask(l + 1)`` (keys ``p - l <= j <= p``).
- window (l, r) without causal -> ``LocalAttentionFromBottomRightMask(l, r)`` (``p - l <= j <= p + r``, the
  same alignment as attnkit); an unbounded side (-1) becomes Sq + Sk (past every key).
- thd -> ``BlockDiagonalMask.from_seqlens(lengths_q, lengths_k)``, causal ->
  ``.make_causal_from_bottomright()`` (per sequence, bottom-right), causal + window ->
  ``.make_local_attention_from_bottomright(l + 1)``. thd with a non-causal window is refused.
- bias (no causal / window / GQA-forward trick) -> a dense (B, Hq, Sq, Sk) tensor of q's dtype whose rows
  are 16-byte aligned (xFormers' requirement); its gradient flows back (CUTLASS backward).
- GQA: forward-only calls use xFormers' 5-D BMGHK form with K/V expanded (no copy); calls that need
  gradients get K/V repeated to Hq heads (xFormers' BMGHK has no backward).
- Refused: rows with no visible key (xFormers leaves them undefined: causal / a bounded right side with
  Sk - Sq + right < 0, a thd sequence with queries and no keys), softcap, ALiBi, score_mod, masks other than
  causal/window, dropout (its random mask cannot be checked against the oracle), return_lse (xFormers'
  lse has no autograd and op-dependent padding), deterministic backward.
Under torch.compile the call runs outside the graph (``torch.compiler.disable``).
"""

from __future__ import annotations

import importlib
import sys

import torch

from attnkit import _compile
from attnkit._call import AttentionCall
from attnkit.backends import _cute
from attnkit.backends._roofline import tile_programs
from attnkit.backends.base import Backend, attention_flops, host_lengths_known, seqlens

_MODULE = "xformers.ops"
# Not measured on our GPUs yet (docs/anchors.md has no xFormers row): ranked like FlashAttention-2
# (sdpa_flash's measured rates), which xFormers dispatches to on most calls, until a run measures it.
_RATES = (330e12, 300e12)
_CHECKS: dict = {}  # signature -> xFormers dispatcher reasons (its checks cost more than a dict lookup)


_IMPORT_ERROR: list = []


def import_error() -> str | None:
    """Why xFormers cannot run here (checked once, at the first call that asks), or None. Any exception
    of the import is the reason: with FA4 installed, ``flash_attn`` is FA4's namespace package and
    ``import xformers.ops`` raised ModuleNotFoundError for ``flash_attn.flash_attn_interface`` (H200 image,
    2026-12-02). A wheel built for another torch or Python imports but loads no C++/CUDA extension (seen
    there with xformers 0.0.35): then its memory-efficient attention is not there either."""
    if not _IMPORT_ERROR:
        try:
            xformers_ops()
            root = sys.modules.get("xformers")  # (``_has_cpp_library``: xformers/__init__.py's own flag)
            if getattr(root, "_has_cpp_library", True) is False:
                _IMPORT_ERROR.append("xFormers' C++/CUDA extensions do not load (built for another torch)")
            else:
                _IMPORT_ERROR.append(None)
        except Exception as e:  # a broken install is a reason, never a crash of the dispatcher
            _IMPORT_ERROR.append(f"{_MODULE} (pip package xformers) does not import: {type(e).__name__}: {e}")
    return _IMPORT_ERROR[0]


def xformers_ops():
    """The imported ``xformers.ops`` (looked up in sys.modules first, so tests can inject a stand-in)."""
    return importlib.import_module(_MODULE)


def _right_bound(call: AttentionCall) -> int | None:
    """The visible band's right edge relative to p = i + Sk - Sq (0 for causal), or None if unbounded."""
    if call.causal:
        return 0
    if call.window is not None and call.window[1] >= 0:
        return call.window[1]
    return None


def empty_rows(call: AttentionCall) -> bool:
    """Whether some query row sees no key at all (causal/window alone decide it; masks are refused)."""
    right = _right_bound(call)
    if call.layout != "thd":
        return right is not None and call.Sk - call.Sq + right < 0 and call.Sq > 0
    lq, lk = seqlens(call)
    return any(a > 0 and (b == 0 or (right is not None and b - a + right < 0)) for a, b in zip(lq, lk))


def attn_bias(call: AttentionCall):
    """The xFormers ``attn_bias`` for the call: None, an AttentionBias object, or a dense tensor."""
    ab = xformers_ops().fmha.attn_bias
    left = None if call.window is None or call.window[0] < 0 else call.window[0]
    if call.layout == "thd":
        lq, lk = seqlens(call)
        bias = ab.BlockDiagonalMask.from_seqlens(lq, lk, device=call.device)
        if call.causal and left is not None:
            return bias.make_local_attention_from_bottomright(left + 1)
        return bias.make_causal_from_bottomright() if call.causal else bias
    if call.causal:
        if left is None:
            return ab.LowerTriangularFromBottomRightMask()
        return ab.LowerTriangularFromBottomRightLocalAttentionMask(left + 1)
    if call.window is not None:
        far = call.Sq + call.Sk  # an unbounded side: past every key
        right = call.window[1] if call.window[1] >= 0 else far
        left = far if left is None else left
        return ab.LocalAttentionFromBottomRightMask(window_left=left, window_right=right)
    if call.bias is not None:
        b4 = call.bias.reshape((1,) * (4 - call.bias.dim()) + tuple(call.bias.shape)).to(call.dtype)
        b4 = b4.expand(call.batch, call.Hq, call.Sq, call.Sk)
        pad = -call.Sk % 8  # rows of 16-byte multiples (xFormers: "attn_bias is not correctly aligned")
        return torch.nn.functional.pad(b4, (0, pad))[..., : call.Sk]
    return None


def xformers_inputs(call: AttentionCall):
    """(q, k, v, attn_bias, grouped): BMHK tensors, or BMGHK (grouped=True) for forward-only GQA."""
    if call.layout == "thd":
        q, k, v = (t.unsqueeze(0) for t in (call.q, call.k, call.v))  # (1, T, H, D)
    elif call.layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))  # (B, S, H, D) views
    else:
        q, k, v = call.q, call.k, call.v
    bias = attn_bias(call)
    grouped = False
    if call.Hq != call.Hk:
        g = call.group
        if call.requires_grad or call.bias is not None:
            k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))  # (B, S, Hq, D)
        else:
            B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
            q = q.reshape(B, Sq, call.Hk, g, call.D)
            k = k.unsqueeze(3).expand(B, Sk, call.Hk, g, call.D)
            v = v.unsqueeze(3).expand(B, Sk, call.Hk, g, call.Dv)
            grouped = True
    return q, k, v, bias, grouped


def feature_reasons(call: AttentionCall) -> list[str]:
    """attnkit's own rules for xFormers (device and dtype aside); the dispatcher's reasons come after."""
    r = []
    for name in ("softcap", "alibi_slopes", "score_mod"):
        if getattr(call, name) is not None:
            r.append(f"xFormers takes no {name}")
    if call.mask is not None or call.block_mask is not None:
        r.append("xFormers takes only causal and window masks here")
    if call.bias is not None and (call.causal or call.window is not None or call.layout == "thd"):
        r.append("bias with causal, window or thd: xFormers has no bottom-right mask plus tensor bias")
    if call.layout == "thd" and call.window is not None and not call.causal:
        r.append("thd with a non-causal window: xFormers' block-diagonal local masks are causal")
    if call.dropout_p > 0:
        r.append("dropout: not claimed (xFormers' random mask cannot be checked against the oracle)")
    if call.return_lse:
        r.append("return_lse: xFormers' lse has no autograd and an operator-dependent padding")
    if call.deterministic and call.requires_grad:
        r.append("deterministic=True: xFormers' backward operators accumulate with atomics")
    if not host_lengths_known(call):
        r.append("thd under torch.compile / graph capture: the block-diagonal mask needs host lengths")
    if not r and empty_rows(call):
        r.append("some query rows see no key: xFormers leaves their output undefined")
    return r


@_compile.outside_graph
def _run_xformers(q, k, v, bias, scale):
    return xformers_ops().memory_efficient_attention(q, k, v, attn_bias=bias, p=0.0, scale=scale)


class XFormersBackend(Backend):
    name = "xformers"
    description = "xFormers memory_efficient_attention (its FA3 / FA2 / CUTLASS operators)"

    def _check_available(self):
        # installed and a GPU (the registry checks this at ``import attnkit``); whether it imports is
        # import_problem's question (importing xformers took 6.7 s of ``import attnkit`` on the H200)
        problem = _cute.find_problem(_MODULE, "xformers")
        if problem is not None:
            return False, problem
        if not torch.cuda.is_available():
            return False, "needs a CUDA device"
        return True, None

    def import_problem(self) -> str | None:
        return import_error()

    def why_not(self, call: AttentionCall) -> list[str]:
        # (the import first: a backend named explicitly that cannot run here says why, whatever the call;
        # H200 with FA4 installed, CPU tensors, test_peers)
        err = import_error()
        if err is not None:
            return [err]
        if call.device.type != "cuda":
            return [f"xFormers' kernels here are CUDA only (device {call.device.type})"]
        r = []
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            r.append(f"dtype {call.dtype}: xFormers' CUDA kernels take float16, bfloat16 and float32")
        r += feature_reasons(call)
        if not r and not torch.compiler.is_compiling():
            r += self._dispatcher_reasons(call)
        return r

    def _dispatcher_reasons(self, call: AttentionCall) -> list[str]:
        """Ask xFormers' own dispatcher whether an operator takes these inputs (forward, and backward)."""
        lens = tuple(map(tuple, seqlens(call))) if call.layout == "thd" else None
        bias = call.bias
        bias_sig = None if bias is None else (bias.shape, bias.requires_grad)
        sig = tuple((t.shape, t.stride()) for t in (call.q, call.k, call.v)) + (call.layout, call.dtype)
        sig += (call.device, bias_sig, lens, call.causal, call.window, call.requires_grad)
        if sig not in _CHECKS:
            q, k, v, bias, _ = xformers_inputs(call)
            fmha = xformers_ops().fmha
            inp = fmha.common.Inputs(query=q, key=k, value=v, attn_bias=bias, p=0.0, scale=call.scale)
            reasons = []
            try:
                inp.validate_inputs()
                fw = fmha.dispatch._dispatch_fw(inp, call.requires_grad)
                if call.requires_grad:
                    packed = getattr(fw, "VARLEN_LSE_PACKED", None) if call.layout == "thd" else None
                    fmha.dispatch._dispatch_bw(inp, packed)
            except (NotImplementedError, ValueError) as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                reasons = ["xformers: " + " | ".join(lines[-6:])]
            _CHECKS[sig] = reasons
        return list(_CHECKS[sig])

    def compute_seconds(self, call: AttentionCall) -> float:
        rate = _RATES[1 if call.requires_grad else 0]
        if call.dtype == torch.float32:
            rate /= 8  # CUTLASS without half-precision tensor cores
        return attention_flops(call, call.requires_grad) / rate

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        # not measured: priced as a kernel without a split of the key range (one program per query tile)
        return tile_programs(call, 128), 1.0, 0.0

    def overhead_seconds(self, call: AttentionCall) -> float:
        t = 30e-6
        if call.bias is not None:  # reading a dense (B, Hq, Sq, Sk) bias
            t += 2 * call.batch * call.Hq * call.Sq * call.Sk / 1.2e12
        return t

    def notes(self, call: AttentionCall) -> list[str]:
        n = ["not measured yet: ranked at FlashAttention-2's rates"]
        if call.Hq != call.Hk and call.requires_grad:
            n.append("GQA with gradients: K/V repeated to Hq heads")
        return n

    def run(self, call: AttentionCall):
        q, k, v, bias, grouped = xformers_inputs(call)
        out = _run_xformers(q, k, v, bias, call.scale)
        if grouped:
            out = out.reshape(out.shape[0], out.shape[1], call.Hq, call.Dv)
        if call.layout == "thd":
            out = out[0]
        elif call.layout == "bhsd":
            out = out.transpose(1, 2)
        return out, None


BACKEND = XFormersBackend()
