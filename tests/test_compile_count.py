"""attnkit.compile_count() (docs/api.md section 2): Triton compiles of attnkit's kernels, through Triton's
``jit_post_compile_hook`` (tested with a stand-in ``knobs`` here: the interpreter compiles nothing), and
FlexAttention / torch.compile graphs the flex backend causes (tested with a real ``torch.compile`` on the
CPU, backend "eager"). On the GPU: new sequence lengths compile nothing new after warm-up."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import attnkit
import oracle
from attnkit import _compile


def _knobs(previous=None):
    return types.SimpleNamespace(runtime=types.SimpleNamespace(jit_post_compile_hook=previous))


def _fire(hook, module: str, already: bool = False):
    info = types.SimpleNamespace(module=module, name="k", jit_function=None)
    return hook(key="k", repr="k[]", fn=info, compile={}, is_manual_warmup=False, already_compiled=already)


def test_triton_hook_counts_our_kernels_only_and_keeps_the_previous_hook():
    seen = []
    knobs = _knobs(lambda **kw: seen.append(kw["fn"].module))
    assert _compile.install_triton_hook(knobs)
    hook = knobs.runtime.jit_post_compile_hook
    assert _compile.install_triton_hook(knobs) and knobs.runtime.jit_post_compile_hook is hook  # once
    before = attnkit.compile_count()
    _fire(hook, "attnkit.backends.triton.kernels.fwd")
    _fire(hook, "attnkit.backends.triton.kernels.hopper.fwd")
    _fire(hook, "someone_else.kernels")  # a user's own Triton kernel: not ours
    _fire(hook, "attnkit_fork.kernels")  # a module that only starts with the name
    _fire(hook, "attnkit.backends.triton.kernels.bwd", already=True)  # no compile
    assert attnkit.compile_count() == before + 2
    assert len(seen) == 5  # the previous hook saw every call


def test_hook_without_a_previous_one_and_without_the_knob():
    knobs = _knobs(None)
    assert _compile.install_triton_hook(knobs)
    before = _compile.counts()["triton"]
    assert _fire(knobs.runtime.jit_post_compile_hook, "attnkit.x") is None
    assert _compile.counts()["triton"] == before + 1
    assert not _compile.install_triton_hook(types.SimpleNamespace(runtime=types.SimpleNamespace()))


def test_the_real_triton_knob_carries_the_counter():
    pytest.importorskip("triton")
    from triton import knobs

    import attnkit.backends.triton.runtime.launch  # noqa: F401  (installs it)

    assert getattr(knobs.runtime.jit_post_compile_hook, "attnkit_counter", False)


def test_interpreter_compiles_nothing():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("compiled kernels on a GPU (see test_new_lengths_compile_nothing)")
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Hk=1, Sq=9, Sk=11, D=16, dtype=torch.float32)
    before = attnkit.compile_count()
    attnkit.attention(q, k, v, causal=True, backend="triton", **kw)
    assert attnkit.compile_count() == before


def test_dynamo_compiles_are_counted_once_per_graph():
    def f(x):
        return torch.sin(x) * 2

    g = torch.compile(f, backend="eager", dynamic=False)
    x = torch.randn(5)
    before = _compile.counts()["flex"]
    with _compile.counting_dynamo():
        g(x)
    first = _compile.counts()["flex"]
    assert first >= before + 1
    with _compile.counting_dynamo():
        g(torch.randn(5))  # the same graph: no compile
    assert _compile.counts()["flex"] == first
    g(torch.randn(7))  # compiled outside the block: not attnkit's
    assert _compile.counts()["flex"] == first
    assert attnkit.compile_count() == sum(_compile.counts().values())


def test_flex_thd_new_lengths_and_sequence_counts_reuse_one_graph():
    """The flex backend's thd mods capture only per-row tensors (sizes Tq, Tk): after two warm-ups of
    different total lengths (dynamo's automatic dynamic shapes make them symbolic at the second), new
    lengths and a new number of sequences compile nothing. A per-sequence tensor in the closure (size = the
    number of sequences) recompiled flex_attention and create_block_mask at 3 -> 4 sequences (H200).
    On the CPU: flex_attention compiled with the "eager" backend, so dynamo's guards are the real ones."""
    from attnkit.backends import _flex_common as common

    fn = torch.compile(common.flex_module().flex_attention, backend="eager")

    def run(lens):
        q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=16, seqlens_q=lens)
        call = oracle.make_call(q, k, v, causal=True, **kw)
        q4, k4, v4, score_mod, mask_mod, B, Q, K = common.inputs(call)
        bm = common.block_mask(call, mask_mod, B, Q, K)
        kwargs = dict(score_mod=score_mod, block_mask=bm, scale=call.scale)
        out, _ = common.call_flex(fn, q4, k4, v4, False, kwargs, dynamic=True)
        torch.testing.assert_close(out[0].transpose(0, 1), attnkit.attention(q, k, v, causal=True, **kw))

    torch._dynamo.reset()
    run([10, 3, 25])
    run([9, 3, 20])
    before = attnkit.compile_count()
    run([2, 33, 1, 6])
    run([11, 4, 26])
    run([5, 7])
    assert attnkit.compile_count() == before


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_new_lengths_compile_nothing(backend):
    """After warm-up calls of two different total lengths (flex: dynamo's automatic dynamic shapes make the
    lengths symbolic at the second), packed batches of new lengths and new numbers of sequences (>= 2)
    compile nothing (triton: lengths are runtime arguments; flex: thd lengths are dynamic and its mods
    capture only per-row tensors)."""

    def run(lens):
        dt = torch.bfloat16
        q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=64, dtype=dt, device="cuda", seqlens_q=lens)
        attnkit.attention(q, k, v, causal=True, backend=backend, **kw)

    run([100, 37, 250])
    run([90, 30, 200])
    before = attnkit.compile_count()
    run([17, 333, 1, 64])
    run([101, 38, 251])
    assert attnkit.compile_count() == before


def test_outside_graph_runs_eagerly_under_compile_and_import_skips_dynamo():
    """The peers' adapters run outside torch.compile graphs (a graph break, even when the first call is
    traced), and ``import attnkit`` does not import torch._dynamo for that (seconds of every import)."""
    from attnkit._compile import outside_graph

    seen = []

    @outside_graph
    def side(x):
        seen.append(torch.compiler.is_compiling())
        return x * 2

    f = torch.compile(lambda x: side(x + 1) + 1, backend="eager")
    x = torch.randn(4)
    assert torch.equal(f(x), (x + 1) * 2 + 1) and torch.equal(f(x), (x + 1) * 2 + 1)
    assert seen == [False, False]
    code = "import sys, attnkit; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
