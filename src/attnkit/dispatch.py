"""Backend registry and the choice among backends.

Every backend answers ``why_not(call)``; among those with no reason, ``auto`` takes the one with the lowest
estimated time (``Backend.cost``: measured throughput tables per device class, see docs/backends.md). An
explicitly named backend (argument or ``ATTNKIT_BACKEND``) that cannot serve the call raises
:class:`UnsupportedError` with its reasons: never a silent fallback. ``ATTNKIT_DEBUG=1`` logs each new
choice once.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field

import torch

from attnkit._call import AttentionCall
from attnkit.backends.base import Backend
from attnkit.errors import AttentionInputError, UnsupportedError
from attnkit.masks import Mask
from attnkit.mods import ScoreMod

log = logging.getLogger("attnkit")

# Modules that define built-in backends: each exposes BACKEND or BACKENDS. Adding a backend = one module
# plus one line here.
_BUILTIN_MODULES = (
    "attnkit.backends.reference",
    "attnkit.backends.sdpa",
    "attnkit.backends.flex",
    "attnkit.backends.triton",
    "attnkit.backends.flash_attn4",
    "attnkit.backends.flex_flash",
    "attnkit.backends.xformers",
)

_REGISTRY: dict[str, Backend] = {}
_LOADED = False
_LOGGED: set = set()
_CHOICES: dict = {}  # signature of a call -> chosen backend (see _signature)
_CHOICES_SIZE = 4096


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend to the registry (third-party packages may call this too)."""
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    backend.available()  # checked now, so that calls traced by torch.compile only read it
    _REGISTRY[backend.name] = backend
    _CHOICES.clear()
    return backend


def registry_size() -> int:
    """How many backends are registered (a choice made before a registration may no longer be the best)."""
    return len(_REGISTRY)


def registered(backend: Backend) -> bool:
    """Whether this very backend object is still the one registered under its name."""
    return _REGISTRY.get(backend.name) is backend


def _load() -> dict[str, Backend]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod_name in _BUILTIN_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                if e.name == mod_name:  # this backend module is not part of this build
                    continue
                raise
            if getattr(mod, "__file__", None) is None:  # an empty namespace package: nothing built yet
                continue
            for b in getattr(mod, "BACKENDS", None) or [mod.BACKEND]:
                register(b, replace=True)
    return _REGISTRY


@dataclass
class BackendRecord:
    name: str
    available: bool
    reason: str | None
    description: str

    @property
    def why_not(self) -> str | None:
        """Alias of ``reason``: why this backend is unavailable (None when it is available)."""
        return self.reason

    def __getitem__(self, key: str):  # records also read like dicts: r["name"], r["available"], r["reason"]
        if key in ("name", "available", "reason", "description", "why_not"):
            return getattr(self, key)
        raise KeyError(key)

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name:<16} {state}"


def backends() -> list[BackendRecord]:
    """Every registered backend, whether it can run here, and why not."""
    out = []
    for b in _load().values():
        ok, why = b.available()
        if ok:
            why = b.import_problem()
            ok = why is None
        out.append(BackendRecord(b.name, ok, why, b.description))
    return out


def get(name: str) -> Backend:
    reg = _load()
    if name not in reg:
        raise AttentionInputError("backend", f"'auto' or one of {sorted(reg)}", repr(name))
    return reg[name]


@dataclass
class Candidate:
    name: str
    status: str  # "chosen" | "capable" | "rejected" | "unavailable"
    reasons: list[str] = field(default_factory=list)
    est_ms: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What ``attnkit.explain`` returns: every backend, chosen or rejected with its reasons."""

    features: list[str]
    shape: str
    requested: str
    chosen: str | None
    candidates: list[Candidate]

    def __str__(self) -> str:
        lines = [
            f"attnkit.explain: {self.shape}",
            f"  features: {', '.join(self.features)}",
            f"  requested: {self.requested}",
            f"  chosen: {self.chosen or 'none'}",
            "",
        ]
        for c in self.candidates:
            est = f"~{c.est_ms:.3g} ms" if c.est_ms is not None and c.est_ms != float("inf") else ""
            lines.append(f"  {c.status:<11} {c.name:<16} {est}")
            for r in c.reasons:
                lines.append(f"      - {r}")
            for n in c.notes:
                lines.append(f"      * {n}")
        return "\n".join(lines)

    __repr__ = __str__


def _shape_text(call: AttentionCall) -> str:
    if call.layout == "thd":
        return (
            f"thd N={call.batch} Tq={call.q.shape[0]} Tk={call.k.shape[0]} Hq={call.Hq} Hk={call.Hk} "
            f"D={call.D} Dv={call.Dv} max_seqlen=({call.Sq},{call.Sk}) {call.dtype} on {call.device}"
        )
    return (
        f"{call.layout} B={call.batch} Hq={call.Hq} Hk={call.Hk} Sq={call.Sq} Sk={call.Sk} D={call.D} "
        f"Dv={call.Dv} {call.dtype} on {call.device}"
    )


def _requested(backend: str) -> tuple[str, bool]:
    """(name, explicit): the environment forces a backend for 'auto' calls."""
    if not isinstance(backend, str):
        raise AttentionInputError("backend", "'auto' or a backend name (str)", repr(backend))
    if backend == "auto":
        env = os.environ.get("ATTNKIT_BACKEND", "").strip()
        if env and env != "auto":
            return env, True
        return "auto", False
    return backend, True


def evaluate(call: AttentionCall, backend: str = "auto") -> tuple[Backend | None, Report]:
    """Rank every backend for the call. Returns (chosen backend or None, report)."""
    name, explicit = _requested(backend)
    reg = _load()
    if explicit:
        get(name)  # unknown names raise AttentionInputError
    cands: list[Candidate] = []
    capable: list[tuple[float, Backend]] = []
    for b in reg.values():
        ok, why = b.available()
        if not ok:
            cands.append(Candidate(b.name, "unavailable", [why or "not available"]))
            continue
        reasons = b.why_not(call)
        if reasons:
            cands.append(Candidate(b.name, "rejected", reasons))
            continue
        est = b.cost(call)
        cands.append(Candidate(b.name, "capable", [], est * 1e3, b.notes(call) + b.memory_notes(call)))
        capable.append((est, b))
    chosen = None
    if explicit:
        chosen = reg[name] if any(b is reg[name] for _, b in capable) else None
    elif capable:
        chosen = min(capable, key=lambda t: t[0])[1]
    if chosen is not None:
        for c in cands:
            if c.name == chosen.name:
                c.status = "chosen"
    order = {"chosen": 0, "capable": 1, "rejected": 2, "unavailable": 3}
    cands.sort(key=lambda c: (order[c.status], c.est_ms if c.est_ms is not None else float("inf")))
    report = Report(
        call.features(),
        _shape_text(call),
        name + (" (ATTNKIT_BACKEND)" if explicit and backend == "auto" else ""),
        chosen and chosen.name,
        cands,
    )
    return chosen, report


def choose(call: AttentionCall, backend: str = "auto") -> Backend:
    """The backend that runs the call; raises UnsupportedError for an explicit backend that cannot.

    Kept light (no report is built unless it is needed) so that torch.compile traces it cheaply.
    """
    name, explicit = _requested(backend)
    key = None if torch.compiler.is_compiling() else _signature(call, name)
    if key is not None:
        hit = _CHOICES.get(key)
        # A mask's choice is keyed by its structure; its data may still refuse the backend (document ids
        # that are not sorted do not lower to intervals): then choose again for this call alone, and keep
        # the cached choice for the masks of this structure that do fit it.
        if hit is not None and (call.mask is None or not hit.why_not(call)):
            return hit
        if hit is not None:
            key = None
    reg = _load()
    if explicit:
        chosen = get(name)
        ok = chosen.available()[0] and not chosen.why_not(call)
    else:
        chosen, best = None, float("inf")
        for b in reg.values():
            if b.available()[0] and not b.why_not(call):
                est = b.cost(call)
                if chosen is None or est < best:
                    chosen, best = b, est
        ok = chosen is not None
    if not ok or _debug():
        _, report = evaluate(call, backend)
        if not ok:
            if name == "auto":  # cannot happen while the reference is registered
                raise UnsupportedError("auto", ["no registered backend can serve this call"])
            cand = next(c for c in report.candidates if c.name == name)
            raise UnsupportedError(name, cand.reasons)
        seen = (report.shape, tuple(report.features), report.requested, chosen.name)
        if seen not in _LOGGED:
            _LOGGED.add(seen)
            log.warning("attnkit: %s -> %s\n%s", report.shape, chosen.name, report)
    if key is not None:
        if len(_CHOICES) >= _CHOICES_SIZE:
            _CHOICES.pop(next(iter(_CHOICES)))
        _CHOICES[key] = chosen
    return chosen


def _structure(obj, depth: int = 0):
    """The structure of a mask or score mod, as a choice may depend on it: a ``Mask``'s kind, its parts and,
    for a wrapped callable, the callable's; a ``ScoreMod``'s name and function; a function's code object
    and the structure of what its closure captures. Data never counts: tensors by dtype, rank and device
    only, numbers by type (doc ids, prefix and response lengths, chunk sizes are data, which the kernels
    read at run time), so new values of a mask reuse the choice, and two masks of other kinds never share
    one. Objects of other kinds count by identity."""
    if depth > 8:
        return "..."
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return type(obj)
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, obj.dim(), obj.device.type, obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return tuple([_structure(x, depth + 1) for x in obj])
    if isinstance(obj, dict):
        return tuple([(k, _structure(v, depth + 1)) for k, v in obj.items()])
    d = depth + 1
    if isinstance(obj, (Mask, ScoreMod)):
        fn = None
        if obj.kind in ("mask_mod", "score_mod"):  # a wrapped user callable: the callable's structure
            src = getattr(obj, "source", None)
            fn = _structure(src if src is not None and src is not obj else obj._fn, d)
        kind = ("mask" if isinstance(obj, Mask) else "mod", obj.kind)
        return (kind, _structure(obj.params, d), _structure(obj.parts, d), fn)
    func = getattr(obj, "__func__", obj)  # (a bound method: its function and its object)
    code = getattr(func, "__code__", None)
    if code is None:
        return ("object", type(obj), id(obj))
    cells = []
    for cell in func.__closure__ or ():
        try:
            cells.append(_structure(cell.cell_contents, d))
        except ValueError:  # an empty cell
            cells.append("<empty>")
    owner = getattr(obj, "__self__", None)
    return ("fn", code, tuple(cells), _structure(func.__defaults__, d), None if owner is None else id(owner))


def _tensor_sig(t):
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.requires_grad)


def _signature(call: AttentionCall, name: str):
    """Everything a backend's why_not/cost may look at, so that a choice can be reused for the next call
    of the same kind (the per-call cost of choosing then drops to a dict lookup). Tensor values never
    matter to a choice, except thd lengths, which are part of the key (with max_seqlen, which may exceed
    the longest sequence). Masks and score mods count by their structure (:func:`_structure`), never by
    their data: a backend's choice must not depend on a mask's tensor values or numbers. q, k and v share
    one dtype and device: normalize checked it."""
    if call.layout == "thd" and call.seqlens_q is None:
        return None
    q, k, v = call.q, call.k, call.v
    return (
        name,
        call.layout,
        q.shape,
        q.stride(),
        q.requires_grad,
        k.shape,
        k.stride(),
        k.requires_grad,
        v.shape,
        v.stride(),
        v.requires_grad,
        q.dtype,
        q.device,
        call.causal,
        call.window,
        call.scale > 0,  # triton's cost asks whether its Hopper forward can fold the scale
        call.softcap is not None,
        _tensor_sig(call.alibi_slopes),
        _tensor_sig(call.bias),
        _structure(call.score_mod),  # which mods and masks: some compile into a kernel, others not
        _structure(call.mask),
        call.block_mask is not None,
        call.dropout_p > 0,
        call.return_lse,
        call.deterministic,
        call.requires_grad,
        torch.is_grad_enabled(),
        None if call.layout != "thd" else (tuple(call.seqlens_q), tuple(call.seqlens_k), call.Sq, call.Sk),
        len(_REGISTRY),
    )


def _debug() -> bool:
    return os.environ.get("ATTNKIT_DEBUG", "") not in ("", "0")
