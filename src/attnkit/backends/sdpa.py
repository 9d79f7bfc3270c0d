"""PyTorch SDPA backends: ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``.

Each forces one SDPA kernel with ``torch.nn.attention.sdpa_kernel``. What they serve:

- No ``softcap``, ``score_mod`` or ``return_lse`` (SDPA has none of them).
- ``causal`` goes to SDPA's ``is_causal`` (top-left aligned) only when Sq == Sk; otherwise, and for windows,
  masks, ``bias`` and ALiBi, attnkit builds one dense (B, Hq, Sq, Sk) additive mask (broadcast dims kept
  at 1). ``sdpa_flash`` takes no mask, so it refuses those calls.
- Rows with no visible key: SDPA kernels may return NaN there, so such rows get one dummy visible key and
  their output is zeroed afterwards (their gradients are exactly zero).
- ``thd`` runs one SDPA call per sequence (a Python loop; explain says so).
- GQA: ``enable_gqa`` for flash and math, and for cuDNN where torch's check takes it (forward only, no
  dense mask: :func:`cudnn_takes_gqa`); efficient, and cuDNN otherwise, get K/V expanded to Hq heads.
- ``deterministic`` with gradients: only ``sdpa_math`` (the others' backward kernels use atomics).
On CUDA, after attnkit's own rules, torch's own ``can_use_*`` checks run and their reasons are reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit._call import AttentionCall
from attnkit._semantics import index_grid, modify_scores, visibility
from attnkit.backends import _roofline
from attnkit.backends.base import (
    Backend,
    attention_flops,
    dense_pairs,
    host_lengths_known,
    seqlens,
    to_bhsd,
)

_KINDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# Measured TFLOP/s (forward, forward+backward) on an H200, bf16, D=128, long sequences (docs/anchors.md).
_CUDA_RATES = {
    "cudnn": (560e12, 500e12),
    "flash": (330e12, 300e12),
    "efficient": (165e12, 135e12),
    "math": (40e12, 30e12),
}
# cuDNN's forward on short sequences (Sk <= 1024) without a mask, by head dim: the same H200, B=32 S=512,
# 2026-11-21 (docs/results/2026-11-21-h200-v8: 371-383 TFLOP/s at D=64, 495-499 at D=128); 560 over-rates
# it there. (Causal calls keep 560: their short rows were not measured apart, and 375 sent the causal
# D=64 forward to a kernel 19% slower.)
_CUDNN_SHORT_FWD = {64: 375e12, 128: 495e12}
# cuDNN at D <= 64 on long sequences (S = 4096 and 16384), (forward, forward+backward) by causal: the same
# H200, 2026-12-02, `attnkit bench kernels --quick` with FA4 and our kernels in the run
# (git show e8f5ec7:docs/results/2026-12-02-h200-b/kernels.csv): 460-467 / 440-456 TFLOP/s, causal 430 / 401;
# 560 / 500 over-rated it.
_CUDNN_LONG_D64 = {False: (463e12, 448e12), True: (430e12, 401e12)}
# Rough CPU rates (2-core machine); only the ranking matters.
_CPU_RATES = {"flash": (30e9, 15e9), "math": (15e9, 8e9)}
_DTYPES = {
    "flash": {
        "cuda": (torch.float16, torch.bfloat16),
        "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
    "efficient": {"cuda": (torch.float16, torch.bfloat16, torch.float32)},
    "cudnn": {"cuda": (torch.float16, torch.bfloat16)},
    "math": {
        "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
}


# torch's checks warn once per process, so their verdicts and messages are kept per shape signature.
_TORCH_CHECKS: dict = {}

_SDP_FLAGS = {  # SDPBackend -> torch._C flag name (torch.nn.attention._backend_names, inverted)
    SDPBackend.CUDNN_ATTENTION: "cudnn",
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "mem_efficient",
    SDPBackend.MATH: "math",
}


class _OnlyKernel:
    """Enable exactly one SDPA kernel for the duration of a call.

    Same effect as ``sdpa_kernel([backend])`` at a fraction of its host cost (it touches only the flags
    that change); under torch.compile the official context manager is used, which dynamo understands.
    """

    def __init__(self, backend: SDPBackend):
        self.flags = [
            (getattr(torch._C, f"_get_{n}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{n}"), b == backend)
            for b, n in _SDP_FLAGS.items()
            if hasattr(torch._C, f"_get_{n}_sdp_enabled")
        ]
        self.changed: list = []

    def __enter__(self):
        changed = []
        for get, set_, want in self.flags:
            if get() != want:
                set_(want)
                changed.append((set_, not want))
        self.changed = changed

    def __exit__(self, *exc):
        for set_, old in self.changed:
            set_(old)
        return False


_CUDNN_GQA: dict = {}


def cudnn_takes_gqa(call: AttentionCall) -> bool:
    """Whether torch's cuDNN kernel takes this GQA call's K/V as they are (``enable_gqa=True``, read once):
    forward only, no dense mask, and torch's ``can_use_cudnn_attention`` says yes (torch 2.11, cuDNN 9 on an
    H200 does; decode at B=16, 32/8 heads, 32k keys: 0.485 ms against 13.96 with K/V expanded and 0.548 for
    SDPA's flash, 2026-12-03). Asked once per shape and strides; False off CUDA or where torch cannot say."""
    if call.Hq == call.Hk or call.device.type != "cuda" or call.requires_grad or call.layout == "thd":
        return False
    if call.dropout_p > 0 or _dense_mask_reasons(call):
        return False
    q, k, v = (to_bhsd(t, call.layout) for t in (call.q, call.k, call.v))
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device, call.causal)
    hit = _CUDNN_GQA.get(key)
    if hit is None:
        try:
            params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, call.causal, True)
            with _captured_stderr(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hit = bool(torch.backends.cuda.can_use_cudnn_attention(params, False))
        except (RuntimeError, TypeError, NotImplementedError):  # (meta tensors, an older torch)
            hit = False
        _CUDNN_GQA[key] = hit
    return hit


@contextlib.contextmanager
def _captured_stderr():
    """Capture what C++ code writes to file descriptor 2 (torch's kernel checks warn there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        result = {"text": ""}
        try:
            yield lambda: result["text"]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            result["text"] = tmp.read().decode(errors="replace")


def _torch_warnings(text: str) -> list[str]:
    """The messages of torch's C++ warnings ('[W... file.h:N] Warning: MSG (function f)')."""
    out = []
    for line in text.splitlines():
        _, sep, msg = line.partition("Warning: ")
        if sep:
            msg = re.sub(r" \(function \w+\)$", "", msg.strip())
            if msg not in out:
                out.append(msg)
    return out


def _dense_mask_reasons(call: AttentionCall) -> list[str]:
    """Features that SDPA can only take through an explicit dense mask."""
    need = []
    if call.causal:
        if call.layout == "thd" and host_lengths_known(call):
            lq, lk = seqlens(call)
            if any(a != b for a, b in zip(lq, lk)):
                need.append("causal with Sq != Sk in some sequence (SDPA's is_causal is top-left)")
        elif call.Sq != call.Sk:
            need.append("causal with Sq != Sk (SDPA's is_causal is top-left)")
    if call.window is not None:
        need.append("window")
    if call.mask is not None:
        need.append("mask")
    if call.bias is not None:
        need.append("bias")
    if call.alibi_slopes is not None:
        need.append("alibi_slopes")
    return need


class SDPABackend(Backend):
    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"sdpa_{kind}"
        self._only = _OnlyKernel(_KINDS[kind])
        self.description = f"torch scaled_dot_product_attention, {kind} kernel"

    def _check_available(self):
        if self.kind in ("efficient", "cudnn") and not torch.cuda.is_available():
            return False, "needs a CUDA device"
        if self.kind == "cudnn" and not torch.backends.cudnn.is_available():
            return False, "cuDNN is not available in this torch build"
        return True, None

    # -- capability --------------------------------------------------------------------------------------
    def why_not(self, call: AttentionCall) -> list[str]:
        r = []
        dev = call.device.type
        dtypes = _DTYPES[self.kind].get(dev)
        if dtypes is None:
            return [f"no {self.name} kernel for device {dev}"]
        if call.dtype not in dtypes:
            r.append(f"dtype {call.dtype} not supported on {dev} (supports {', '.join(map(str, dtypes))})")
        if call.return_lse:
            r.append("SDPA does not return the log-sum-exp (return_lse=True)")
        if call.softcap is not None:
            r.append("SDPA has no softcap")
        if call.score_mod is not None:
            r.append("SDPA cannot run a score_mod")
        dense = _dense_mask_reasons(call)
        if self.kind == "flash" and dense:
            r.append("the flash kernel takes no explicit mask, needed here for: " + "; ".join(dense))
        if self.kind == "flash" and call.Dv != call.D:
            r.append(f"the flash kernel needs equal head dims for q/k and v (D={call.D}, Dv={call.Dv})")
        if self.kind == "flash" and dev == "cpu" and call.dropout_p > 0:
            r.append("the CPU flash kernel has no dropout")
        if call.deterministic and call.requires_grad and self.kind != "math":
            r.append("deterministic=True: this kernel's backward accumulates with atomics")
        if not host_lengths_known(call):
            r.append("thd under torch.compile / graph capture: the per-sequence loop needs host lengths")
        if dev == "cuda" and not r and not torch.compiler.is_compiling():
            r.extend(self._torch_reasons(call, dense))
        return r

    def _torch_reasons(self, call: AttentionCall, dense: list[str]) -> list[str]:
        """Ask torch's own kernel-selection checks (CUDA only) with tensors shaped like ours.

        thd calls are checked once per distinct (Sq, Sk) among their sequences, since every sequence
        becomes its own SDPA launch.
        """
        check = {
            "flash": torch.backends.cuda.can_use_flash_attention,
            "efficient": torch.backends.cuda.can_use_efficient_attention,
            "cudnn": torch.backends.cuda.can_use_cudnn_attention,
        }.get(self.kind)
        if check is None:
            return []
        q, k, v = self._as_4d(call)
        if call.layout == "thd":
            lq, lk = seqlens(call)
            shapes = sorted({(a, c) for a, c in zip(lq, lk) if a > 0 and c > 0})
        else:
            shapes = [(call.Sq, call.Sk)]
        grad_mask = bool(dense) and call.bias is not None and call.bias.requires_grad
        for sq, sk in shapes:
            qs, ks, vs = q[:, :, :sq], k[:, :, :sk], v[:, :, :sk]
            sig = (
                self.kind,
                qs.shape,
                qs.stride(),
                ks.shape,
                ks.stride(),
                vs.shape,
                vs.stride(),
                call.dtype,
                call.device,
                bool(dense),
                grad_mask,
                call.dropout_p > 0,
                call.causal,
                call.Hq != call.Hk,
            )
            if sig in _TORCH_CHECKS:
                if _TORCH_CHECKS[sig]:
                    return _TORCH_CHECKS[sig]
                continue
            native = self.kind == "flash" or (self.kind == "cudnn" and cudnn_takes_gqa(call))
            if self.kind in ("efficient", "cudnn") and call.Hq != call.Hk and not native:
                ks = ks[:, :1].expand(ks.shape[0], call.Hq, *ks.shape[2:])
                vs = vs[:, :1].expand(vs.shape[0], call.Hq, *vs.shape[2:])
            mask = None
            if dense:  # a mask with the strides of the real one (last dim contiguous), no Sq x Sk allocation
                mask = torch.zeros(sk, dtype=call.dtype, device=call.device).expand(1, 1, sq, sk)
                if call.bias is not None and call.bias.requires_grad:
                    mask = mask.detach().requires_grad_()
            causal = call.causal and not dense
            params = torch.backends.cuda.SDPAParams(
                qs, ks, vs, mask, call.dropout_p, causal, native and call.Hq != call.Hk
            )
            with _captured_stderr() as text, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = check(params, True)
            if not ok:
                found = _torch_warnings(text()) + [str(w.message).strip() for w in caught]
                msgs = [m for m in found if "has been runtime disabled" not in m]
                where = f" (sequence shape Sq={sq}, Sk={sk})" if call.layout == "thd" else ""
                if not msgs:
                    msgs = [
                        f"can_use_{self.kind}_attention refused (dtype {call.dtype}, "
                        f"D={call.D}, Dv={call.Dv}, dropout={call.dropout_p}, mask={'yes' if dense else 'no'}"
                        f"{', mask requires grad' if grad_mask else ''}) without saying why"
                    ]
                _TORCH_CHECKS[sig] = ["torch: " + m + where for m in msgs]
                return _TORCH_CHECKS[sig]
            _TORCH_CHECKS[sig] = []
        return []

    @staticmethod
    def _as_4d(call: AttentionCall):
        if call.layout == "thd":
            return tuple(t.transpose(0, 1).unsqueeze(0) for t in (call.q, call.k, call.v))
        return tuple(to_bhsd(t, call.layout) for t in (call.q, call.k, call.v))

    # -- estimate -------------------------------------------------------------------------------------------
    def compute_seconds(self, call: AttentionCall) -> float:
        dense = bool(_dense_mask_reasons(call))
        flops = attention_flops(call, call.requires_grad, dense=dense)
        rates = _CUDA_RATES if call.device.type == "cuda" else _CPU_RATES
        rate = rates[self.kind][1 if call.requires_grad else 0]
        short = call.Sk <= 1024 and not (call.requires_grad or call.causal or dense)
        if self.kind == "cudnn" and short and call.device.type == "cuda":
            rate = _CUDNN_SHORT_FWD[min(_CUDNN_SHORT_FWD, key=lambda d: (abs(d - call.D), d))]
        elif self.kind == "cudnn" and call.Sk > 1024 and max(call.D, call.Dv) <= 64 and not dense:
            rate = _CUDNN_LONG_D64[bool(call.causal)][1 if call.requires_grad else 0]
        if call.device.type == "cuda" and call.dtype in (torch.float32, torch.float64):
            rate /= 8  # no half-precision tensor cores
        return flops / rate

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        # SDPA's kernels split the key range where queries are few (decode read K+V at 3.83 TB/s at B=1,
        # H200, issue 15): they fill the device. efficient gets GQA K/V expanded first (by us), cuDNN too
        # where it cannot take them as they are (:func:`cudnn_takes_gqa`), math
        # by torch (``enable_gqa``: repeat_interleave of K and V): K/V read, group copies written, then
        # read by the kernel. math writes and reads its fp32 scores.
        native = self.kind == "flash" or (self.kind == "cudnn" and cudnn_takes_gqa(call))
        kv_reads = 1.0 if call.group == 1 or native else 1.0 + 2.0 * call.group
        scores = 2 * 4 * dense_pairs(call) * call.Hq if self.kind == "math" else 0.0
        if call.Sq > 1 and self.kind in ("flash", "cudnn") and call.device.type == "cuda":
            # flash and cuDNN pack GQA heads and split the keys for one query row only; from two rows on,
            # one program per (batch, query head, 128-row tile) reads its KV head's K/V, taken as they are
            # (group reads) or expanded (H200 run K, B=16, 32/8 heads, 8k keys: 0.134 ms at Sq=1, 0.415 at
            # Sq=4; B=1, 128k keys: 0.139 and 1.50)
            return _roofline.tile_programs(call, 128), float(call.group) if native else kv_reads, scores
        return None, kv_reads, scores

    def bandwidth_share(self, call: AttentionCall) -> float:
        # Decode reads of K+V on the H200 (bf16, 32/8 heads, D=128, 2026-12-03, run F's probe): SDPA's flash
        # kernel 3.42 / 3.92 / 3.87 TB/s at (B, L) = (1, 128k) / (16, 32k) / (16, 128k), cuDNN with native
        # GQA 3.86 / 4.43 / 4.50: flash at 0.87 of cuDNN's (PEAK_BANDWIDTH is about cuDNN's).
        return 0.87 if self.kind == "flash" and call.device.type == "cuda" else 1.0

    def overhead_seconds(self, call: AttentionCall) -> float:
        t = 20e-6
        if _dense_mask_reasons(call):  # building and reading a dense (B, H, Sq, Sk) mask
            per_elem = 1 / 1.2e12 if call.device.type == "cuda" else 1 / 4e9
            t += 2 * dense_pairs(call) * call.Hq * per_elem
        if call.layout == "thd":
            t += 40e-6 * call.batch
        return t

    def notes(self, call: AttentionCall) -> list[str]:
        n = []
        dense = _dense_mask_reasons(call)
        if dense:
            n.append("materialises a dense (B, Hq, Sq, Sk) mask for: " + "; ".join(dense))
        if call.layout == "thd":
            n.append(f"thd: one SDPA call per sequence ({call.batch} sequences)")
        if self.kind in ("efficient", "cudnn") and call.Hq != call.Hk:
            n.append("GQA: K/V expanded to Hq heads")
        return n

    # -- run ---------------------------------------------------------------------------------------------
    def run(self, call: AttentionCall):
        if call.layout != "thd":
            qh, kh, vh = (to_bhsd(t, call.layout) for t in (call.q, call.k, call.v))
            slopes = None
            if call.alibi_slopes is not None:  # (Hq,) or (B, Hq) -> broadcast over (B, Hq, Sq, Sk)
                slopes = call.alibi_slopes.view(-1, call.Hq, 1, 1)
            out = self._run_dense(
                call,
                qh,
                kh,
                vh,
                b=range(call.batch),
                Sq=call.Sq,
                Sk=call.Sk,
                bias=call.bias,
                mask_mod=call.bound_mask_mod(call.Sq, call.Sk),
                slopes=slopes,
            )
            return (out.transpose(1, 2) if call.layout == "bshd" else out), None
        lq, lk = seqlens(call)
        bias = None
        if call.bias is not None:
            b4 = call.bias.reshape((1,) * (4 - call.bias.dim()) + tuple(call.bias.shape))
            bias = b4.expand(call.batch, call.Hq, call.Sq, call.Sk)
        outs, r0, c0 = [], 0, 0
        for n, (a, c) in enumerate(zip(lq, lk)):
            qn, kn, vn = (
                t.transpose(0, 1).unsqueeze(0)
                for t in (call.q[r0 : r0 + a], call.k[c0 : c0 + c], call.v[c0 : c0 + c])
            )
            r0, c0 = r0 + a, c0 + c
            if a == 0:
                outs.append(call.q.new_zeros(0, call.Hq, call.Dv))
                continue
            if c == 0:
                outs.append(call.q.new_zeros(a, call.Hq, call.Dv))
                continue
            slopes = None
            if call.alibi_slopes is not None:
                row = call.alibi_slopes if call.alibi_slopes.dim() == 1 else call.alibi_slopes[n]
                slopes = row.view(1, -1, 1, 1)
            o = self._run_dense(
                call,
                qn,
                kn,
                vn,
                b=[n],
                Sq=a,
                Sk=c,
                bias=None if bias is None else bias[n : n + 1, :, :a, :c],
                mask_mod=call.bound_mask_mod(a, c),
                slopes=slopes,
            )
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, dim=0), None

    def _run_dense(self, call, q, k, v, *, b, Sq, Sk, bias, mask_mod, slopes):
        """q (B', Hq, Sq, D), k/v (B', Hk, Sk, *): one SDPA launch, with a dense mask when needed."""
        dense = (
            (call.causal and Sq != Sk)
            or call.window is not None
            or mask_mod is not None
            or bias is not None
            or slopes is not None
        )
        attn_mask, row_ok = None, None
        if dense:
            dev = q.device
            bi, hi, qi, ki = index_grid(
                list(b), torch.arange(call.Hq), torch.arange(Sq), torch.arange(Sk), dev
            )
            vis = visibility(
                causal=call.causal,
                window=call.window,
                mask_mod=mask_mod,
                b=bi,
                h=hi,
                q=qi,
                kv=ki,
                off=Sk - Sq,
            )
            add = None
            if bias is not None or slopes is not None:
                add = modify_scores(
                    torch.zeros((), dtype=torch.float32, device=dev),
                    softcap=None,
                    bias=bias,
                    slopes=slopes,
                    score_mod=None,
                    b=bi,
                    h=hi,
                    q=qi,
                    kv=ki,
                    off=Sk - Sq,
                )
            if vis is not None:
                row_ok = vis.any(dim=-1, keepdim=True)
                if not bool(row_ok.all()):  # give empty rows one dummy key; their output is zeroed below
                    vis = vis | (~row_ok & (ki == 0))
                else:
                    row_ok = None
            if add is None:
                attn_mask = vis
            elif vis is None:
                attn_mask = add.to(q.dtype)
            else:
                attn_mask = add.masked_fill(~vis, float("-inf")).to(q.dtype)
        gqa = call.Hq != call.Hk
        if gqa and (self.kind == "efficient" or (self.kind == "cudnn" and not cudnn_takes_gqa(call))):
            k = k.repeat_interleave(call.group, dim=1)
            v = v.repeat_interleave(call.group, dim=1)
            gqa = False
        select = sdpa_kernel([_KINDS[self.kind]]) if torch.compiler.is_compiling() else self._only
        with select:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=call.dropout_p,
                is_causal=call.causal and not dense,
                scale=call.scale,
                enable_gqa=gqa,
            )
        if row_ok is not None:
            out = torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out


BACKENDS = [SDPABackend(k) for k in ("flash", "cudnn", "efficient", "math")]
