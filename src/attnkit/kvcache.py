"""Decoding against a KV cache: ``attention_with_kvcache`` (docs/api.md §4), contiguous or paged.

A serving engine keeps keys and values of every sequence in a cache and calls this once per layer and
decode step: the new tokens' keys/values (``k_new``/``v_new``) are written into the cache in place at each
row's current length, then the new queries attend to everything the row holds. The cache is

- contiguous: ``k_cache`` (B, S_max, Hk, D), row b's logical key j at ``k_cache[b, j]``; or
- paged: ``k_cache`` (num_pages, page_size, Hk, D) with ``block_table`` int32 (B, max_pages), row b's
  logical key j at ``k_cache[block_table[b, j // page_size], j % page_size]`` (pages of any size >= 1,
  in any order; FlashAttention's / vLLM's ``block_table`` form).

Backends: ``"triton"`` (the split-KV kernel, ``backends/triton/kernels/decode.py``, with ``score_mod`` /
``mask`` compiled into it), ``"reference"`` (the keys of each row gathered and packed, then the oracle),
``"auto"`` (the kernel on CUDA where it serves the call, the gathered keys elsewhere and for calls that want
gradients or hold a mod the compiler cannot lower).
"""

from __future__ import annotations

import torch

from attnkit._call import DTYPES, _validate_programmable, normalize
from attnkit.errors import AttentionInputError, UnsupportedError

_BACKENDS = ("auto", "triton", "reference")
_MAX_HEAD_DIM = 256


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__} {t!r}"


def _fail(arg, expected, got, hint=None):
    raise AttentionInputError(arg, expected, got, hint)


class _Cache:
    """Shapes of a validated call: B, Sq, Hq, D, Hk, Dv, Sq_new, capacity, paged, page_size, num_pages;
    ``nothing_to_append`` when no new key can be written (none given, no row, no room)."""

    def __init__(self, q, k_cache, v_cache, k_new, block_table):
        self.B, self.Sq, self.Hq, self.D = q.shape
        self.Hk, self.Dv = k_cache.shape[2], v_cache.shape[3]
        self.Sq_new = 0 if k_new is None else k_new.shape[1]
        self.paged = block_table is not None
        if self.paged:
            self.num_pages, self.page_size = k_cache.shape[0], k_cache.shape[1]
            self.max_pages = block_table.shape[1]
            self.capacity = self.max_pages * self.page_size
        else:
            self.num_pages, self.page_size, self.max_pages = 0, 0, 0
            self.capacity = k_cache.shape[1]
        self.nothing_to_append = (
            self.Sq_new == 0 or self.B == 0 or self.capacity == 0 or (self.paged and self.num_pages == 0)
        )


def _check_tensor(name, t, rank, shape_txt):
    if not isinstance(t, torch.Tensor):
        _fail(name, f"a torch.Tensor {shape_txt}", _desc(t))
    if t.dim() != rank:
        _fail(name, f"a {rank}-D tensor {shape_txt}", _desc(t))


def _check_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table) -> _Cache:
    _check_tensor("q", q, 4, "(B, Sq, Hq, D)")
    if q.dtype not in DTYPES:
        _fail("q", "dtype float16, bfloat16, float32 or float64", _desc(q))
    cache_txt = "(num_pages, page_size, Hk, D)" if block_table is not None else "(B, S_max, Hk, D)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, 4, cache_txt)
        if t.dtype != q.dtype or t.device != q.device:
            _fail(name, f"dtype {q.dtype} on {q.device} (those of q)", _desc(t))
    B, Sq, Hq, D = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        _fail("v_cache", f"the first three sizes of k_cache {tuple(k_cache.shape[:3])}", _desc(v_cache))
    if k_cache.shape[3] != D:
        _fail("k_cache", f"head dim {D} (the head dim of q)", _desc(k_cache))
    Hk = k_cache.shape[2]
    if Hk == 0 or Hq % Hk != 0:
        _fail(
            "k_cache",
            f"a number of KV heads dividing the {Hq} query heads (GQA/MQA)",
            _desc(k_cache),
            "query head h reads key/value head h // (Hq // Hk)",
        )
    if D == 0 or v_cache.shape[3] == 0:
        _fail("q" if D == 0 else "v_cache", "a head dim > 0", _desc(q if D == 0 else v_cache))
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            _fail("block_table", "an int32 tensor (B, max_pages)", _desc(block_table))
        if block_table.dim() != 2 or block_table.shape[0] != B:
            _fail("block_table", f"shape ({B}, max_pages)", _desc(block_table))
        if block_table.device != q.device:
            _fail("block_table", f"a tensor on the device of q ({q.device})", _desc(block_table))
        if k_cache.shape[1] == 0:
            _fail("k_cache", "a page size >= 1", _desc(k_cache))
    elif k_cache.shape[0] != B:
        _fail(
            "k_cache",
            f"batch size {B} (the batch of q) for a contiguous cache",
            _desc(k_cache),
            "a paged cache (num_pages, page_size, Hk, D) needs block_table",
        )
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        _fail("cache_seqlens", f"an int32 tensor ({B},)", _desc(cache_seqlens))
    if tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != q.device:
        _fail("cache_seqlens", f"shape ({B},) on {q.device}", _desc(cache_seqlens))
    if (k_new is None) != (v_new is None):
        _fail("v_new" if v_new is None else "k_new", "given together with the other", "None")
    if k_new is not None:
        Dv = v_cache.shape[3]
        for name, t, d in (("k_new", k_new, D), ("v_new", v_new, Dv)):
            _check_tensor(name, t, 4, "(B, Sq_new, Hk, D|Dv)")
            if t.dtype != q.dtype or t.device != q.device:
                _fail(name, f"dtype {q.dtype} on {q.device} (those of q)", _desc(t))
            if t.shape[0] != B or t.shape[2] != Hk or t.shape[3] != d:
                _fail(name, f"shape ({B}, Sq_new, {Hk}, {d})", _desc(t))
        if v_new.shape[1] != k_new.shape[1]:
            _fail("v_new", f"{k_new.shape[1]} new rows (as many as k_new)", _desc(v_new))
    return _Cache(q, k_cache, v_cache, k_new, block_table)


def _check_values(c: _Cache, cache_seqlens, block_table) -> list[int]:
    """One device sync: the lengths, and whether any used table entry is out of range. Returns the host
    lengths ``cache_seqlens`` (before appending)."""
    total = cache_seqlens.long() + c.Sq_new  # (B,) keys each row attends
    flags = [total]
    if c.paged and c.max_pages > 0:
        need = (total.clamp(min=0) + c.page_size - 1) // c.page_size  # pages each row uses
        used = torch.arange(c.max_pages, device=total.device)[None, :] < need[:, None]
        bad = used & ((block_table < 0) | (block_table >= c.num_pages))
        flags.append(bad.any(dim=1).long())
    host = torch.stack(flags).tolist()
    lens = [t - c.Sq_new for t in host[0]]
    for b, (n, t) in enumerate(zip(lens, host[0])):
        if n < 0:
            _fail("cache_seqlens", "lengths >= 0", f"cache_seqlens[{b}] = {n}")
        if t > c.capacity:
            if c.paged and t <= c.num_pages * c.page_size:
                _fail(
                    "block_table",
                    f"at least {-(-t // c.page_size)} pages in row {b} ({t} keys of pages of {c.page_size})",
                    f"max_pages = {c.max_pages}",
                    "a row needs more pages than the table has: widen block_table",
                )
            _fail(
                "cache_seqlens",
                f"cache_seqlens[b] + Sq_new <= the cache capacity ({c.capacity})",
                f"row {b}: {n} + {c.Sq_new} = {t}",
                "a length past the end of the cache",
            )
    if c.paged and len(host) > 1:
        for b, bad in enumerate(host[1]):
            if bad:
                pages = -(-host[0][b] // c.page_size)
                row = block_table[b, :pages].tolist()
                _fail(
                    "block_table",
                    f"page indices in [0, {c.num_pages}) for the {pages} pages row {b} uses",
                    f"block_table[{b}, :{pages}] = {row[:16]}{' ...' if len(row) > 16 else ''}",
                )
    return lens


def _positions(c: _Cache, cache_seqlens, block_table, Sn: int):
    """(dim-0 index, dim-1 index) of logical positions ``cache_seqlens[b] + t``, t < Sn, every index clamped
    into the cache (so a poisoned table or length never writes outside it)."""
    dev = cache_seqlens.device
    pos = cache_seqlens.long()[:, None] + torch.arange(Sn, device=dev)[None, :]  # (B, Sn)
    pos = pos.clamp(0, max(c.capacity - 1, 0))
    if not c.paged:
        return torch.arange(c.B, device=dev)[:, None].expand(c.B, Sn), pos
    page = block_table.long().gather(1, pos // c.page_size).clamp(0, c.num_pages - 1)
    return page, pos % c.page_size


def _append(c: _Cache, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """Write k_new/v_new (B, Sq_new, Hk, D|Dv) at each row's length, in place (no host sync)."""
    if c.nothing_to_append:
        return
    i0, i1 = _positions(c, cache_seqlens, block_table, c.Sq_new)
    k_cache.index_put_((i0, i1), k_new)
    v_cache.index_put_((i0, i1), v_new)


def gather_rows(c: _Cache, k_cache, v_cache, block_table, lens: list[int]):
    """Keys and values of every row in logical order, packed: (sum Sk_b, Hk, D|Dv) and the Sk_b list."""
    ks, vs, sk = [], [], []
    for b, n in enumerate(lens):
        t = n + c.Sq_new
        sk.append(t)
        if c.paged:
            pages = block_table[b, : -(-t // c.page_size)].long()
            ks.append(k_cache[pages].flatten(0, 1)[:t])
            vs.append(v_cache[pages].flatten(0, 1)[:t])
        else:
            ks.append(k_cache[b, :t])
            vs.append(v_cache[b, :t])
    return torch.cat(ks), torch.cat(vs), sk


def _gathered(c: _Cache, q, k_cache, v_cache, block_table, lens, flags, backend, return_lse):
    """Every row's keys gathered and packed, then ``attention(layout="thd")``, aligned per row."""
    from attnkit.api import attention

    k, v, sk = gather_rows(c, k_cache, v_cache, block_table, lens)
    dev = q.device
    cu_q = torch.arange(c.B + 1, device=dev, dtype=torch.int32) * c.Sq
    cu_k = torch.zeros(c.B + 1, device=dev, dtype=torch.int32)
    cu_k[1:] = torch.tensor(sk, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
    out = attention(
        q.reshape(c.B * c.Sq, c.Hq, c.D),
        k,
        v,
        layout="thd",
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=c.Sq,
        max_seqlen_k=max(sk, default=0),
        return_lse=return_lse,
        backend=backend,
        **flags,
    )
    if not return_lse:
        return out.reshape(c.B, c.Sq, c.Hq, c.Dv), None
    out, lse = out
    return out.reshape(c.B, c.Sq, c.Hq, c.Dv), lse.reshape(c.Hq, c.B, c.Sq).transpose(0, 1).contiguous()


def _triton_reasons(call, device) -> list[str]:
    r = []
    if call.requires_grad:
        r.append(
            "no backward (decode kernel): q, the caches or a tensor captured by score_mod / mask require "
            "grad (use backend='reference' for gradients, or torch.no_grad())"
        )
    if call.score_mod is not None or call.mask is not None:
        try:
            from attnkit.backends.triton.decode import mod_why_not

            why = mod_why_not(call)
        except ImportError:  # (no triton: said below)
            why = None
        if why is not None:
            r.append(why)
    if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        r.append(f"dtype {call.dtype} (float16, bfloat16, float32)")
    if max(call.D, call.Dv) > _MAX_HEAD_DIM:
        r.append(f"head dim {max(call.D, call.Dv)} > {_MAX_HEAD_DIM}")
    if device.type != "cuda":
        from attnkit.backends.triton.runtime import tuning

        try:
            import triton  # noqa: F401
        except ImportError:
            r.append("triton is not installed")
        else:
            if not tuning.interpreting():
                r.append(f"tensors on {device.type}: needs CUDA (or TRITON_INTERPRET=1 on the CPU)")
            elif call.dtype == torch.bfloat16:
                r.append("bfloat16 in the Triton interpreter (its bf16 tl.dot is wrong): CUDA only")
    return r


def attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    *,
    cache_seqlens,
    k_new=None,
    v_new=None,
    block_table=None,
    causal=False,
    window=None,
    softcap=None,
    alibi_slopes=None,
    score_mod=None,
    mask=None,
    scale=None,
    return_lse=False,
    backend="auto",
    validate=True,
):
    r"""Attention of new queries against a KV cache, after appending new keys/values in place.

    Args:
        q: (B, Sq, Hq, D) new queries (Sq small for decode; any Sq for chunked prefill).
        k_cache, v_cache: contiguous (B, S_max, Hk, D|Dv), or paged (num_pages, page_size, Hk, D|Dv) with
            ``block_table``. Same dtype and device as q; Hq a multiple of Hk (query head h reads KV head
            ``h // (Hq // Hk)``).
        cache_seqlens: int32 (B,): valid keys of each row before ``k_new`` is appended.
        k_new, v_new: optional (B, Sq_new, Hk, D|Dv), written into the cache at logical positions
            ``cache_seqlens[b] .. cache_seqlens[b] + Sq_new - 1`` (in place), then attended.
        block_table: int32 (B, max_pages) for a paged cache: logical page n of row b is
            ``k_cache[block_table[b, n]]``. Only the pages a row uses are read (the rest may hold anything).
        causal, window, softcap, alibi_slopes ((Hq,) or (B, Hq) float32), score_mod, mask, scale: as in
            :func:`attnkit.attention`, aligned per row with ``Sk_b = cache_seqlens[b] + Sq_new``: query i of
            row b stands at key position ``i + Sk_b - Sq``. With Sq = Sq_new = 3 and Sk_b = 6, causal::

                █ █ █ █ · ·
                █ █ █ █ █ ·
                █ █ █ █ █ █

            ``score_mod`` and ``mask`` (a Mask, a ``mask_mod`` callable or a BlockMask) run compiled inside
            the Triton decode kernel (``attnkit.compiler``; the mask as ``where(mask, score_mod(s),
            -inf)``, per element) with ``b`` the row, ``h`` the query head, ``q_idx`` the query token
            ``0 .. Sq-1`` and ``kv_idx`` the logical key position (paged or not). A mask's tensors are
            checked against Sq and the capacity (S_max, or max_pages * page_size): ``document(doc_ids,
            kv_doc_ids)`` takes ids (B, Sq) and (B, capacity). Mods the compiler cannot lower, and calls
            that want gradients (q, the caches or a captured tensor requiring grad), run on the gathered
            keys of each row (``attention(layout="thd")``).
        return_lse: also return the float32 log-sum-exp (B, Hq, Sq).
        backend: ``"auto"`` (the Triton kernel on CUDA where it serves the call, else the keys gathered
            per row and ``attention(layout="thd")`` on its own choice), ``"triton"`` (the decode kernel;
            no backward),
            ``"reference"`` (gathered keys, the oracle), or any other name of :func:`attnkit.backends`
            (gathered keys, that backend). A named backend that cannot serve the call raises
            ``UnsupportedError``.
        validate: True checks lengths and tables with one device sync and raises
            ``AttentionInputError`` for a negative length, a length past the cache, a row needing more
            pages than the table has, or a page index out of range in the pages a row uses. False (decode
            loops, CUDA graphs): no host sync on the ``"triton"`` path, and every index is clamped into the
            cache tensors, so a bad table gives wrong numbers but never reads or writes outside the cache.
            (The reference path reads the lengths on the host either way.)

    Returns:
        ``out`` (B, Sq, Hq, Dv) in q's dtype, and ``lse`` (B, Hq, Sq) float32 with ``return_lse``. A query
        row with no visible key gets 0 and -inf.
    """
    key = None
    if not torch.compiler.is_compiling():
        key = _plan_key(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, alibi_slopes,
            causal, window, softcap, scale, backend, validate, score_mod, mask,
        )  # fmt: skip
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _prepare(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, window, softcap,
            alibi_slopes, score_mod, mask, scale, backend, validate,
        )  # fmt: skip
        if key is not None and plan.decode_args is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    c = plan.c
    if c.B == 0 or c.Sq == 0:
        out = q.new_zeros(c.B, c.Sq, c.Hq, c.Dv)
        lse = q.new_full((c.B, c.Hq, c.Sq), float("-inf"), dtype=torch.float32)
        if k_new is not None and validate:
            _check_values(c, cache_seqlens, block_table)
        if k_new is not None:
            _append(c, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        return (out, lse) if return_lse else out
    lens = _check_values(c, cache_seqlens, block_table) if validate else None
    if plan.decode_args is not None:
        ops = _decode_ops()
        if k_new is None or c.nothing_to_append:
            pass
        elif torch.compiler.is_compiling():  # (torch ops trace; the append kernel is no custom op)
            _append(c, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        else:
            ops.append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)  # one launch
        args = (q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes)
        mod_args = _mod_args(score_mod, mask, q.device) if plan.mods else ()
        out, lse = ops.decode(*args, *plan.decode_args, *mod_args)
    else:
        if k_new is not None:
            _append(c, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        if lens is None:
            lens = cache_seqlens.tolist()
        out, lse = _gathered(c, q, k_cache, v_cache, block_table, lens, plan.flags, backend, return_lse)
    return (out, lse) if return_lse else out


_OPS: list = []


def _decode_ops():
    """``attnkit.backends.triton.ops.decode`` (imported on first use: it imports triton)."""
    if not _OPS:
        from attnkit.backends.triton.ops import decode

        _OPS.append(decode)
    return _OPS[0]


class _Prepared:
    """A validated call's host-side facts: its shapes ``c`` (:class:`_Cache`), the Triton decode's
    arguments after the tensors (None when another path serves the call), the flags for that path,
    ``mods``: whether the kernel inlines a compiled score_mod / mask (its tensors are the call's own:
    :func:`_mod_args` takes them at every call)."""

    __slots__ = ("c", "decode_args", "flags", "mods")

    def __init__(self, c, decode_args, flags, mods=False):
        self.c, self.decode_args, self.flags, self.mods = c, decode_args, flags, mods


def _mod_args(score_mod, mask, device) -> tuple:
    """The decode op's arguments after ``bhsd`` for this call's score_mod / mask: (splits, bhsd, the
    compiled mod's key, its captured tensors in slots, their strides/sizes table). Wrapped by attention()'s
    own rules (``_validate_programmable``), compiled through the compiler's memo (by structure: a decode
    loop with a mod traces once), the tensors read from this call's objects."""
    from attnkit.backends.triton.decode import kernel_mod, mod_args

    score_mod, mask, *_ = _validate_programmable(score_mod, mask, False, None, device)
    return (0, False, *mod_args(kernel_mod(score_mod, mask), device))


_PLANS: dict = {}  # call signature -> _Prepared, for calls the Triton kernel serves
_MAX_PLANS = 1024  # distinct signatures before the memo starts over


def _sig(t):
    """A tensor argument's part of the key: type, shape, strides, dtype, device, requires_grad (never its
    values)."""
    return None if t is None else (t.__class__, t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _mods_key(score_mod, mask):
    """The part of the plan key of a score_mod / mask: everything its validation and refusal read (and
    what the compiler's memo keys on): its structure (``dispatch._structure``: code objects, tensors' dtype,
    rank, device, requires_grad), the numbers and strings it holds (a sliding window's sizes become
    flags), its tensors' shapes. Tensor values never. None (no plan kept) for an object known only by its
    identity (a BlockMask, a callable instance), whose id a later object may reuse."""
    if score_mod is None and mask is None:
        return ()
    from attnkit.compiler import _leaves
    from attnkit.dispatch import _structure

    struct = (_structure(score_mod), _structure(mask))
    if _by_identity(struct):
        return None
    tensors: list = []
    values: list = []
    _leaves((score_mod, mask), tensors, values)
    shapes = tuple([(t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors])
    return (struct, tuple([(type(v), v) for v in values]), shapes, torch.is_grad_enabled())


def _by_identity(struct) -> bool:
    if isinstance(struct, tuple):
        if len(struct) == 3 and struct[0] == "object":
            return True
        return any(_by_identity(x) for x in struct)
    return False


def _plan_key(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, alibi_slopes, causal, window,
              softcap, scale, backend, validate, score_mod=None, mask=None):  # fmt: skip
    """Everything :func:`_prepare` reads, as a hashable key, or None (then the call takes the full path).
    Scalars go in with their types (``1 == True`` and ``(1.0, 2) == (1, 2)`` in a dict): a key equal to an
    earlier call's is a call that earlier validation accepted, with the same outcome. Only validated calls
    are stored, so a bad argument always reaches the checks."""
    try:
        win = None if window is None else (window.__class__, tuple(map(type, window)), window)
        mods = _mods_key(score_mod, mask)
        if mods is None:
            return None
        key = (
            _sig(q), _sig(k_cache), _sig(v_cache), _sig(cache_seqlens), _sig(k_new), _sig(v_new),
            _sig(block_table), _sig(alibi_slopes), win,
            causal.__class__, causal, softcap.__class__, softcap, scale.__class__, scale,
            backend.__class__, backend, validate.__class__, validate, torch.is_grad_enabled(), mods,
        )  # fmt: skip
        hash(key)
    except (AttributeError, TypeError):  # not a tensor, an unhashable flag: the full path says what is wrong
        return None
    return key


def _prepare(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, window, softcap,
             alibi_slopes, score_mod, mask, scale, backend, validate) -> _Prepared:  # fmt: skip
    """Every check that depends on shapes, dtypes, devices and flags only (not on tensor values), and what
    follows from them: raises AttentionInputError / UnsupportedError as :func:`attention_with_kvcache`
    documents."""
    c = _check_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    if not isinstance(backend, str):
        _fail("backend", f"one of {_BACKENDS} or an attention backend name", repr(backend))
    if backend not in _BACKENDS:
        from attnkit import dispatch

        dispatch.get(backend)  # an unknown name raises AttentionInputError listing the known ones
    if not isinstance(validate, bool):
        _fail("validate", "a bool", repr(validate))
    # the flags, validated by attention()'s own rules (a stand-in for the keys: their values are not read)
    call = normalize(
        q,
        _stand_in(k_cache, c.B, c.capacity, c.Hk, c.D),
        _stand_in(v_cache, c.B, c.capacity, c.Hk, c.Dv),
        layout="bshd",
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        score_mod=score_mod,
        mask=mask,
        scale=scale,
    )
    flags = dict(
        causal=call.causal,
        window=call.window,
        softcap=call.softcap,
        alibi_slopes=alibi_slopes,
        score_mod=score_mod,
        mask=mask if call.mask is not None else None,
        scale=call.scale,
    )
    reasons = _triton_reasons(call, q.device)
    if backend == "triton" and reasons:
        raise UnsupportedError("triton", reasons)
    if backend == "triton" or (backend == "auto" and not reasons and q.is_cuda):
        wl, wr = call.window if call.window is not None else (-1, -1)
        # (host values only: a kept plan holds no tensor of the call)
        mods = call.score_mod is not None or call.mask is not None
        return _Prepared(c, (c.Sq_new, call.scale, call.causal, wl, wr, call.softcap or 0.0), None, mods)
    return _Prepared(c, None, flags)


def _stand_in(t: torch.Tensor, B: int, S: int, H: int, D: int) -> torch.Tensor:
    """A (B, S, H, D) tensor of t's dtype and device whose values are never read (a broadcast view): the
    keys as attention() would see a cache that every row fills, so masks and mods are checked against Sq
    and the capacity S (S_max, or max_pages * page_size)."""
    base = t.new_zeros(1, 1, H, D) if t.numel() == 0 else t[:1, :1]
    return base.expand(B, S, H, D)


__all__ = ["attention_with_kvcache", "gather_rows"]
