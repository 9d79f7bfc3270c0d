"""The fast launch path (``backends/triton/_launch.py``) must launch exactly the kernel Triton's own path
would: same specialization of every argument, same constexprs, every argument passed through.

Runs on the CPU: a stand-in JIT function "compiles" one kernel per distinct specialization, computed by
Triton's own ``native_specialize_impl`` (the rule the real launch path applies), and records which kernel
each launch ran and with what arguments. Random call sequences then mix integers that are and are not 1
or multiples of 16, 32- and 64-bit values, ints passed where floats were, aligned and misaligned tensors
of several dtypes, and changing constexprs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

from attnkit.backends.triton import _launch  # noqa: E402


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

    def __init__(self):
        self.params = [
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

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())


INTS = st.sampled_from([0, 1, 2, 16, 17, 32, 48, -16, 2**31 - 16, 2**31, 2**40])
SCALARS = st.one_of(INTS, st.sampled_from([0.5, 1.0, 16.0]))


@st.composite
def calls(draw):
    base = torch.zeros(64, dtype=torch.float32)
    half = torch.zeros(64, dtype=torch.float16)

    def tensor():
        t = draw(st.sampled_from([base, half]))
        return t[draw(st.sampled_from([0, 1, 4])) :]  # 0 and 4 (fp32) or 0 (fp16) are 16-byte aligned

    args = (tensor(), tensor(), draw(INTS), draw(INTS), draw(SCALARS), draw(INTS))
    kwargs = {"BLOCK": draw(st.sampled_from([16, 32])), "FLAG": draw(st.booleans()), "num_warps": 4}
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


def test_interpreted_functions_take_tritons_path():
    class NotJit:
        def __getitem__(self, grid):
            return lambda *a, **k: ("ran", grid, a, k)

    assert _launch.Launch(NotJit())[(1,)](1, X=2) == ("ran", (1,), (1,), {"X": 2})


@pytest.mark.cuda
def test_fast_path_on_the_gpu_gives_tritons_bits():
    """The real kernels through both paths: same bits, and repeats hit the memo."""
    import attnkit
    from attnkit.backends.triton import ops

    kernels = (ops.attn_fwd, ops.bwd_preprocess, ops.attn_bwd_dkdv, ops.attn_bwd_dq)
    q, k, v = (
        torch.randn(2, 3, 200, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in "qkv"
    )
    do = torch.randn_like(q)

    def run():
        out = attnkit.attention(q, k, v, causal=True, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    try:
        for kernel in kernels:
            kernel.fast = False
        slow = run()
    finally:
        for kernel in kernels:
            kernel.fast = True
    run()
    fast = run()
    assert all(kernel._memo for kernel in kernels)
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)
