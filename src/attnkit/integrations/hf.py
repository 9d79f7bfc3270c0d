"""Hugging Face transformers integration: ``attn_implementation="attnkit"``.

Usage::

    import attnkit.integrations.hf as akhf
    akhf.register()                         # once per process; returns the name, "attnkit"
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnkit")
    model.set_attn_implementation("attnkit")  # or switch an existing model

``from_config`` writes ``attn_implementation`` into ``cfg`` and keeps that object as ``model.config``: a
second model built from the same ``cfg`` (say eager, to compare) would switch this one too; hence the copy.

:func:`register` installs two functions in transformers (4.53 and later):

- an **attention function** (``AttentionInterface``) that calls :func:`attnkit.attention` with the
  layer's own flags: ``causal`` (decoders) or not (encoders), ``window`` from ``sliding_window`` (the
  exact window transformers' own mask code builds for that value), ``softcap`` (Gemma 2), ``scale`` from
  ``scaling`` and attention dropout. K/V heads are never repeated: attnkit serves GQA/MQA natively.
- a **mask function** (``AttentionMaskInterface``) that, instead of building a dense (B, 1, Sq, Sk) mask,
  returns only what the structure does not already say: ``None`` (no padding), or the 2-D padding mask
  (B, L) when a row has padding or a static cache holds future slots. Only a pattern the flags cannot
  express (image-token overlays, chunked attention, custom mask functions) becomes a dense boolean mask.

The attention function then takes the fastest exact route:

==========================================  ========================================================
what the layer gets                         what attnkit runs
==========================================  ========================================================
no mask, one sequence per row               ``layout="bhsd"`` with ``causal``/``window``
``cu_seq_lens_q/k`` kwargs (packed batch)   ``layout="thd"`` with those offsets (no cross-document)
packed ``position_ids`` (restarting)        ``layout="thd"``, offsets from the position ids
2-D padding mask                            padding removed, ``layout="thd"``; output zero at pads
static cache decode step (Sq <= 16, no pad)  ``attention_with_kvcache`` on the cache in place
4-D boolean mask                            ``mask=`` that mask (dense)
4-D float mask / ``position_bias``          ``bias=`` (additive)
==========================================  ========================================================

Packed batches are recognised from ``position_ids`` even when the caller forgot ``use_cache=False`` (then
transformers' own mask code misses the packing, and eager/SDPA attend across documents; attnkit does not).
A query row without any visible key (a padding row) gives zeros, where eager attention gives an average.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable

import torch

import attnkit
from attnkit._semantics import visibility
from attnkit.packing import cu_seqlens_from_position_ids

log = logging.getLogger("attnkit")

MIN_TRANSFORMERS = (4, 53)
_MISSING = object()
_WARNED: set = set()


# -- registration -------------------------------------------------------------------------------------
def _transformers_version() -> tuple[int, int]:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "attnkit.integrations.hf needs Hugging Face transformers >= 4.53: pip install 'attnkit[hf]'"
        ) from e
    from packaging.version import Version

    v = Version(transformers.__version__)
    return v.major, v.minor


def register(name: str = "attnkit", *, backend: str = "auto") -> str:
    """Register attnkit in transformers under ``name`` (attention function and mask function).

    Args:
        name: the ``attn_implementation`` string to use with ``from_config``/``from_pretrained``/
            ``set_attn_implementation``.
        backend: the attnkit backend every call uses (``"auto"``: the fastest that serves it exactly).

    Returns:
        ``name``.

    Raises:
        RuntimeError: transformers is older than 4.53 (no ``AttentionInterface``/``masking_utils``).
    """
    version = _transformers_version()
    if version < MIN_TRANSFORMERS:
        import transformers

        raise RuntimeError(
            f"attnkit.integrations.hf needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
            f"(AttentionInterface and masking_utils); found {transformers.__version__}. "
            "Upgrade with: pip install -U 'transformers>=4.53'"
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: `name` must be a non-empty string, got {name!r}")
    from transformers import AttentionInterface
    from transformers import masking_utils as mu

    AttentionInterface.register(name, make_attention_function(backend))
    mask_interface = getattr(mu, "AttentionMaskInterface", None)
    if mask_interface is not None:
        mask_interface.register(name, make_mask_function())
    else:  # pragma: no cover - every supported version has it
        log.warning(
            "attnkit: this transformers has no AttentionMaskInterface; padding masks reach attnkit only "
            "when the model builds them itself"
        )
    return name


# -- what transformers' mask code built ------------------------------------------------------------------
def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    try:
        return {n: c.cell_contents for n, c in zip(code.co_freevars, cells)}
    except ValueError:  # an empty cell
        return {}


def classify_mask_function(fn: Callable) -> dict | None:
    """Describe a transformers mask function as structure, or None when it is not one we can express.

    Returns ``{"causal": bool, "sliding_window": int | None, "packed": bool}`` for the causal and
    bidirectional mask functions of ``transformers.masking_utils``, their sliding-window variants and the
    packed-sequence wrapper around any of them; None for anything else (chunked, block-wise and image-token
    overlays, user functions), which then gets a dense mask.
    """
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return {"causal": True, "sliding_window": None, "packed": False, "base": True}
    if fn is getattr(mu, "bidirectional_mask_function", None):
        return {"causal": False, "sliding_window": None, "packed": False, "base": True}
    if getattr(fn, "__module__", None) != mu.__name__:
        return None
    qual = getattr(fn, "__qualname__", "")
    env = _closure(fn)
    if qual.startswith("and_masks.") and "mask_functions" in env:
        out = {"causal": False, "sliding_window": None, "packed": False, "base": False, "bidir_window": False}
        for part in env["mask_functions"]:
            d = classify_mask_function(part)
            if d is None:
                return None
            if d.get("sliding_window") is not None:
                if out["sliding_window"] is not None:
                    return None
                out["sliding_window"] = d["sliding_window"]
                out["bidir_window"] = d.get("bidir_window", False)
            out["causal"] |= d["causal"]
            out["packed"] |= d["packed"]
            out["base"] |= d["base"]
        if out["sliding_window"] is not None and out["bidir_window"] == out["causal"]:
            return None  # a causal window overlay on a bidirectional base (or the reverse): not a layer type
        return out if out["base"] else None
    if qual.startswith("sliding_window_overlay.") and "sliding_window" in env:
        return {"causal": False, "sliding_window": int(env["sliding_window"]), "packed": False, "base": False}
    if qual.startswith("sliding_window_bidirectional_overlay.") and "sliding_window" in env:
        return {
            "causal": False,
            "sliding_window": int(env["sliding_window"]),
            "packed": False,
            "base": False,
            "bidir_window": True,
        }
    if qual.startswith("packed_sequence_mask_function."):
        return {"causal": False, "sliding_window": None, "packed": True, "base": False}
    if qual.startswith("remap_positions_for_packed_sequence.") and "mask_function" in env:
        return classify_mask_function(env["mask_function"])
    return None


@functools.lru_cache(maxsize=64)
def hf_window(sliding_window: int, causal: bool) -> tuple[int, int]:
    """attnkit ``window=(left, right)`` equal to transformers' own sliding-window mask for this value.

    Evaluates transformers' overlay function (``kv_idx > q_idx - w`` for causal layers, ``|q_idx - kv_idx|
    <= w`` for bidirectional ones in current versions) on a probe row, so the window matches the installed
    version's eager mask exactly.
    """
    from transformers import masking_utils as mu

    w = int(sliding_window)
    factory = (
        mu.sliding_window_overlay if causal else getattr(mu, "sliding_window_bidirectional_overlay", None)
    )
    if factory is None:  # pragma: no cover - versions without bidirectional sliding windows
        return (w - 1, w - 1)
    q = w + 2
    kv = torch.arange(0, 2 * w + 5)
    vis = torch.as_tensor(factory(w)(torch.tensor(0), torch.tensor(0), torch.tensor(q), kv)).bool()
    seen = torch.nonzero(vis).reshape(-1)
    if seen.numel() == 0:
        raise ValueError(f"sliding_window={w} leaves no key visible")
    lo, hi = int(seen.min()), int(seen.max())
    left = -1 if lo == 0 else q - lo
    right = -1 if hi == kv.numel() - 1 else hi - q
    if causal:
        right = 0
    return (left, right)


def _dense_mask(**kwargs):
    """transformers' own boolean (B, 1, Sq, Sk) mask, never skipped (True = attend)."""
    from transformers import masking_utils as mu

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return mu.sdpa_mask(**kwargs)


def _tracing(t) -> bool:
    return torch.compiler.is_compiling() or (
        isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing()
    )


def make_mask_function() -> Callable:
    """The ``AttentionMaskInterface`` function; see the module docstring for what it returns."""

    def attnkit_mask(
        batch_size,
        q_length=None,
        kv_length=None,
        q_offset=0,
        kv_offset=0,
        mask_function=None,
        attention_mask=None,
        cache_position=None,
        config=None,
        **kwargs,
    ):
        all_kwargs = dict(
            batch_size=batch_size,
            kv_length=kv_length,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            config=config,
            **kwargs,
        )
        if q_length is not None:
            all_kwargs.update(q_length=q_length, q_offset=q_offset)
        if cache_position is not None:
            all_kwargs["cache_position"] = cache_position
            if q_length is None:  # transformers < 4.56 describes queries by their cache positions
                q_length, q_offset = cache_position.shape[0], cache_position[0]
        structure = classify_mask_function(mask_function) if mask_function is not None else None
        if structure is None or structure["sliding_window"] not in (
            None,
            getattr(config, "sliding_window", None),
        ):
            return _dense_mask(**all_kwargs)
        if isinstance(q_offset, torch.Tensor):
            if _tracing(q_offset):
                return _dense_mask(**all_kwargs)
            q_offset = int(q_offset)
        kv_offset = int(kv_offset)
        # Keys [0, L) can be seen: beyond them lie a static cache's empty future slots.
        L = q_offset + q_length - kv_offset
        if kv_length < L or q_length > L:
            return _dense_mask(**all_kwargs)
        if attention_mask is None or attention_mask.dim() != 2:
            if kv_length == L:
                return None
            device = kwargs.get("device") or (cache_position.device if cache_position is not None else "cpu")
            return torch.ones(batch_size, L, dtype=torch.bool, device=device)
        pad = attention_mask.to(torch.bool)
        need = kv_offset + L
        if pad.shape[-1] < need:
            pad = torch.nn.functional.pad(pad, (0, need - pad.shape[-1]))
        pm = pad[:, kv_offset:need]
        if _tracing(pm):  # no data-dependent branches under torch.compile: a dense mask is exact
            return _dense_mask(**all_kwargs)
        if kv_length == L and bool(pm.all()):
            return None
        return pm

    attnkit_mask.__name__ = "attnkit_mask"
    return attnkit_mask


# -- the attention function ------------------------------------------------------------------------------
def _warn_once(key: str, msg: str):
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def _is_causal(module, is_causal) -> bool:
    if is_causal is not None:
        return bool(is_causal)
    causal = bool(getattr(module, "is_causal", True))
    config = getattr(module, "config", None)
    if causal and config is not None and getattr(config, "is_causal", True) is False:
        causal = False  # transformers builds bidirectional masks for such configs
    return causal


_POS_CACHE: dict = {"ref": None, "version": None, "batch": None, "value": None}


def packed_offsets(position_ids: torch.Tensor, batch: int, seqlen: int):
    """``(cu_seqlens, max_seqlen)`` when ``position_ids`` mark more sequences than batch rows, else None.

    The result for the last ``position_ids`` tensor seen is remembered, so a model reads it from the device
    once per forward pass rather than once per layer.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2):
        return None
    pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    if pos.shape[-1] != seqlen or pos.shape[0] not in (1, batch) or seqlen <= 1:
        return None
    compiling = torch.compiler.is_compiling()
    c = _POS_CACHE
    if (
        not compiling
        and c["ref"] is not None
        and c["ref"]() is position_ids
        and c["version"] == position_ids._version
        and c["batch"] == batch
    ):
        return c["value"]
    cu, mx = cu_seqlens_from_position_ids(pos.expand(batch, seqlen))
    value = (cu, mx) if cu.shape[0] - 1 > batch else None
    if not compiling:
        c.update(ref=weakref.ref(position_ids), version=position_ids._version, batch=batch, value=value)
    return value


def _as_int(x):
    if x is None or isinstance(x, int):
        return x
    if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling():
        return int(x)
    return None


def _dense_bool_mod(m: torch.Tensor):
    """mask_mod reading a boolean (B or 1, H or 1, Sq or 1, Sk) tensor."""
    B1, H1, Q1 = m.shape[0] == 1, m.shape[1] == 1, m.shape[2] == 1

    def mod(b, h, q, kv):
        return m[b * 0 if B1 else b, h * 0 if H1 else h, q * 0 if Q1 else q, kv]

    return mod


def make_attention_function(backend: str = "auto") -> Callable:
    """The ``AttentionInterface`` function; see the module docstring for how each input is served."""

    def attnkit_attention_forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        # query (B, Hq, Sq, D), key (B, Hk, Sk, D), value (B, Hk, Sk, Dv): transformers' layout
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError(
                "attnkit does not implement attention sinks (`s_aux`); use "
                "attn_implementation='eager' or 'flex_attention' for this model"
            )
        if kwargs.get("output_attentions", False):
            _warn_once(
                "output_attentions",
                "attnkit does not return attention weights "
                "(output_attentions=True); use attn_implementation='eager' for them",
            )
        sliding_window = kwargs.get("sliding_window", _MISSING)
        if sliding_window is _MISSING:
            sliding_window = getattr(module, "sliding_window", None)
        softcap = kwargs.get("softcap")
        B, Hq, Sq, D = query.shape
        Sk = key.shape[2]
        causal = _is_causal(module, is_causal)
        common = dict(
            softcap=float(softcap) if softcap else None,
            scale=scaling,
            dropout_p=float(dropout or 0.0),
            backend=backend,
        )
        window = hf_window(int(sliding_window), causal) if sliding_window else None
        position_bias = kwargs.get("position_bias")

        # 1. A complete mask the model built itself: dense, as given.
        if (
            attention_mask is not None
            and (attention_mask.dim() == 4 or type(attention_mask).__name__ == "BlockMask")
            or position_bias is not None
        ):
            return _dense(query, key, value, attention_mask, position_bias, causal, window, common), None

        # 2. Padding: drop padded rows, run the sequences packed.
        if attention_mask is not None:
            return _padded(query, key, value, attention_mask.to(torch.bool), causal, window, common), None

        # 3. Packed sequences (no padding mask).
        if Sq == Sk:
            cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
            if cu_q is not None and cu_k is not None:
                packed = (
                    cu_q.to(torch.int32),
                    cu_k.to(torch.int32),
                    _as_int(kwargs.get("max_length_q")),
                    _as_int(kwargs.get("max_length_k")),
                )
            else:
                found = packed_offsets(kwargs.get("position_ids"), B, Sq)
                packed = None if found is None else (found[0], found[0], found[1], found[1])
            if packed is not None:
                return _packed(query, key, value, packed, causal, window, common), None

        # 4. One sequence per row: structure only.
        out = attnkit.attention(query, key, value, layout="bhsd", causal=causal, window=window, **common)
        return out.transpose(1, 2).contiguous(), None

    attnkit_attention_forward.__name__ = "attnkit_attention_forward"
    return attnkit_attention_forward


def _packed(query, key, value, packed, causal, window, common):
    B, Hq, Sq, D = query.shape
    Hk, Dv = key.shape[1], value.shape[3]
    cu_q, cu_k, max_q, max_k = packed
    q = query.transpose(1, 2).reshape(B * Sq, Hq, D)  # (T, Hq, D)
    k = key.transpose(1, 2).reshape(B * Sq, Hk, D)
    v = value.transpose(1, 2).reshape(B * Sq, Hk, Dv)
    out = attnkit.attention(
        q,
        k,
        v,
        layout="thd",
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        causal=causal,
        window=window,
        **common,
    )
    return out.view(B, Sq, Hq, Dv)


def _padded(query, key, value, pm, causal, window, common):
    """Rows of ``pm`` (B, L), L <= Sk: key j of row b is visible iff j < L and pm[b, j]; query i of row b
    sits at key position L - Sq + i and is computed iff that key position is valid."""
    B, Hq, Sq, D = query.shape
    Hk, Sk, Dv = key.shape[1], key.shape[2], value.shape[3]
    L = pm.shape[-1]
    if pm.shape[0] != B or Sk < L or Sq > L:
        raise ValueError(
            f"attnkit: a 2-D attention mask of shape {tuple(pm.shape)} does not fit queries "
            f"{tuple(query.shape)} and keys {tuple(key.shape)}"
        )
    if _decode_step(query, pm, common):
        return _decode(query, key, value, L, causal, window, common)
    pm_k = pm if Sk == L else torch.nn.functional.pad(pm, (0, Sk - L))
    pm_q = pm[:, L - Sq : L]
    if window is not None:
        # Removing padding shortens distances across holes; windows then need the positions kept.
        pos = torch.arange(Sk, device=pm.device)
        count = pm_k.sum(1)
        first = torch.where(pm_k, pos, Sk).amin(1)
        last = torch.where(pm_k, pos, -1).amax(1)
        if not bool(((last - first + 1 == count) | (count == 0)).all()):
            return _padded_dense(query, key, value, pm_k, L, causal, window, common)
    idx_q = torch.nonzero(pm_q.reshape(-1)).reshape(-1)
    idx_k = torch.nonzero(pm_k.reshape(-1)).reshape(-1)
    lens_q, lens_k = pm_q.sum(1), pm_k.sum(1)
    cu_q = torch.zeros(B + 1, dtype=torch.int32, device=pm.device)
    cu_k = torch.zeros(B + 1, dtype=torch.int32, device=pm.device)
    cu_q[1:] = torch.cumsum(lens_q, 0)
    cu_k[1:] = torch.cumsum(lens_k, 0)
    q = query.transpose(1, 2).reshape(B * Sq, Hq, D).index_select(0, idx_q)
    k = key.transpose(1, 2).reshape(B * Sk, Hk, D).index_select(0, idx_k)
    v = value.transpose(1, 2).reshape(B * Sk, Hk, Dv).index_select(0, idx_k)
    out = attnkit.attention(
        q,
        k,
        v,
        layout="thd",
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=int(lens_q.max()),
        max_seqlen_k=int(lens_k.max()),
        causal=causal,
        window=window,
        **common,
    )
    full = out.new_zeros(B * Sq, Hq, Dv).index_copy(0, idx_q, out)
    return full.view(B, Sq, Hq, Dv)


DECODE_MAX_SQ = 16
_KVCACHE_BACKENDS = ("auto", "triton", "reference")


def _decode_step(query, pm, common) -> bool:
    """A static cache's decode step: few queries, no padding, keys [0, L) valid and the rest future slots."""
    return (
        query.shape[2] <= DECODE_MAX_SQ
        and common["dropout_p"] == 0
        and common["backend"] in _KVCACHE_BACKENDS
        and not (torch.is_grad_enabled() and query.requires_grad)
        and not _tracing(pm)
        and _all_true(pm)
    )


_ALL_TRUE: list = []  # (weak reference to the last mask read, its in-place version, the answer)


def _all_true(pm: torch.Tensor) -> bool:
    """``bool(pm.all())``, a device read, once per mask: transformers passes one mask to every layer of a
    step, so the read happens once a step, not once a layer."""
    try:
        version = pm._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: read it every time
        return bool(pm.all())
    if _ALL_TRUE and _ALL_TRUE[0][0]() is pm and _ALL_TRUE[0][1] == version:
        return _ALL_TRUE[0][2]
    answer = bool(pm.all())
    _ALL_TRUE[:] = [(weakref.ref(pm), version, answer)]
    return answer


def _decode(query, key, value, L, causal, window, common):
    """The decode step on ``attention_with_kvcache``: the static cache (B, Hk, S_max, D) read in place as a
    contiguous cache (B, S_max, Hk, D) view, every row holding L keys (transformers wrote the new ones)."""
    B = query.shape[0]
    seqlens = torch.full((B,), L, dtype=torch.int32, device=query.device)
    return attnkit.attention_with_kvcache(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        cache_seqlens=seqlens,
        causal=causal,
        window=window,
        softcap=common["softcap"],
        scale=common["scale"],
        backend=common["backend"],
        validate=False,
    )


def _padded_dense(query, key, value, pm_k, L, causal, window, common):
    """Padding with holes under a sliding window: a dense mask in absolute positions (eager's semantics)."""
    Sq = query.shape[2]
    shift = L - Sq  # query i stands at key position i + shift

    def mod(b, h, q, kv):
        vis = visibility(causal=causal, window=window, mask_mod=None, b=b, h=h, q=q, kv=kv, off=shift)
        return pm_k[b, kv] if vis is None else pm_k[b, kv] & vis

    out = attnkit.attention(query, key, value, layout="bhsd", mask=mod, **common)
    return out.transpose(1, 2).contiguous()


def _dense(query, key, value, attention_mask, position_bias, causal, window, common):
    Sk = key.shape[2]
    mask = bias = None
    if attention_mask is not None and type(attention_mask).__name__ == "BlockMask":
        mask = attention_mask
    elif attention_mask is not None:
        m = attention_mask[..., :Sk]
        if m.dtype == torch.bool:
            mask = _dense_bool_mod(m)
        else:
            bias = m
    if position_bias is not None:
        pb = position_bias[..., :Sk]
        bias = pb if bias is None else bias + pb
    if attention_mask is None:  # position_bias alone: the structure still applies
        out = attnkit.attention(
            query, key, value, layout="bhsd", causal=causal, window=window, bias=bias, **common
        )
    else:
        out = attnkit.attention(query, key, value, layout="bhsd", mask=mask, bias=bias, **common)
    return out.transpose(1, 2).contiguous()


__all__ = [
    "classify_mask_function",
    "hf_window",
    "make_attention_function",
    "make_mask_function",
    "packed_offsets",
    "register",
]
