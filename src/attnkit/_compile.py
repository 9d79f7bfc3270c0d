"""``attnkit.compile_count()``: how many kernels attnkit has compiled in this process.

Two sources, counted where the compile happens:

* attnkit's own Triton and Gluon kernels (and any ``@triton.jit`` kernel defined in an ``attnkit`` module,
  such as kernels generated from score mods and masks): Triton's ``knobs.runtime.jit_post_compile_hook``,
  which Triton calls once per kernel that misses its in-process cache (a compile, or a load from Triton's
  disk cache: either way a new kernel in this process). Installed when the Triton backend's launch
  runtime is imported (``backends/triton/runtime/launch.py``); a hook set before is kept and called too.
  A kernel that :class:`~attnkit.backends.triton.runtime.launch.Launch` serves from its memo is no compile.
* FlexAttention: the torch.compile graphs (dynamo frames compiled into new cache entries) that the ``flex``
  backend's calls cause, counted around those calls (:func:`counting_dynamo`).

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU test setup) nothing is compiled: Triton kernels
count 0 there, and the flex backend runs FlexAttention eagerly on the CPU (0 too).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

_lock = threading.Lock()
_COUNTS = {"triton": 0, "flex": 0}


def compile_count() -> int:
    """How many kernels attnkit has compiled in this process so far: its own Triton/Gluon kernels and the
    FlexAttention compiles its ``flex`` backend caused. A training loop that has warmed up keeps it
    constant. 0 under the Triton interpreter, where nothing compiles."""
    return sum(_COUNTS.values())


def counts() -> dict[str, int]:
    """The count by source: ``{"triton": ..., "flex": ...}``."""
    return dict(_COUNTS)


def note(source: str, n: int = 1) -> None:
    with _lock:
        _COUNTS[source] += n


def _ours(module) -> bool:
    name = getattr(module, "__name__", module) or ""
    return isinstance(name, str) and (name == "attnkit" or name.startswith("attnkit."))


def triton_hook(previous=None):
    """A ``jit_post_compile_hook`` that counts compiles of attnkit's kernels, then calls ``previous``."""

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled, **more):
        if _ours(getattr(fn, "module", None)) and not already_compiled:
            note("triton")
        if previous is not None:
            return previous(
                key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                already_compiled=already_compiled, **more,
            )  # fmt: skip
        return None

    hook.attnkit_counter = True
    return hook


def install_triton_hook(knobs=None) -> bool:
    """Set the counting hook on Triton's ``knobs.runtime`` (once; keeps a hook someone set before).
    Returns whether it is in place."""
    if knobs is None:
        try:
            from triton import knobs
        except ImportError:
            return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    current = runtime.jit_post_compile_hook
    if getattr(current, "attnkit_counter", False):
        return True
    runtime.jit_post_compile_hook = triton_hook(current)
    return True


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


@contextlib.contextmanager
def counting_dynamo(source: str = "flex"):
    """Count the torch.compile graphs compiled inside the block (dynamo's ``unique_graphs``) as attnkit's."""
    before = _dynamo_graphs()
    try:
        yield
    finally:
        new = _dynamo_graphs() - before
        if new > 0:
            note(source, new)


def outside_graph(fn):
    """``torch.compiler.disable(fn)`` (the call runs outside any torch.compile graph: one graph break),
    wrapped on first use: applying it at import would import torch._dynamo, seconds of every user's
    ``import attnkit``, for the peers' adapters that most never call."""
    done = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not done:
            done.append(torch.compiler.disable(fn))
        return done[0](*args, **kwargs)

    return call
