"""Host side of the split-KV decode kernel (``kernels/decode.py``): grid, number of splits, combine.

``attnkit::decode_fwd`` is a ``torch.library`` custom op (fake implementation beside it; forward only:
decoding needs no gradient), so ``torch.compile`` traces through it. Eager calls take :func:`decode_fwd`
directly. Nothing here reads a device value: the grid and the number of splits come from shapes (the
cache capacity, never ``cache_seqlens``), so a decode step can be captured in a CUDA graph.

Tensor conventions: q (B, Sq, Hq, D); caches (B, S_max, Hk, D) or paged (num_pages, page_size, Hk, D),
unit stride on the head dim; ``cache_seqlens`` int32 (B,); ``block_table`` int32 (B, max_pages). Returns
out (B, Sq, Hq, Dv) in q's dtype and lse float32 (B, Hq, Sq). With ``bhsd``, q and the (contiguous) caches
are (B, H, S, D) and out (B, Hq, Sq, Dv).
"""

from __future__ import annotations

import os

import torch

from attnkit.backends.triton.ops import common as c
from attnkit.backends.triton.ops.combine import combine_plan, launch_combine
from attnkit.backends.triton.runtime import capability as _cap
from attnkit.backends.triton.runtime import launch as _launch

Tensor = torch.Tensor
POISON = False  # tests: fill outputs with NaN before launch, so unwritten elements show
MAX_SPLITS = 128
_KERNEL = None
_SMS: dict[int, int] = {}


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from attnkit.backends.triton.kernels.decode import decode_fwd as _jit

        _KERNEL = _launch.Launch(_jit)
    return _KERNEL


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 under the interpreter, so tests see several splits)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_TUNE: list = []
# the knobs' defaults, from the H200 sweeps of 2026-12-03 (docs/decoding.md, "Tuning")
TUNE_DEFAULTS = {"block_n": 0, "warps": 4, "stages": 3, "waves": 2, "page_tiles": 1, "tail": 1, "prefetch": 1,
                 "paged_rule": 2, "paged_wide": 2, "splits": 0, "small_pages": 1}  # fmt: skip


def parse_tune(text: str, source: str = "ATTNKIT_DECODE_TUNE") -> dict:
    """``"block_n=64,warps=4"`` as a dict of ints; an unknown knob or a value that is not an int raises
    ``ValueError`` naming ``source``, the knob and the knobs there are."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in TUNE_DEFAULTS:
            known = ", ".join(TUNE_DEFAULTS)
            raise ValueError(f"{source}: unknown decode knob {part.strip()!r}; knobs: {known}")
        try:
            out[key] = int(val)
        except ValueError:
            raise ValueError(f"{source}: {key} needs an int, got {val.strip()!r}") from None
    return out


def _tune() -> dict:
    """GPU tuning knobs: :data:`TUNE_DEFAULTS`, then ``ATTNKIT_DECODE_TUNE="block_n=64,warps=4"`` (any
    subset, read once), then :func:`set_tune`. ``block_n=0`` picks it (:func:`blocks`); ``page_tiles=0``
    reads a paged cache's table once per key even where a key tile lies on one page; ``tail=0`` masks every
    key tile; ``prefetch=0`` loads a paged cache's table entries in the step that reads their keys;
    ``paged_rule=0`` splits a paged cache by the contiguous rule (one wave), 1 takes the two-wave rule for
    caches on the table rule only, 2 also for small pages read several a tile (:func:`_two_wave`);
    ``paged_wide`` (:func:`page_tiled`): 1 plans a paged cache whose pages hold whole wide key tiles like a
    contiguous one, 2 also one whose wide tiles hold whole pages; ``splits=n`` splits every call that does
    not say (its ``num_splits`` 0) in n instead of by :func:`num_splits`; ``small_pages=0`` gives unsplit
    programs over small pages the usual key step and stages (:func:`_small_pages`)."""
    if not _TUNE:
        _TUNE.append(dict(TUNE_DEFAULTS, **parse_tune(os.environ.get("ATTNKIT_DECODE_TUNE", ""))))
    return _TUNE[0]


def set_tune(**knobs) -> dict:
    """Knobs for the decode calls that follow in this process (``attnkit bench decode --tune``), over the
    defaults and ``ATTNKIT_DECODE_TUNE``; ``set_tune()`` goes back to those. Plans made under other knobs
    are dropped. Returns the knobs now in force."""
    bad = set(knobs) - set(TUNE_DEFAULTS)
    if bad:
        raise ValueError(f"set_tune: unknown decode knob(s) {sorted(bad)}; knobs: {', '.join(TUNE_DEFAULTS)}")
    _TUNE.clear()
    cfg = dict(_tune(), **{k: int(v) for k, v in knobs.items()})
    _TUNE[:] = [cfg]
    _PLANS.clear()
    return dict(cfg)


def blocks(Sq: int, group: int, D: int, Dv: int, split: bool = True, paged: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a tile of the Sq * group packed rows, and keys per loop step: 128 where one
    program reads a whole contiguous row of a head (no split) with at most 16 packed rows and D <= 128 (H200:
    0.134 ms against 0.141 with 64 at B=16, 8k keys), else 64 (32 past D = 128)."""
    if _cap.interpreting():
        return 16, 16
    block_m = min(64, _pow2(Sq * group))
    block_n = _tune()["block_n"]
    if not block_n:
        wide = not split and not paged and block_m <= 16 and max(D, Dv) <= 128
        block_n = 128 if wide else (64 if max(D, Dv) <= 128 else 32)
    return block_m, block_n


def page_tiled(ps: int, Sq: int, group: int, D: int, Dv: int) -> bool:
    """Whether a paged cache of page size ``ps`` is planned like a contiguous one (split rule, wide key
    steps): its pages hold whole wide key tiles (``paged_wide >= 1``; H200 run J: pages of 256 at B=16 ran
    0.1334 / 0.4786 ms at 8k / 32k keys unsplit with 128-key steps, as contiguous, against 0.1419 / 0.4928
    split), or its wide tiles hold whole pages of at least 1/16 of a tile (``paged_wide >= 2``, the default:
    several table entries a tile, PAGED 3; pages of 64 at B=16 / B=64, 8k keys: 0.1351 / 0.4874 ms against
    0.1418 / 0.5819 on the table rule, contiguous 0.1327 / 0.4838)."""
    wide = blocks(Sq, group, D, Dv, split=False)[1]
    mode = _tune()["paged_wide"]
    return (mode >= 1 and ps % wide == 0) or (mode >= 2 and _holds_pages(wide, ps))


def _two_wave(table_rule: bool, ps: int, block_m: int, wide_n: int) -> bool:
    """Whether a paged cache takes the two-wave split rule (:func:`num_splits`' ``paged``): on the table
    rule (``paged_rule >= 1``), and where :func:`_many_pages` (``paged_rule >= 2``; ``wide_n``: an unsplit
    program's key tile; BLOCK_M >= 16: Sq * group >= 16).
    H200 run K, B=16, Sq=4, 32/8 heads, pages of 16: 0.1445 / 0.5023 ms at 8k / 32k keys (3 parts) against
    0.1553 / 0.5713 unsplit with ``paged_rule=1`` (contiguous 0.1329 / 0.4779); at Sq=1 (BLOCK_M 4) and
    with pages of 64 a split was no faster (2 parts: 0.1422 against 0.1395 at 8k)."""
    rule = _tune()["paged_rule"]
    if table_rule:
        return rule >= 1
    return rule >= 2 and _many_pages(ps, block_m, wide_n)


def _many_pages(ps: int, block_m: int, wide_n: int) -> bool:
    """8 or more pages of ``ps`` keys to a ``wide_n``-key tile, read by MMA tiles of packed rows (BLOCK_M >=
    16): where the page-tiled kernel (PAGED 3) wants other splits and steps than a contiguous cache."""
    return block_m >= 16 and ps * 8 <= wide_n


def _small_pages(ps: int, block_m: int, wide_n: int) -> bool:
    """Whether an unsplit program over pages of ``ps`` keys (several a tile) takes 64-key steps and 4 stages
    instead of ``wide_n``-key steps and the ``stages`` knob: where :func:`_many_pages`, on the GPU, with the
    ``block_n`` knob unset and ``small_pages=1``. H200 run K, B=64, Sq=4, 32/8 heads, pages of 16, two
    rounds: 0.5018 / 0.4993 ms at 8k keys and 1.936 / 1.942 at 32k against 0.5581 / 0.5591 and 2.142 / 2.144
    with 128-key steps and 3 stages (contiguous 0.4944 / 0.4949 and 1.906 / 1.903); contiguous caches ran no
    faster with it (0.5000)."""
    if _cap.interpreting() or _tune()["block_n"] or not _tune()["small_pages"]:
        return False
    return _many_pages(ps, block_m, wide_n)


def _holds_pages(block_n: int, ps: int) -> bool:
    """Whether a key tile of ``block_n`` holds whole pages of ``ps`` keys, at most 16 of them (PAGED 3)."""
    return block_n % ps == 0 and ps * 16 >= block_n


def num_splits(batch: int, hk: int, m_blocks: int, capacity: int, block_n: int, sms: int, waves: int = 2,
               paged: bool = False) -> int:  # fmt: skip
    """Splits of the key range so that the grid fills the GPU (FlashAttention's rule, simplified): none
    when the (batch, KV head, row tile) programs already fill ~one wave of the SMs (a contiguous cache) or
    ~``waves`` waves (a paged one, whose table loads want more programs in flight: B=16 8k on the H200 ran
    0.246 ms unsplit against 0.141 split in 3); otherwise enough to reach ``waves`` waves, keeping at
    least 4 key blocks a split, at most MAX_SPLITS. Host values only."""
    work = batch * hk * m_blocks
    if work * 10 >= (waves if paged else 1) * sms * 8:
        return 1
    n_blocks = _cdiv(capacity, block_n)
    return max(1, min(_cdiv(waves * sms, work), n_blocks // 4, MAX_SPLITS))


def _new(shape, device, dtype) -> Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    if POISON:
        t.fill_(float("nan"))
    return t


class _Plan:
    """Everything a call's launches take but its tensors, derived once per call signature (shapes, strides,
    dtypes, device, scalars) by :func:`_make_plan`: output and workspace shapes, grid, split count, the
    kernels' scalar arguments and constexprs, the combine's launch. ``empty``: 0 = launch, 1 = no output
    element (return the empty outputs), 2 = no key anywhere (zeros and -inf)."""

    __slots__ = ("out_shape", "lse_shape", "part_shape", "part_lse_shape", "empty", "grid", "scalars",
                 "consts", "combine", "paged", "alibi")  # fmt: skip


_PLANS: dict = {}
_MAX_PLANS = 1024  # distinct call signatures before the memo starts over


def _tensor_sig(t: Tensor | None):
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _plan_key(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scalars: tuple) -> tuple:
    """What a plan depends on: each tensor's shape, strides and dtype, q's device, the scalar arguments
    (with their types: ``1`` and ``True`` hash alike). Tensor addresses are not in it (the launcher's own
    key has their alignment)."""
    return (
        q.shape,
        q.stride(),
        q.dtype,
        q.device,
        _tensor_sig(k_cache),
        _tensor_sig(v_cache),
        _tensor_sig(cache_seqlens),
        _tensor_sig(block_table),
        _tensor_sig(alibi_slopes),
        scalars,
        tuple(map(type, scalars)),
    )


def _unit_inner(t: Tensor | None) -> bool:
    return t is None or t.stride(-1) == 1 or t.shape[-1] <= 1


def _make_plan(q, k_cache, v_cache, full, block_table, alibi_slopes, sq_new, scale, causal, window_left,
               window_right, softcap, splits, bhsd) -> _Plan:  # fmt: skip
    """The launch parameters of :func:`decode_fwd` for tensors of these shapes and strides (host values
    only: nothing here reads a tensor's values)."""
    if bhsd:  # (B, H, S, D) tensors, read as (B, S, H, D) through their strides
        q, k_cache, v_cache = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    B, Sq, Hq, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hk
    paged = block_table is not None
    p = _Plan()
    p.paged, p.alibi = paged, alibi_slopes is not None
    if paged:
        num_pages, ps = k_cache.shape[0], k_cache.shape[1]
        cap = block_table.shape[1] * ps
    else:
        num_pages, ps = 1, 1
        cap = k_cache.shape[1]
    p.out_shape = (B, Hq, Sq, Dv) if bhsd else (B, Sq, Hq, Dv)
    p.lse_shape = (B, Hq, Sq)
    p.part_shape = p.part_lse_shape = p.grid = p.scalars = p.consts = p.combine = None
    p.empty = 1 if B * Sq * Hq == 0 else (2 if cap == 0 or num_pages == 0 else 0)
    if p.empty:
        return p

    # a paged cache whose pages and wide key tiles nest is planned as a contiguous one
    table_rule = paged and not page_tiled(ps, Sq, group, D, Dv)
    block_m, block_n = blocks(Sq, group, D, Dv, paged=table_rule)
    m_blocks = _cdiv(Sq * group, block_m)
    dev = q.device
    if splits <= 0:
        splits = _tune()["splits"]
    wide_n = blocks(Sq, group, D, Dv, split=False)[1]
    if splits <= 0:
        waves = 2 if _cap.interpreting() else _tune()["waves"]
        two_wave = paged and _two_wave(table_rule, ps, block_m, wide_n)
        splits = num_splits(B, Hk, m_blocks, cap, block_n, sm_count(dev), waves, two_wave)
    stages = 2 if _cap.interpreting() else _tune()["stages"]
    if splits == 1:  # one program reads the whole row: maybe a wider key step
        block_m, block_n = blocks(Sq, group, D, Dv, split=False, paged=table_rule)
        if paged and not table_rule and _small_pages(ps, block_m, wide_n):
            block_n, stages = 64, 4
    chunk = _cdiv(_cdiv(cap, splits), block_n) * block_n
    splits = _cdiv(cap, chunk)
    # the views the launches take, on meta tensors: their strides are those of every later call's
    meta = torch.device("meta")
    out_base = torch.empty(p.out_shape, device=meta, dtype=q.dtype)
    out = out_base.transpose(1, 2) if bhsd else out_base  # (B, Sq, Hq, Dv)
    lse = torch.empty(p.lse_shape, device=meta, dtype=torch.float32)
    if splits == 1:
        part, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        p.part_shape, p.part_lse_shape = (splits, B, Sq, Hq, Dv), (splits, B, Hq, Sq)
        part = torch.empty(p.part_shape, device=meta, dtype=torch.float32)
        part_lse = torch.empty(p.part_lse_shape, device=meta, dtype=torch.float32)
        # partials (P, B, Sq, Hq, Dv) -> rows (b, h, i)
        p.combine = combine_plan(part.transpose(2, 3), part_lse, out.transpose(1, 2), lse)
    table_stride = block_table.stride(0) if paged else 1
    stride_ab = 0 if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes.stride(0)
    p.grid = (splits, B * Hk, m_blocks)
    p.scalars = (
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        table_stride,
        stride_ab,
        *part.stride()[:4],
        *part_lse.stride(),
        Hk,
        Sq,
        int(sq_new),
        cap,
        ps,
        num_pages,
        chunk,
        float(scale),
        float(softcap or 1.0),
        max(window_left, 0),
        0 if causal else max(window_right, 0),
    )
    mode = _paged_mode(ps, block_n) if paged else 0
    p.consts = dict(
        GROUP=group,
        D=D,
        DV=Dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_pow2(D),
        BLOCK_DV=_pow2(Dv),
        PAGED=mode,
        PS=ps if mode == 3 else 1,
        HAS_LEFT=window_left >= 0,
        HAS_RIGHT=causal or window_right >= 0,
        SOFTCAP=bool(softcap),
        HAS_ALIBI=alibi_slopes is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FULL=full,
        TAIL=bool(_tune()["tail"]),
        PREFETCH=bool(_tune()["prefetch"]) and paged,
        num_warps=4 if _cap.interpreting() else _tune()["warps"],
        num_stages=stages,
    )
    return p


def _paged_mode(ps: int, block_n: int) -> int:
    """The kernel's PAGED for pages of ``ps`` keys read in tiles of ``block_n``: 2 (one table entry a tile)
    where the page holds whole tiles, 3 (``block_n // ps`` entries a tile) where a planned wide tile holds
    whole pages (:func:`page_tiled`), else 1 (an entry a key)."""
    if not _tune()["page_tiles"]:
        return 1
    if ps % block_n == 0:
        return 2
    if _tune()["paged_wide"] >= 2 and _holds_pages(block_n, ps):
        return 3
    return 1


def decode_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    sq_new: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    splits: int = 0,
    bhsd: bool = False,
    score_mod: str = "",
    smod_c0: Tensor | None = None,
    smod_c1: Tensor | None = None,
    smod_c2: Tensor | None = None,
    smod_c3: Tensor | None = None,
    smod_meta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of q against the first ``cache_seqlens[b] + sq_new`` keys of each row (see the module
    docstring for shapes), or, with ``cache_seqlens=None``, against all the cache capacity holds (every row
    full: no lengths tensor to build). ``splits``: 0 picks :func:`num_splits`; tests force other values.

    Host work of a repeated call signature: one plan lookup, one ``torch.empty`` each for out and lse (and,
    with several splits, for the partial outputs and lses), one or two launches; no torch op besides."""
    scalars = (sq_new, scale, causal, window_left, window_right, softcap, splits, bhsd)
    smod = (score_mod, smod_c0, smod_c1, smod_c2, smod_c3, smod_meta)
    key = _plan_key(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scalars + (score_mod,))
    p = _PLANS.get(key)
    if p is None:
        if not (_unit_inner(q) and _unit_inner(k_cache) and _unit_inner(v_cache)):
            # the kernel reads the head dim with unit stride: copy, then the plan of the copies
            q, k_cache, v_cache = (t if _unit_inner(t) else t.contiguous() for t in (q, k_cache, v_cache))
            return decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, *scalars, *smod)
        if not all(t is None or t.is_contiguous() for t in (cache_seqlens, block_table, alibi_slopes)):
            cache_seqlens, block_table, alibi_slopes = (
                None if t is None else t.contiguous() for t in (cache_seqlens, block_table, alibi_slopes)
            )
            return decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, *scalars, *smod)
        p = _make_plan(q, k_cache, v_cache, cache_seqlens is None, block_table, alibi_slopes, *scalars)
        if p.consts is not None:
            p.consts.update(HAS_SCORE_MOD=bool(score_mod), SCORE_MOD=_score_mod_fn(score_mod))
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = p
    dev = q.device
    out = _new(p.out_shape, dev, q.dtype)
    lse = _new(p.lse_shape, dev, torch.float32)
    if p.empty:
        if p.empty == 2:
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    if p.combine is None:
        part, part_lse = out, lse  # one split writes the outputs (their addresses; strides are the plan's)
    else:
        part = _new(p.part_shape, dev, torch.float32)
        part_lse = _new(p.part_lse_shape, dev, torch.float32)
    seqlens = lse if cache_seqlens is None else cache_seqlens  # (unread with FULL)
    table = block_table if p.paged else seqlens
    slopes = alibi_slopes if p.alibi else lse
    sm = tuple([lse if t is None else t for t in (smod_c0, smod_c1, smod_c2, smod_c3, smod_meta)])
    args = (q, k_cache, v_cache, seqlens, table, slopes, *sm, part, part_lse)
    fn = p.consts["SCORE_MOD"]
    if fn is None:
        _kernel()[p.grid](*args, *p.scalars, **p.consts)
    else:
        with c.jit_hooks_off(fn):
            _kernel()[p.grid](*args, *p.scalars, **p.consts)
    if p.combine is not None:
        launch_combine(p.combine, part, part_lse, out, lse)
    return out, lse


def _score_mod_fn(key: str):
    """The ``@triton.jit`` function of the compiled score mod ``key`` (``attnkit.compiler``), or None."""
    if not key:
        return None
    from attnkit import compiler

    return compiler.REGISTRY[key].score_mod


_APPEND = None
_APPEND_PLANS: dict = {}


def append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table) -> None:
    """Write ``k_new`` / ``v_new`` (B, Sq_new, Hk, D|Dv) into the cache at logical positions
    ``cache_seqlens[b] + t``, in place, in one launch (``kernels/append.py``; indices clamped into the
    cache as the decode kernel clamps them). Shapes as :func:`decode_fwd`; the caller has checked that
    B, Sq_new, the capacity and the pool are not empty. No host sync; launch parameters cached per shape."""
    global _APPEND
    key = (
        _tensor_sig(k_cache),
        _tensor_sig(v_cache),
        _tensor_sig(k_new),
        _tensor_sig(v_new),
        _tensor_sig(cache_seqlens),
        _tensor_sig(block_table),
        k_cache.device,
    )
    p = _APPEND_PLANS.get(key)
    if p is None:
        if not all(t is None or t.is_contiguous() for t in (k_new, v_new, cache_seqlens, block_table)):
            k_new, v_new, cache_seqlens = k_new.contiguous(), v_new.contiguous(), cache_seqlens.contiguous()
            block_table = None if block_table is None else block_table.contiguous()
            return append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        if not (_unit_inner(k_cache) and _unit_inner(v_cache)):  # (an in-place write needs the caches)
            raise ValueError("append: the caches' head dim must have unit stride")
        B, Sn, Hk, D = k_new.shape
        Dv = v_new.shape[3]
        paged = block_table is not None
        if paged:
            num_pages, ps, cap = k_cache.shape[0], k_cache.shape[1], block_table.shape[1] * k_cache.shape[1]
        else:
            num_pages, ps, cap = 1, 1, k_cache.shape[1]
        block_t = min(16, _pow2(Sn, 2))
        p = (
            (B, _cdiv(Sn, block_t), Hk),
            (
                *k_new.stride()[:3],
                *v_new.stride()[:3],
                *k_cache.stride()[:3],
                *v_cache.stride()[:3],
                block_table.stride(0) if paged else 1,
                Sn,
                cap,
                ps,
                num_pages,
            ),
            dict(D=D, DV=Dv, BLOCK_T=block_t, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), PAGED=paged, num_warps=4),
        )
        if len(_APPEND_PLANS) >= _MAX_PLANS:
            _APPEND_PLANS.clear()
        _APPEND_PLANS[key] = p
    if _APPEND is None:
        from attnkit.backends.triton.kernels.append import append_kv

        _APPEND = _launch.Launch(append_kv)
    grid, scalars, consts = p
    table = cache_seqlens if block_table is None else block_table
    _APPEND[grid](k_new, v_new, k_cache, v_cache, cache_seqlens, table, *scalars, **consts)


_op = torch.library.custom_op("attnkit::decode_fwd", mutates_args=())(decode_fwd)


@_op.register_fake
def _(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    block_table,
    alibi_slopes,
    sq_new,
    scale,
    causal,
    window_left,
    window_right,
    softcap,
    splits=0,
    bhsd=False,
    score_mod="",
    smod_c0=None,
    smod_c1=None,
    smod_c2=None,
    smod_c3=None,
    smod_meta=None,
):
    B, Sq, Hq, _ = q.transpose(1, 2).shape if bhsd else q.shape
    Dv = v_cache.shape[3]
    shape = (B, Hq, Sq, Dv) if bhsd else (B, Sq, Hq, Dv)
    return q.new_empty(shape), q.new_empty((B, Hq, Sq), dtype=torch.float32)


def decode(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """:func:`decode_fwd` eagerly, the custom op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _op(*args, **kwargs)
    return decode_fwd(*args, **kwargs)
