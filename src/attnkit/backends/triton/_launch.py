"""Kernel launches with less host time: the compiled kernel is looked up from a key of the arguments and
called directly, skipping Triton's per-launch argument binding.

``JITFunction.run`` binds every argument through a generated function, derives each one's specialization
(type, divisibility by 16, equality to 1), turns that into a cache key and only then calls the compiled
launcher: about 13-28 us per launch of our kernels on the H200 machine (41-62 arguments), against
5-7 us for the launcher alone (``scripts/gpu_host_breakdown.py``). Short sequences wait on exactly that.

:class:`Launch` wraps a ``@triton.jit`` function with the same ``kernel[grid](*args, **constexprs)`` call
form. Its key holds everything Triton specializes on, so it can never name a kernel compiled for other
arguments:

* tensors: dtype and whether the address is 16-byte aligned;
* specialized integers: the value itself (strides and sizes repeat from call to call);
* integers marked ``do_not_specialize``: only whether they fit in 32 bits (their type);
* every scalar: its Python type (an ``int`` where a ``float`` was passed is a different kernel);
* constexpr keywords, ``num_warps`` / ``num_stages``, and the device.

A key seen for the first time goes through Triton's own path (which compiles if needed) and the kernel it
returns is remembered. The fast path is skipped under the interpreter, with launch hooks set (profilers),
and when arguments are not laid out as expected (a constexpr passed by position, a default left to Triton);
each such launch is simply Triton's.
"""

from __future__ import annotations

from operator import itemgetter

import torch
from triton import knobs

_I32 = (-(2**31), 2**31 - 1)
_MAX_ENTRIES = 4096  # distinct shapes per kernel before the memo starts over


class Launch:
    """``Launch(jit_fn)[grid](*runtime_args, stream=None, **constexprs_and_options)``.

    Runtime arguments are positional, in the kernel's order, and tensors (pointers) are ``torch.Tensor``
    (never ``None``); constexprs and ``num_warps`` / ``num_stages`` are keywords. ``stream`` is a raw CUDA
    stream handle (``torch.cuda.Stream.cuda_stream``) to launch on, default the current stream."""

    def __init__(self, fn):
        self.fn = fn
        self._memo: dict = {}
        self._plans: dict = {}
        self.fast = hasattr(fn, "device_caches") and hasattr(fn, "params")  # False under the interpreter

    def __getitem__(self, grid):
        return lambda *args, stream=None, **kwargs: self.run(grid, args, kwargs, stream)

    def _plan(self, args: tuple):
        """Which positions are tensors, specialized integers, and unspecialized integers (per arity)."""
        n = len(args)
        plan = self._plans.get(n)
        if plan is None:
            params = self.fn.params
            if n > len(params) or any(p.is_constexpr for p in params[:n]):
                plan = False
            else:
                ptr = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
                nospec = [i for i in range(n) if i not in ptr and params[i].do_not_specialize]
                spec = [i for i in range(n) if i not in ptr and not params[i].do_not_specialize]
                plan = (_getter(ptr), _getter(nospec), _getter(spec))
            self._plans[n] = plan
        return plan

    def run(self, grid, args: tuple, kwargs: dict, stream):
        plan = self._plan(args) if self.fast else False
        if not plan or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            return self._slow(grid, args, kwargs, stream)
        ptr, nospec, spec = plan
        try:  # (no ``None in tensors``: comparing a tensor with None costs ~15 us, an exception inside)
            t_key = tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in ptr(args)])
        except AttributeError:  # a non-tensor where the plan saw a tensor
            return self._slow(grid, args, kwargs, stream)
        unspec = nospec(args)
        spec_vals = spec(args)
        key = (
            torch.cuda.current_device(),
            t_key,
            spec_vals,
            tuple(map(type, spec_vals)),
            tuple(map(_int_kind, unspec)),
            tuple(kwargs.items()),
        )
        hit = self._memo.get(key)
        if hit is None:
            return self._fill(key, grid, args, kwargs, stream)
        kernel, tail = hit
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        meta = kernel.packed_metadata
        kernel.run(g0, g1, g2, stream, kernel.function, meta, None, None, None, *args, *tail)
        return kernel

    def _slow(self, grid, args, kwargs, stream):
        if stream is None:
            return self.fn[grid](*args, **kwargs)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            return self.fn[grid](*args, **kwargs)

    def _fill(self, key, grid, args, kwargs, stream):
        kernel = self._slow(grid, args, kwargs, stream)
        if hasattr(kernel, "result"):  # an asynchronous compile still in flight: use it next time
            return kernel
        names = self.fn.arg_names[len(args) :]
        options = {"num_warps", "num_stages", "num_ctas", "maxnreg", "debug"}
        if set(kwargs) - options != set(names):  # defaults filled in by Triton: not handled here
            return kernel
        if len(self._memo) >= _MAX_ENTRIES:
            self._memo.clear()
        self._memo[key] = (kernel, tuple(kwargs[n] for n in names))
        return kernel


def _hooked(hook) -> bool:
    """Whether launch hooks are set (a profiler): triton 3.6 keeps an empty ``HookChain`` when none are."""
    return hook is not None and getattr(hook, "calls", True) != []


def _getter(idx: list[int]):
    """``args -> tuple(args[i] for i in idx)`` at C speed (itemgetter of one index returns a bare item)."""
    if not idx:
        return lambda args: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda args: (args[i],)
    return itemgetter(*idx)


def _int_kind(a) -> object:
    """What Triton's type for an unspecialized scalar depends on: i32, i64 or u64 for ints."""
    if a.__class__ is int:
        return 0 if _I32[0] <= a <= _I32[1] else (1 if a < 2**63 else 2)
    return a.__class__
