"""The fast launch path (``backends/triton/runtime/launch.py``) must launch exactly the kernel Triton's own
path would: same specialization of every argument, same constexprs, every argument passed through.

Runs on the CPU: a stand-in JIT function "compiles" one kernel per distinct specialization, computed by
Triton's own ``native_specialize_impl`` (the rule the real launch path applies), and records which kernel
each launch ran and with what arguments. Random call sequences then mix integers that are and are not 1
or multiples of 16, 32- and 64-bit values, ints passed where floats were, aligned and misaligned tensors
of several dtypes, and changing constexprs. Gluon kernels take host TMA descriptors: their specialization
(dtype, block shape, shared-memory layout) is checked the same way, and :func:`_gluon_fwd.tma_rows` (which
decides whether a tensor can be walked by one) against ``torch.Tensor.view``, the rule it spells out.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

from attnkit.backends.triton.runtime import launch as _launch  # noqa: E402


class Param:
    def __init__(self, name, constexpr=False, dns=False):
        self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, dns


class Kernel:
    def __init__(self, key):
        self.key, self.function, self.packed_metadata, self.launches = key, object(), object(), []

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        assert function is self.function and packed is self.packed_metadata
        self.launches.append(((g0, g1, g2), stream, args))


class FakeJit:
    """Triton's ``fn[grid](*args, **kwargs)`` contract: specialize, look up or compile, launch."""

    def __init__(self, params=None):
        self.params = params or [
            Param("X"),
            Param("Y"),
            Param("n"),
            Param("stride"),
            Param("scale"),
            Param("SQ", dns=True),
            Param("BLOCK", constexpr=True),
            Param("FLAG", constexpr=True),
        ]
        self.arg_names = [p.name for p in self.params]
        self.device_caches = {}
        self.kernels: dict = {}
        self.slow = 0  # launches through this (Triton's) path

    def spec(self, args, kwargs):
        sig = tuple(
            native_specialize_impl(CUDABackend, a, False, not p.do_not_specialize, True)
            for a, p in zip(args, self.params)
        )
        return sig, tuple(sorted(kwargs.items()))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow += 1
            key = self.spec(args, kwargs)
            kernel = self.kernels.setdefault(key, Kernel(key))
            tail = tuple(kwargs[p.name] for p in self.params[len(args) :])
            g = (tuple(grid) + (1, 1))[:3]
            kernel.run(*g, "current", kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
            return kernel

        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    class Stream:
        cuda_stream = "current"

    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_current_stream", lambda dev: Stream.cuda_stream)


INTS = st.sampled_from([0, 1, 2, 16, 17, 32, 48, -16, 2**31 - 16, 2**31, 2**40])
# constexprs as the attention kernels take them: a bool, or a named tuple of flags holding a function (the
# compiled score mod) or None, as kernels/common.Features; two functions of one body are two kernels
_Flags = namedtuple("_Flags", "ON FN")


def _mod_a(x):
    return x


def _mod_b(x):
    return x


FLAGS = st.one_of(st.booleans(), st.builds(_Flags, st.booleans(), st.sampled_from([None, _mod_a, _mod_b])))
SCALARS = st.one_of(INTS, st.sampled_from([0.5, 1.0, 16.0]))


@st.composite
def calls(draw):
    base = torch.zeros(64, dtype=torch.float32)
    half = torch.zeros(64, dtype=torch.float16)

    def tensor():
        t = draw(st.sampled_from([base, half]))
        return t[draw(st.sampled_from([0, 1, 4])) :]  # 0 and 4 (fp32) or 0 (fp16) are 16-byte aligned

    args = (tensor(), tensor(), draw(INTS), draw(INTS), draw(SCALARS), draw(INTS))
    kwargs = {"BLOCK": draw(st.sampled_from([16, 32])), "FLAG": draw(FLAGS), "num_warps": 4}
    grid = (draw(st.integers(1, 9)), draw(st.integers(1, 3)))
    return grid, args, kwargs


@settings(max_examples=300)  # cheap (no kernels): enough sequences to meet every collision
@given(st.lists(calls(), min_size=1, max_size=30))
def test_fast_path_launches_the_kernel_triton_would(fake_cuda, seq):
    fn = FakeJit()
    fast = _launch.Launch(fn)
    assert fast.fast
    for grid, args, kwargs in seq:
        expect = fn.spec(args, kwargs)
        kernel = fast[grid](*args, **kwargs)
        assert kernel.key == expect, (args, kwargs)
        g, stream, passed = kernel.launches[-1]
        assert g == (grid[0], grid[1], 1) and stream == "current"
        assert passed[: len(args)] == args and passed[len(args) :] == (kwargs["BLOCK"], kwargs["FLAG"])
    # Triton's path ran once per distinct key; every repeat took the fast path
    assert fn.slow == len(fast._memo) <= len(seq)


def _kernels():
    """The plain-Triton kernels (compiled or interpreted: both keep the decorator's arguments)."""
    from attnkit.backends.triton.kernels import bwd, bwd_dq, fwd, ivlists, tiles

    fns = (fwd.attn_fwd, fwd.dropout_mask_kernel, bwd.bwd_preprocess, bwd.attn_bwd_dkdv, bwd_dq.attn_bwd_dq,
           tiles.tile_states, ivlists.iv_lists)  # fmt: skip
    return {getattr(f, "__name__", None) or f.fn.__name__: f for f in fns}


def _real_params(jit) -> list:
    """A real kernel's parameters as ``Param``s: names, constexpr-ness and ``do_not_specialize``."""
    if hasattr(jit, "params"):
        return [Param(p.name, p.is_constexpr, p.do_not_specialize) for p in jit.params]
    import inspect

    dns = set(jit.kwargs.get("do_not_specialize") or ())  # (the interpreter keeps the decorator's kwargs)
    sig = inspect.signature(jit.fn)
    return [Param(n, "constexpr" in str(p.annotation), n in dns) for n, p in sig.parameters.items()]


# Lengths, and the strides that are multiples of a length (lse and delta rows: (B, Hq, Sq) float32), change
# with every new sequence length: Triton must not specialize on them (a recompile per divisibility class).
# Pointers, row strides and the batch/head strides of q/k/v/out/dO stay specialized: Triton's alignment
# analysis needs them for vectorized tile loads (with D a multiple of 16 they never change class with S).
_LENGTHS = {"SQ", "SK", "rows", "cols", "stride_lb", "stride_lh", "stride_db", "stride_dh"}
_LENGTHS |= {"stride_ib", "stride_ih", "stride_sb", "stride_sh"}  # mask intervals (B', H', Sk, 4) and summary
_LENGTHS |= {"stride_tb", "stride_th", "ts_cols", "n_m", "n_n"}  # tile states (B', H', Sq / BM, Sk / BN)
_LENGTHS |= {"ivl_b", "ivl_h", "ivl_n"}  # tile lists (B', H', Sq / BM, 2, Sk / BN)
_LENGTHS |= {"smg_stride", "smg_copies"}  # copies of the captured tensors' gradients (n entries each)
_RUNTIME_ONLY = _LENGTHS | {"win_left", "win_right", "bh", "r0"}


@pytest.mark.parametrize("name", list(_kernels()))
def test_real_kernels_do_not_specialize_on_lengths(name):
    params = _real_params(_kernels()[name])
    names = {p.name for p in params}
    dns = {p.name for p in params if p.do_not_specialize}
    assert _LENGTHS & names <= dns, f"{name}: specialized on {sorted((_LENGTHS & names) - dns)}"
    assert dns <= _RUNTIME_ONLY, f"{name}: alignment matters for {sorted(dns - _RUNTIME_ONLY)}"


_INT_NAMES = {"SQ", "SK", "Hq", "Hk"}
_FLOAT_NAMES = {"sm_scale", "softcap", "dropout_p"}


@st.composite
def real_calls(draw, params):
    base = torch.zeros(64, dtype=torch.float32)
    args = []
    for p in params:
        if p.is_constexpr:
            break
        if p.name in _FLOAT_NAMES:
            args.append(draw(SCALARS))
        elif p.name[0].isupper() and p.name not in _INT_NAMES:
            args.append(base[draw(st.sampled_from([0, 1, 4])) :])
        else:
            args.append(draw(INTS))
    kwargs = {p.name: draw(st.sampled_from([16, 32])) for p in params if p.is_constexpr}
    return (draw(st.integers(1, 4)), 1), tuple(args), kwargs


@pytest.mark.parametrize("name", list(_kernels()))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fast_path_keys_the_real_kernels_as_triton_does(fake_cuda, name, data):
    """The real kernels' parameter lists (their ``do_not_specialize`` included) through :class:`Launch`:
    the kernel launched is the one Triton's specialization names, and new lengths launch no new kernel."""
    fn = FakeJit(_real_params(_kernels()[name]))
    fast = _launch.Launch(fn)
    seq = data.draw(st.lists(real_calls(fn.params), min_size=1, max_size=12))
    for grid, args, kwargs in seq:
        assert fast[grid](*args, **kwargs).key == fn.spec(args, kwargs)
    assert fn.slow == len(fast._memo)
    grid, args, kwargs = seq[0]
    kernels = None
    for value in (100, 7, 1, 16, 4096, 2**31 - 1):  # every length-like argument at new 32-bit values
        new = tuple(value if p.name in _LENGTHS else a for p, a in zip(fn.params, args))
        assert fast[grid](*new, **kwargs).key == fn.spec(new, kwargs)
        kernels = kernels or len(fn.kernels)
    assert len(fn.kernels) == kernels, "a new sequence length made Triton specialize a new kernel"


def test_fast_path_is_taken_and_honours_the_stream(fake_cuda):
    fn = FakeJit()
    fast = _launch.Launch(fn)
    x = torch.zeros(8)
    args = (x, x, 4, 16, 0.5, 100)
    kw = {"BLOCK": 16, "FLAG": True, "num_warps": 4}
    first = fast[(2,)](*args, **kw)
    again = fast[(3,)](*args, stream="side", **kw)
    assert fn.slow == 1 and again is first and first.launches[-1][:2] == ((3, 1, 1), "side")
    assert fast[(3,)](x, x, 4, 16, 0.5, 200, **kw) is first and fn.slow == 1  # SQ is not specialized
    other = fast[(3,)](x, x, 4, 16, 0.5, 2**33, **kw)  # but a 64-bit SQ is another kernel
    assert other is not first and fn.slow == 2


@pytest.fixture(scope="module")
def gluon_fwd():
    return pytest.importorskip("attnkit.backends.triton.ops.gluon_fwd")


@settings(max_examples=60)
@given(st.data())
def test_fast_path_with_tma_descriptors_launches_the_kernel_triton_would(fake_cuda, gluon_fwd, data):
    """Descriptors of changing dtype, box rows, shape and strides: the kernel is Triton's choice (dtype, box
    and layout), a new shape or stride alone never recompiles, and every descriptor is passed through."""
    fn = FakeJit([Param("QD"), Param("KD"), Param("O"), Param("n"), Param("BLOCK", constexpr=True)])
    fast = _launch.Launch(fn)
    bufs = {dt: torch.zeros(4096, 128, dtype=dt) for dt in (torch.float16, torch.bfloat16)}
    for _ in range(data.draw(st.integers(1, 12))):
        dt = data.draw(st.sampled_from(list(bufs)))
        rows = data.draw(st.sampled_from([64, 128, 1000, 4096]))
        descs = [
            gluon_fwd.descriptor(bufs[dt].view(1, 1, 4096, 128)[:, :, :rows], (rows, 128, 128), box)
            for box in (data.draw(st.sampled_from([64, 128])), data.draw(st.sampled_from([64, 128])))
        ]
        args = (*descs, bufs[dt], data.draw(INTS))
        kwargs = {"BLOCK": 16, "num_warps": 4}
        kernel = fast[(1,)](*args, **kwargs)
        assert kernel.key == fn.spec(args, kwargs)
        passed = kernel.launches[-1][2]
        assert passed[0] is descs[0] and passed[1] is descs[1] and passed[2] is bufs[dt]
    assert fn.slow == len(fast._memo)


def _view_rows(t, layout):
    """The rule :func:`tma_rows` spells out, by trying the view (the code before it did this per call)."""
    B, d1, d2, D = t.shape
    try:
        flat = t.view(B * d1 * d2, D) if layout == "bhsd" else t.view(B * d1, d2 * D)
    except RuntimeError:
        return None
    if flat.stride(1) != 1 and flat.shape[1] != 1:
        return None
    stride = flat.stride(0) if flat.shape[0] > 1 else flat.shape[1]
    if t.data_ptr() % 16 or (stride * t.element_size()) % 16:
        return None
    return flat.shape[0], flat.shape[1], stride


@settings(max_examples=300)
@given(st.data())
def test_tma_rows_follows_view(gluon_fwd, data):
    """Permuted, sliced, padded and size-1 dims, both layouts: (rows, cols, row stride) or None exactly as
    viewing the tensor as 2D rows (and TMA's 16-byte rules) would give."""
    shape = [data.draw(st.sampled_from([1, 2, 3, 8])) for _ in range(3)] + [
        data.draw(st.sampled_from([8, 64]))
    ]
    pad = [data.draw(st.sampled_from([0, 0, 1, 8])) for _ in range(4)]
    base = torch.zeros([n + p for n, p in zip(shape, pad)], dtype=torch.float16)
    t = base[tuple(slice(data.draw(st.sampled_from([0, p])), None) if p else slice(None) for p in pad)]
    t = t[tuple(slice(0, n) for n in shape)]
    perm = data.draw(st.permutations(range(4)))
    t = t.permute(*perm) if data.draw(st.booleans()) else t
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]))
    assert gluon_fwd.tma_rows(t, layout) == _view_rows(t, layout), (tuple(t.shape), t.stride(), layout)


def test_launch_hooks_take_tritons_path_and_spoil_recordings(fake_cuda, monkeypatch):
    """With a launch hook set (a profiler), every launch goes through Triton's path, which calls the hook,
    and no recording made meanwhile is replayable."""
    from triton import knobs

    fn = FakeJit()
    fast = _launch.Launch(fn)
    x = torch.zeros(8)
    args, kw = (x, x, 4, 16, 0.5, 100), {"BLOCK": 16, "FLAG": True, "num_warps": 4}
    fast[(1,)](*args, **kw)
    fast[(1,)](*args, **kw)
    assert fn.slow == 1 and not _launch.hooked()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    assert _launch.hooked()
    with _launch.Recording() as rec:
        fast[(1,)](*args, **kw)
    assert fn.slow == 2 and not rec.replayable


def test_interpreted_functions_take_tritons_path():
    class NotJit:
        def __getitem__(self, grid):
            return lambda *a, **k: ("ran", grid, a, k)

    assert _launch.Launch(NotJit())[(1,)](1, X=2) == ("ran", (1,), (1,), {"X": 2})


@pytest.mark.cuda
@pytest.mark.parametrize("D, S", [(64, 200), (128, 256)])  # on Hopper: Triton or Gluon forward, Gluon dK/dV
def test_fast_path_on_the_gpu_gives_tritons_bits(D, S, monkeypatch):
    """The real kernels through both paths: same bits, and every kernel that ran hits the memo."""
    import attnkit
    from attnkit.backends.triton.ops import attention as ops
    from attnkit.backends.triton.ops import gluon_bwd as _gluon_bwd
    from attnkit.backends.triton.ops import gluon_fwd as _gluon_fwd

    monkeypatch.setattr(ops, "REPLAY", False)  # every call through the Launch objects
    kernels = {
        "attn_fwd": ops.attn_fwd,
        "bwd_preprocess": ops.bwd_preprocess,
        "attn_bwd_dkdv": ops.attn_bwd_dkdv,
        "attn_bwd_dq": ops.attn_bwd_dq,
        "gluon fwd": _gluon_fwd._FWD_LAUNCH,
        "gluon dkdv": _gluon_bwd._DKDV_LAUNCH,
    }
    q, k, v = (torch.randn(2, 3, S, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in "qkv")
    do = torch.randn_like(q)

    def run():
        out = attnkit.attention(q, k, v, causal=True, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    ran = set()
    try:
        for name, kernel in kernels.items():
            kernel.fast = False
            kernel._memo.clear()
            kernel._slow = lambda *a, _real=kernel._slow, _name=name: (ran.add(_name), _real(*a))[1]
        slow = run()
    finally:
        for kernel in kernels.values():
            kernel.fast = True
            del kernel._slow  # the class's method again
    run()
    fast = run()
    assert {"bwd_preprocess", "attn_bwd_dq"} <= ran and ran & {"attn_fwd", "gluon fwd"}, ran
    assert all(kernels[name]._memo for name in ran), ran
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)


def test_recorded_launches_replay_on_new_tensors(fake_cuda):
    """A recorded call's launches, replayed on other tensors, are exactly the launches the call itself
    would make on them; launches that cannot be replayed (Triton's own path, a side stream, a tensor made
    inside the call, one tensor in two places) give no replay."""
    fn = FakeJit()
    fast = _launch.Launch(fn)
    kw = {"BLOCK": 16, "FLAG": True, "num_warps": 4}

    def body(x, y, made_inside=False, stream=None):
        z = torch.zeros(4) if made_inside else y
        fast[(2, 3)](x, z, 4, 16, 0.5, 100, stream=stream, **kw)
        fast[(5,)](y, x, 7, 32, 1.5, 3, **kw)

    x, y = torch.zeros(8), torch.zeros(8)
    with _launch.Recording() as rec:  # the first call compiles: Triton's path
        body(x, y)
    assert not rec.replayable
    with _launch.Recording() as rec:
        body(x, y)
    assert rec.replayable and len(rec.log) == 2
    replay = _launch.Replay.build(rec.log, [x, y])
    x2, y2 = torch.zeros(8), torch.zeros(8)
    kernels = list(fn.kernels.values())
    marks = [len(kn.launches) for kn in kernels]
    replay([x2, y2])
    replayed = [kn.launches[m:] for kn, m in zip(kernels, marks)]
    marks = [len(kn.launches) for kn in kernels]
    body(x2, y2)
    direct = [kn.launches[m:] for kn, m in zip(kernels, marks)]
    assert replayed == direct and sum(map(len, replayed)) == 2
    assert replayed[0][0][2][0] is x2 and replayed[0][0][2][1] is y2  # the new tensors, not the old
    for kwargs in ({"made_inside": True}, {"stream": "side"}):
        with _launch.Recording() as rec:
            body(x, y, **kwargs)
        assert rec.replayable and _launch.Replay.build(rec.log, [x, y]) is None, kwargs
    # one object in two places of the list (the caller's key guarantees the replays' are one too)
    with _launch.Recording() as rec:
        body(x, x)
    marks = [len(kn.launches) for kn in kernels]
    _launch.Replay.build(rec.log, [x, x])([x2, x2])
    assert [kn.launches[m:] for kn, m in zip(kernels, marks)][0][0][2][:2] == (x2, x2)


REPLAY_CASES = [  # (layout, B, Hq, Hk, Sq, Sk, D, causal, window, dropout_p, dtype, use_lse, strided)
    ("bhsd", 2, 4, 2, 200, 256, 128, True, None, 0.0, torch.bfloat16, False, False),  # Gluon fwd + dK/dV
    ("bshd", 2, 4, 4, 256, 256, 128, False, None, 0.0, torch.float16, True, True),  # lse used, q a view
    ("bhsd", 1, 6, 1, 130, 70, 64, True, None, 0.0, torch.float16, False, False),  # MQA, Triton forward
    ("bshd", 2, 4, 2, 96, 160, 64, False, (32, 8), 0.2, torch.bfloat16, True, False),  # window + dropout
    ("thd", 3, 4, 2, None, None, 64, True, None, 0.0, torch.float16, False, False),  # packed, ragged
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", REPLAY_CASES, ids=lambda c: f"{c[0]}-D{c[6]}-p{c[9]}-lse{c[11]}")
def test_replayed_calls_give_the_full_paths_bits(case):
    """ops' replays (a repeated call's launches without the host work) against the full path, forward and
    backward, bit for bit, on fresh inputs each call; and the replays did run."""
    import attnkit
    from attnkit.backends.triton.ops import attention as ops

    layout, B, Hq, Hk, Sq, Sk, D, causal, window, p, dtype, use_lse, strided = case
    kw = dict(layout=layout, causal=causal, window=window, dropout_p=p, return_lse=True, backend="triton")

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        if layout == "thd":
            lens = [37, 0, 91]
            cu = torch.tensor([0, 37, 37, 128], device="cuda", dtype=torch.int32)
            shapes = [(128, Hq, D), (128, Hk, D), (128, Hk, D)]
            kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
        elif layout == "bhsd":
            shapes = [(B, Hq, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, D)]
        else:
            shapes = [(B, Sq, Hq, D), (B, Sk, Hk, D), (B, Sk, Hk, D)]
        qkv = [torch.randn(s, device="cuda", dtype=dtype, generator=g) for s in shapes]
        if strided:  # q as a slice of a wider buffer: row stride != Hq * D
            wide = torch.randn(*shapes[0][:-2], Hq + 2, D, device="cuda", dtype=dtype, generator=g)
            qkv[0] = wide[..., :Hq, :].copy_(qkv[0])
        return [t.requires_grad_() for t in qkv], torch.randn(
            shapes[0], device="cuda", dtype=dtype, generator=g
        )

    def step(seed):
        (q, k, v), do = inputs(seed)
        torch.manual_seed(seed)  # the dropout state
        out, lse = attnkit.attention(q, k, v, **kw)
        loss = (out * do).sum() + (lse.nan_to_num(0, 0, 0).sum() if use_lse else 0)
        return [out, lse, *torch.autograd.grad(loss, (q, k, v))]

    try:
        ops.REPLAY = False
        full = [step(seed) for seed in (1, 2, 3)]
        ops.REPLAY = True
        ops._REPLAYS.clear()
        ran = []
        real = _launch.Replay.__call__
        _launch.Replay.__call__ = lambda self, t: (ran.append(self), real(self, t))[1]
        replayed = [step(seed) for seed in (1, 2, 3)]  # the first records nothing new, the second records
    finally:
        ops.REPLAY = True
        _launch.Replay.__call__ = real
    assert len(ran) >= 2, "the third call's forward and backward should have been replays"
    for a, b in zip(full, replayed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_every_kernel_switch_keys_the_replays():
    """Each ``ATTNKIT_TRITON_*`` switch the backend reads changes which kernels run, so a replay recorded
    under one value must not serve the other (``ops/attention._SWITCHES``, which takes the capability
    table's off switches from ``runtime/capability.SWITCHES``): every name in the backend's source is in
    it. The bench's A/B variants flip them inside one process."""
    import pathlib
    import re

    from attnkit.backends.triton.ops import attention

    root = pathlib.Path(attention.__file__).parents[1]
    read = {m for f in root.rglob("*.py") for m in re.findall(r'"(ATTNKIT_TRITON_[A-Z_]+)"', f.read_text())}
    assert "ATTNKIT_TRITON_GLUON_LISTED_BWD" in read
    assert read <= set(attention._SWITCHES), sorted(read - set(attention._SWITCHES))
