"""Kernel launches with less host time: the compiled kernel is looked up from a key of the arguments and
called directly, skipping Triton's per-launch argument binding.

``JITFunction.run`` binds every argument through a generated function, derives each one's specialization
(type, divisibility by 16, equality to 1), turns that into a cache key and only then calls the compiled
launcher: about 13-28 us per launch of our kernels on the H200 machine (41-62 arguments), against
5-7 us for the launcher alone (a deleted probe: ``git show bf37e7a:scripts/gpu_host_breakdown.py``).
Short sequences wait on exactly that.

:class:`Launch` wraps a ``@triton.jit`` function with the same ``kernel[grid](*args, **constexprs)`` call
form. Its key holds everything Triton specializes on, so it can never name a kernel compiled for other
arguments:

* tensors: dtype and whether the address is 16-byte aligned;
* host TMA descriptors (Gluon kernels): the base's dtype, the block shape, the shared-memory layout and the
  padding (Triton specializes on the first three; shape and strides are runtime arguments, and the
  launcher encodes the descriptor on every launch);
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

import threading
from operator import itemgetter

import torch
from triton import knobs

from attnkit import _compile

_compile.install_triton_hook(knobs)  # attnkit.compile_count(): every compile of our kernels counts

_I32 = (-(2**31), 2**31 - 1)
# what Triton's own launch path asks (``driver.active.get_current_device`` / ``get_current_stream``): C
# calls, where ``torch.cuda.current_stream()`` builds a Stream object through ~10 Python calls (~20 us a
# launch under cProfile on the H200 machine)
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
_current_stream = getattr(
    torch._C, "_cuda_getCurrentRawStream", lambda dev: torch.cuda.current_stream(dev).cuda_stream
)
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
                desc = [i for i, a in enumerate(args) if _is_descriptor(a)]
                rest = [i for i in range(n) if i not in ptr and i not in desc]
                nospec = [i for i in rest if params[i].do_not_specialize]
                spec = [i for i in rest if not params[i].do_not_specialize]
                plan = (_getter(ptr), _getter(desc), _getter(nospec), _getter(spec))
            self._plans[n] = plan
        return plan

    def run(self, grid, args: tuple, kwargs: dict, stream):
        plan = self._plan(args) if self.fast else False
        if not plan or hooked():
            return self._slow(grid, args, kwargs, stream)
        ptr, desc, nospec, spec = plan
        try:  # (no ``None in tensors``: comparing a tensor with None costs ~15 us, an exception inside)
            t_key = tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in ptr(args)])
            d_key = tuple([(d.base.dtype, *d.block_shape, d.layout, d.padding) for d in desc(args)])
            unspec = nospec(args)
            spec_vals = spec(args)
            dev = _current_device()
            key = (
                dev,
                t_key,
                d_key,
                spec_vals,
                tuple(map(type, spec_vals)),
                tuple(map(_int_kind, unspec)),
                tuple(kwargs.items()),
            )
            hit = self._memo.get(key)
        except (AttributeError, TypeError):  # an argument of another kind than the plan saw (unhashable)
            return self._slow(grid, args, kwargs, stream)
        if hit is None:
            return self._fill(key, grid, args, kwargs, stream)
        kernel, tail = hit
        given = stream
        if stream is None:
            stream = _current_stream(dev)
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        meta = kernel.packed_metadata
        kernel.run(g0, g1, g2, stream, kernel.function, meta, None, None, None, *args, *tail)
        rec = _RECORDING.__dict__.get("log")
        if rec is not None:
            rec.append((kernel, (g0, g1, g2), given, args, tail))
        return kernel

    def _slow(self, grid, args, kwargs, stream):
        rec = _RECORDING.__dict__.get("log")
        if rec is not None:  # Triton's path (a compile, a hook, an unusual argument): nothing to replay
            rec.append(None)
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


# ------------------------------------------------------------------------------------------------------
# record and replay: a whole host function's launches, for calls that differ only in their tensors
# ------------------------------------------------------------------------------------------------------
_RECORDING = threading.local()


class Recording:
    """``with Recording() as rec:`` collects every launch this thread makes through :class:`Launch`;
    ``rec.replayable`` is False if any took Triton's own path (then there is nothing fixed to replay)."""

    def __enter__(self):
        self.prev = _RECORDING.__dict__.get("log")
        self.log: list = []
        _RECORDING.log = self.log
        return self

    def __exit__(self, *exc):
        _RECORDING.log = self.prev
        return False

    @property
    def replayable(self) -> bool:
        return bool(self.log) and None not in self.log and self.prev is None


class Replay:
    """The launches of one recorded call, each tensor argument (or descriptor base) replaced by its
    position in the call's list of tensors: ``Replay.build(log, tensors)(new_tensors)`` launches the same
    kernels with the same grids and scalars on the new tensors. Built only where every tensor a launch
    took is one of ``tensors`` (by identity; else :func:`Replay.build` gives None), so nothing the
    recording saw stays baked in but the scalars, which the caller's key must determine."""

    def __init__(self, steps):
        self.steps = steps

    @classmethod
    def build(cls, log: list, tensors: list):
        ids: dict = {}
        for i, t in enumerate(tensors):  # one object in two places: its first (the caller's key must say
            if t is not None:  # which of its tensors are one object, so that every replay's are too)
                ids.setdefault(id(t), i)
        steps = []
        for kernel, grid, stream, args, tail in log:
            if stream is not None:  # a side stream: its waits are not launches, so not recorded
                return None
            template, slots, descs = list(args), [], []
            for pos, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    if id(a) not in ids:
                        return None
                    slots.append((pos, ids[id(a)]))
                    template[pos] = None
                elif _is_descriptor(a):
                    if id(a.base) not in ids:
                        return None
                    d = _NEW(type(a))
                    d.__dict__.update(a.__dict__)
                    d.base = None  # (the replay's own tensor goes here: keep no recorded tensor alive)
                    descs.append((pos, ids[id(a.base)], d))
                    template[pos] = None
            steps.append((kernel, grid, tuple(template), tuple(slots), tuple(descs), tail))
        return cls(tuple(steps))

    def __call__(self, tensors: list) -> None:
        stream = _current_stream(_current_device())
        for kernel, (g0, g1, g2), template, slots, descs, tail in self.steps:
            args = list(template)
            for pos, i in slots:
                args[pos] = tensors[i]
            for pos, i, d in descs:
                nd = _NEW(type(d))
                nd.__dict__.update(d.__dict__)
                nd.base = tensors[i]
                args[pos] = nd
            meta = kernel.packed_metadata
            kernel.run(g0, g1, g2, stream, kernel.function, meta, None, None, None, *args, *tail)


_NEW = object.__new__


def hooked() -> bool:
    """Whether Triton's launch hooks are set (then every launch must take Triton's path)."""
    return _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)


def _hooked(hook) -> bool:
    """Whether launch hooks are set (a profiler): triton 3.6 keeps an empty ``HookChain`` when none are."""
    return hook is not None and getattr(hook, "calls", True) != []


def _is_descriptor(a) -> bool:
    """A host tensor descriptor (Triton's or Gluon's ``TensorDescriptor``)."""
    return type(a).__name__ == "TensorDescriptor" and hasattr(a, "block_shape")


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
