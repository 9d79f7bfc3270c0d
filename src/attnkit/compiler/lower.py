"""Step 2 of the score-mod compiler: lower a traced graph (:mod:`attnkit.compiler.trace`) to Triton source.

Each aten op becomes one line of a ``@triton.jit`` function; ops are elementwise (the kernels call the
function on whole tiles: ``score`` (rows, cols), ``q``/``kv`` broadcastable index arrays, ``b``/``h``/``off``
scalars). Every result is cast to the dtype the trace gave it, so PyTorch's type promotion (and the rounding
of 16-bit tables) is kept. ``tab[i0, i1, ...]`` on a captured tensor (every dim indexed at once, by
tensors: partial indexing such as ``tab[h][i]`` means one thing under vmap, another on broadcast index
tensors, so it is refused) becomes ``tl.load(C + i0 * s0 + i1 * s1 ...)`` with negative indices wrapped as in
PyTorch and out-of-range ones masked (the padding rows of a tile), strides and sizes read from ``META``.

Derivatives are forward-mode on the same graph: each float value that depends on the seed carries its
derivative (a second line). :func:`lower` seeds ``score``: ``score_mod(score, b, h, q, kv, off, SM) ->
(value, d value / d score)`` (the forward uses the value alone; the compiler drops the rest).
:func:`lower_grads` seeds each read of a captured tensor that requires grad in turn (one pass per read, any
number of reads) and emits ``score_mod_bwd(score, b, h, q, kv, off, SM, ds)``, which adds
``ds * d(mod)/d(value read)`` into that tensor's float32 gradient by atomic adds.

``SM = (C0, C1, C2, C3, META, b, h, G0, G1, G2, G3)``: up to :data:`MAX_TENSORS` captured tensors, an int64
(MAX_TENSORS, 8) table of their (strides, sizes), 4 dims each, and their gradient buffers (dK/dV kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnkit.compiler.trace import Traced, Unlowerable

MAX_TENSORS = 4
MAX_DIMS = 4
aten = torch.ops.aten

_TL = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float32",  # (computed in float32: the kernels' precision)
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
_PLACEHOLDERS = ("score", "b", "h", "q", "kv", "off")


@dataclass
class Val:
    """A lowered value: ``code`` (a variable or a literal), its torch dtype, and ``d`` the variable holding
    d(value)/d(score), or None where that is 0."""

    code: str
    dtype: torch.dtype
    d: str | None = None
    scalar: bool = False  # the same for the whole tile (depends on b, h, off and constants alone)


@dataclass
class View:
    """A captured tensor (slot ``slot``) indexed on its first ``len(idx)`` dims so far."""

    slot: int
    ndim: int
    dtype: torch.dtype
    idx: list = field(default_factory=list)


class _Emitter:
    def __init__(self, traced: Traced, owner, prefix: str = "v"):
        self.traced = traced
        self.owner = owner  # the ScoreMod (for source lines in refusals)
        self.prefix = prefix
        self.lines: list[str] = []
        self.loads: list[tuple] = []  # (slot, offset var, in-range var, scalar, dtype) per load, in order
        self.n = 0
        self.slots: dict[str, int] = {}
        self.tensors: list[torch.Tensor] = []

    # -- helpers ------------------------------------------------------------------------------------------
    def var(self, code: str) -> str:
        name = f"{self.prefix}{self.n}"
        self.n += 1
        self.lines.append(f"{name} = {code}")
        return name

    def refuse(self, node, why: str):
        from attnkit.compiler.trace import op_line

        target = node.target
        line = op_line(self.owner, target) if callable(target) else "?"
        raise Unlowerable(f"score_mod op {_opname(target)} {why} (at {line})")

    def cast(self, v, dtype: torch.dtype) -> str:
        if isinstance(v, Val):
            if v.dtype == dtype:
                return v.code
            if dtype == torch.bool:  # (nonzero, as torch's bool())
                return f"({v.code} != 0)"
            return f"({v.code}).to({_TL[dtype]})"
        return _literal(v, dtype)

    def value(self, node, a):
        """A node argument as Val or Python number (Views of captured tensors must be fully indexed)."""
        if isinstance(a, torch.fx.Node):
            v = self.env[a]
            if isinstance(v, View):
                if v.ndim != len(v.idx):
                    self.refuse(node, f"takes a captured tensor indexed on {len(v.idx)} of its {v.ndim} dims")
                v = self.load(v)
                self.env[a] = v
            return v
        if isinstance(a, (bool, int, float)):
            return a
        self.refuse(node, f"with an argument of type {type(a).__name__}")

    def load(self, v: View) -> Val:
        """``tl.load`` of a fully indexed captured tensor."""
        s = v.slot
        seeded = self.seed == len(self.loads) and v.dtype.is_floating_point
        if v.ndim == 0:
            self.loads.append((s, "0", "True", True, v.dtype))
            return Val(self.var(f"tl.load(SM[{s}])"), v.dtype, "1.0" if seeded else None, True)
        offs, oks = [], []
        for d, ix in enumerate(v.idx):
            if isinstance(ix, Val):
                i = self.var(self.cast(ix, torch.int64))
            else:  # a constant index (tab[0], select): a scalar tensor, so that where() below is one
                i = self.var(f"(h * 0 + {int(ix)}).to(tl.int64)")
            size = self.var(f"tl.load(SM[{MAX_TENSORS}] + {s * 2 * MAX_DIMS + MAX_DIMS + d})")
            stride = self.var(f"tl.load(SM[{MAX_TENSORS}] + {s * 2 * MAX_DIMS + d})")
            i = self.var(f"tl.where({i} < 0, {i} + {size}, {i})")  # negative indices count from the end
            oks.append(f"({i} >= 0) & ({i} < {size})")
            offs.append(f"{i} * {stride}")
        ok = self.var(" & ".join(oks))
        offset = self.var(" + ".join(offs))
        scalar = all(ix.scalar for ix in v.idx if isinstance(ix, Val))
        self.loads.append((s, offset, ok, scalar, v.dtype))
        code = self.var(f"tl.load(SM[{s}] + {offset}, mask={ok}, other=0)")
        return Val(code, v.dtype, "1.0" if seeded else None, scalar)

    # -- the graph ----------------------------------------------------------------------------------------
    def run(self, seed="score") -> Val:
        """Lower the graph; derivatives with respect to ``seed``: "score", or the index of a load (the
        value it reads, for the gradient of a captured tensor). Returns the output value."""
        self.env: dict = {}
        self.with_grad = True
        self.seed = seed
        out = None
        for node in self.traced.gm.graph.nodes:
            if node.op == "placeholder":
                i = len([n for n in self.env if n.op == "placeholder"])
                name = _PLACEHOLDERS[i]
                dtype = torch.float32 if i == 0 else torch.int32
                code = self.var("score.to(tl.float32)") if i == 0 else name
                d = "1.0" if i == 0 and seed == "score" else None
                self.env[node] = Val(code, dtype, d, name in ("b", "h", "off"))
            elif node.op == "get_attr":
                t = self.traced.captured[node.target]
                if node.target not in self.slots:
                    if len(self.tensors) == MAX_TENSORS:
                        raise Unlowerable(f"score_mod captures more than {MAX_TENSORS} tensors")
                    if t.dim() > MAX_DIMS:
                        raise Unlowerable(f"score_mod captures a tensor of {t.dim()} dims (<= {MAX_DIMS})")
                    if t.dtype not in _TL or t.dtype == torch.float64:
                        raise Unlowerable(f"score_mod captures a tensor of dtype {t.dtype}")
                    self.slots[node.target] = len(self.tensors)
                    self.tensors.append(t)
                self.env[node] = View(self.slots[node.target], t.dim(), t.dtype)
            elif node.op == "call_function":
                v = self.call(node)
                if isinstance(v, Val) and node.target not in _ALIASES and node.target not in _CONST:
                    ins = [self.env.get(a) for a in node.args if isinstance(a, torch.fx.Node)]
                    v.scalar = all(getattr(x, "scalar", True) for x in ins)
                elif isinstance(v, Val) and node.target in _CONST:
                    v.scalar = True
                self.env[node] = v
            elif node.op == "output":
                res = node.args[0]
                res = res[0] if isinstance(res, (tuple, list)) else res
                out = self.value(node, res)
                if not isinstance(out, Val):
                    out = Val(_literal(out, torch.float32), torch.float32)
            else:
                raise Unlowerable(f"score_mod graph node {node.op} {node.target}")
        return out

    def call(self, node):
        op = node.target
        args, kw = node.args, node.kwargs
        meta = node.meta.get("val")
        dtype = getattr(meta, "dtype", None)
        if op in _ALIASES:
            return self.env[args[0]] if isinstance(args[0], torch.fx.Node) else args[0]
        if op is aten.index.Tensor:
            base = self.env[args[0]]
            idx = list(args[1])
            if not isinstance(base, View) or any(i is None for i in idx):
                self.refuse(node, "indexes something other than a captured tensor, or slices it")
            if base.idx or len(idx) != base.ndim:  # (tab[h][i] means other things under vmap and broadcast)
                self.refuse(node, "indexes a captured tensor on some of its dims (index all: tab[h, i])")
            vals = [self.value(node, i) for i in idx]
            return View(base.slot, base.ndim, base.dtype, base.idx + vals)
        if op not in _RULES and op not in _CONST and op not in _CASTS:
            self.refuse(node, "is not supported by the Triton score_mod compiler")
        if dtype is None or dtype not in _TL:
            self.refuse(node, "gives no tensor of a supported dtype")
        if op in _CONST:
            fill = {aten.zeros_like.default: 0, aten.ones_like.default: 1}.get(op)
            if fill is None:
                fill = args[0] if op is aten.scalar_tensor.default else args[1]
            if isinstance(fill, torch.fx.Node):
                self.refuse(node, "with a tensor fill value")
            return Val(_literal(fill, dtype), dtype)
        if op in _CASTS:
            x = self.value(node, args[0])
            return self.unary_cast(x, dtype)
        rule = _RULES[op]
        vals = [self.value(node, a) for a in args]
        if "alpha" in kw and kw["alpha"] != 1:
            vals[1] = Val(self.var(f"{self.cast(vals[1], dtype)} * {kw['alpha']!r}"), dtype,
                          self.dmul(vals[1], repr(kw["alpha"])))  # fmt: skip
        extra = {k: v for k, v in kw.items() if k != "alpha"}
        if extra and op not in (aten.div.Tensor_mode,):
            self.refuse(node, f"with keyword arguments {sorted(extra)}")
        return rule(self, node, dtype, vals, extra)

    def dmul(self, v, factor: str):
        d = v.d if isinstance(v, Val) else None
        return None if d is None or not self.with_grad else self.var(f"{d} * {factor}")

    def unary_cast(self, x, dtype):
        if not isinstance(x, Val):
            return Val(_literal(x, dtype), dtype)
        code = self.var(self.cast(x, dtype))
        d = x.d if (dtype.is_floating_point and x.dtype.is_floating_point) else None
        return Val(code, dtype, d)


def _opname(op) -> str:
    return str(getattr(op, "_name", None) or getattr(op, "__name__", op))


def _literal(x, dtype: torch.dtype) -> str:
    if isinstance(x, Val):
        return x.code
    if dtype == torch.bool:
        return "True" if x else "False"
    if dtype.is_floating_point:
        x = float(x)
        if math.isnan(x):
            return 'float("nan")'
        if math.isinf(x):
            return 'float("inf")' if x > 0 else 'float("-inf")'
        return repr(x)
    return str(int(x))


def _is_float(v) -> bool:
    return (v.dtype.is_floating_point) if isinstance(v, Val) else isinstance(v, float)


def _cmp_dtype(vals) -> torch.dtype:
    """The dtype both sides of a comparison (or min/max, where) are cast to: float32 if any is a float."""
    return torch.float32 if any(_is_float(v) for v in vals) else torch.int64


def _d(v):
    return v.d if isinstance(v, Val) else None


# -- rules: (emitter, node, result dtype, argument values, extra kwargs) -> Val ----------------------------
def _binary(sym):
    def rule(e, node, dtype, vals, kw):
        a, b = vals[:2]
        code = e.var(f"({e.cast(a, dtype)} {sym} {e.cast(b, dtype)}).to({_TL[dtype]})")
        d = None
        if e.with_grad and dtype.is_floating_point and (_d(a) or _d(b)):
            da, db = _d(a) or "0.0", _d(b) or "0.0"
            ca, cb = e.cast(a, torch.float32), e.cast(b, torch.float32)
            if sym == "+":
                d = e.var(f"{da} + {db}")
            elif sym == "-":
                d = e.var(f"{da} - {db}")
            elif sym == "*":
                d = e.var(f"{da} * {cb} + {ca} * {db}")
            else:  # "/"
                d = e.var(f"({da} - {code} * {db}) / {cb}")
        return Val(code, dtype, d)

    return rule


def _div_mode(e, node, dtype, vals, kw):
    mode = kw.get("rounding_mode")
    if mode is None:
        return _binary("/")(e, node, dtype, vals, kw)
    a, b = (e.cast(v, dtype) for v in vals[:2])
    if dtype.is_floating_point:
        fn = "tl.floor" if mode == "floor" else "_trunc"
        if fn == "_trunc":
            x = e.var(f"{a} / {b}")
            return Val(e.var(f"tl.where({x} < 0, -tl.floor(-{x}), tl.floor({x})).to({_TL[dtype]})"), dtype)
        return Val(e.var(f"tl.floor({a} / {b}).to({_TL[dtype]})"), dtype)
    if mode == "trunc":
        return Val(e.var(f"({a} // {b}).to({_TL[dtype]})"), dtype)  # (Triton's // truncates, as C)
    return _floordiv_int(e, dtype, a, b)


def _floordiv_int(e, dtype, a, b):
    qv = e.var(f"{a} // {b}")  # C division (towards zero), then down where the signs differ and r != 0
    r = e.var(f"{a} - {qv} * {b}")
    fix = f"({r} != 0) & (({r} < 0) != ({b} < 0))"
    return Val(e.var(f"tl.where({fix}, {qv} - 1, {qv}).to({_TL[dtype]})"), dtype)


def _floor_divide(e, node, dtype, vals, kw):
    a, b = (e.cast(v, dtype) for v in vals[:2])
    if dtype.is_floating_point:
        return Val(e.var(f"tl.floor({a} / {b}).to({_TL[dtype]})"), dtype)
    return _floordiv_int(e, dtype, a, b)


def _remainder(e, node, dtype, vals, kw):
    a, b = (e.cast(v, dtype) for v in vals[:2])
    if dtype.is_floating_point:  # Python's: a - floor(a / b) * b, the sign of b
        code = e.var(f"({a} - tl.floor({a} / {b}) * {b}).to({_TL[dtype]})")
        d = None
        if e.with_grad and (_d(vals[0]) or _d(vals[1])):
            d = e.var(f"{_d(vals[0]) or '0.0'} - tl.floor({a} / {b}) * {_d(vals[1]) or '0.0'}")
        return Val(code, dtype, d)
    r = e.var(f"{a} % {b}")  # C remainder (sign of a), then into the sign of b
    fix = f"({r} != 0) & (({r} < 0) != ({b} < 0))"
    return Val(e.var(f"tl.where({fix}, {r} + {b}, {r}).to({_TL[dtype]})"), dtype)


def _compare(sym):
    def rule(e, node, dtype, vals, kw):
        ct = _cmp_dtype(vals[:2])
        a, b = (e.cast(v, ct) for v in vals[:2])
        return Val(e.var(f"{a} {sym} {b}"), torch.bool)

    return rule


def _logical(sym):
    def rule(e, node, dtype, vals, kw):
        a, b = (f"({e.cast(v, torch.bool)} != 0)" for v in vals[:2])
        return Val(e.var(f"{a} {sym} {b}"), torch.bool)

    return rule


def _bitwise(sym):
    def rule(e, node, dtype, vals, kw):
        a, b = (e.cast(v, dtype) for v in vals[:2])
        return Val(e.var(f"({a} {sym} {b}).to({_TL[dtype]})"), dtype)

    return rule


def _not(e, node, dtype, vals, kw):
    x = vals[0]
    if dtype == torch.bool or node.target is aten.logical_not.default:
        return Val(e.var(f"{e.cast(x, torch.bool) if not isinstance(x, Val) else x.code} == 0"), torch.bool)
    return Val(e.var(f"(~{e.cast(x, dtype)}).to({_TL[dtype]})"), dtype)


def _unary(fn, deriv):
    """``fn(x)`` (Triton source, x's code in {x}) and its derivative ``deriv`` in terms of {x}, {y} (the
    result); computed in float32, cast to the result dtype."""

    def rule(e, node, dtype, vals, kw):
        x = vals[0]
        xc = e.cast(x, torch.float32) if dtype.is_floating_point else e.cast(x, dtype)
        y = e.var(f"({fn.format(x=xc)}).to({_TL[dtype]})")
        d = None
        if e.with_grad and _d(x) and deriv is not None:
            d = e.var(f"{_d(x)} * ({deriv.format(x=xc, y=e.cast(Val(y, dtype), torch.float32))})")
        return Val(y, dtype, d)

    return rule


_TANH = "(1.0 - 2.0 / (tl.exp2({x} * 2.8853900817779268) + 1.0))"  # exact limits at +-inf, no intrinsic


def _abs(e, node, dtype, vals, kw):
    x = vals[0]
    xc = e.cast(x, dtype)
    y = e.var(f"tl.abs({xc})")
    d = None
    if e.with_grad and _d(x):
        d = e.var(f"tl.where({xc} > 0, {_d(x)}, tl.where({xc} < 0, -{_d(x)}, 0.0))")  # (sign(0) = 0)
    return Val(y, dtype, d)


def _neg(e, node, dtype, vals, kw):
    x = vals[0]
    return Val(e.var(f"-{e.cast(x, dtype)}"), dtype, e.dmul(x, "-1.0"))


def _pow(e, node, dtype, vals, kw):
    x, c = vals[:2]
    if isinstance(c, Val):
        e.refuse(node, "with a tensor exponent")
    xc = e.cast(x, torch.float32) if dtype.is_floating_point else e.cast(x, dtype)
    if float(c) == int(c) and 0 <= int(c) <= 16:
        n = int(c)
        y = e.var(" * ".join([f"{xc}"] * n) if n else f"{xc} * 0 + 1")
        dy = (f"{n} * " + " * ".join([f"{xc}"] * (n - 1))) if n > 1 else ("1.0" if n == 1 else "0.0")
    elif float(c) == 0.5:
        y = e.var(f"tl.sqrt({xc})")
        dy = f"0.5 / {y}"
    else:
        y = e.var(f"tl.exp2({float(c)!r} * tl.log2({xc}))")
        dy = f"{float(c)!r} * tl.exp2({float(c) - 1.0!r} * tl.log2({xc}))"
    y = e.var(f"({y}).to({_TL[dtype]})")
    d = e.var(f"{_d(x)} * ({dy})") if e.with_grad and _d(x) else None
    return Val(y, dtype, d)


def _where(e, node, dtype, vals, kw):
    c, a, b = vals[:3]
    cc = f"({e.cast(c, torch.bool)} != 0)" if isinstance(c, Val) else _literal(c, torch.bool)
    y = e.var(f"tl.where({cc}, {e.cast(a, dtype)}, {e.cast(b, dtype)})")
    d = None
    if e.with_grad and dtype.is_floating_point and (_d(a) or _d(b)):
        d = e.var(f"tl.where({cc}, {_d(a) or '0.0'}, {_d(b) or '0.0'})")
    return Val(y, dtype, d)


def _minmax(which):
    def rule(e, node, dtype, vals, kw):
        a, b = vals[:2]
        ca, cb = e.cast(a, dtype), e.cast(b, dtype)
        pick = e.var(f"{ca} {'<=' if which == 'min' else '>='} {cb}")
        y = e.var(f"tl.where({pick}, {ca}, {cb})")
        d = None
        if e.with_grad and dtype.is_floating_point and (_d(a) or _d(b)):
            d = e.var(f"tl.where({pick}, {_d(a) or '0.0'}, {_d(b) or '0.0'})")
        return Val(y, dtype, d)

    return rule


def _clamp(e, node, dtype, vals, kw):
    op = node.target
    x = vals[0]
    lo = vals[1] if op in (aten.clamp.default, aten.clamp_min.default, aten.clamp.Tensor) else None
    hi = vals[2] if op in (aten.clamp.default, aten.clamp.Tensor) and len(vals) > 2 else None
    if op is aten.clamp_max.default:
        hi = vals[1]
    xc = e.cast(x, dtype)
    y, keep = xc, []
    if lo is not None:
        y = e.var(f"tl.maximum({y}, {e.cast(lo, dtype)})")
        keep.append(f"({xc} >= {e.cast(lo, dtype)})")
    if hi is not None:
        y = e.var(f"tl.minimum({y}, {e.cast(hi, dtype)})")
        keep.append(f"({xc} <= {e.cast(hi, dtype)})")
    y = e.var(f"({y}).to({_TL[dtype]})")
    d = None
    if e.with_grad and _d(x):
        d = e.var(f"tl.where({' & '.join(keep) or 'True'}, {_d(x)}, 0.0)")
    return Val(y, dtype, d)


def _rsub(e, node, dtype, vals, kw):
    return _binary("-")(e, node, dtype, [vals[1], vals[0]], kw)


_ALIASES = {aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default}
_CONST = {aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.scalar_tensor.default,
          aten.full.default}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}
_RULES = {
    aten.add.Tensor: _binary("+"),
    aten.add.Scalar: _binary("+"),
    aten.sub.Tensor: _binary("-"),
    aten.sub.Scalar: _binary("-"),
    aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _binary("*"),
    aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"),
    aten.div.Scalar: _binary("/"),
    aten.div.Tensor_mode: _div_mode,
    aten.floor_divide.default: _floor_divide,
    aten.remainder.Tensor: _remainder,
    aten.remainder.Scalar: _remainder,
    aten.neg.default: _neg,
    aten.abs.default: _abs,
    aten.exp.default: _unary("tl.exp({x})", "{y}"),
    aten.exp2.default: _unary("tl.exp2({x})", "{y} * 0.6931471805599453"),
    aten.log.default: _unary("tl.log({x})", "1.0 / {x}"),
    aten.log2.default: _unary("tl.log2({x})", "1.4426950408889634 / {x}"),
    aten.sqrt.default: _unary("tl.sqrt({x})", "0.5 / {y}"),
    aten.rsqrt.default: _unary("1.0 / tl.sqrt({x})", "-0.5 * {y} * {y} * {y}"),
    aten.tanh.default: _unary(_TANH, "1.0 - {y} * {y}"),
    aten.sigmoid.default: _unary("1.0 / (1.0 + tl.exp(-{x}))", "{y} * (1.0 - {y})"),
    aten.sin.default: _unary("tl.sin({x})", "tl.cos({x})"),
    aten.cos.default: _unary("tl.cos({x})", "-tl.sin({x})"),
    aten.relu.default: _unary("tl.maximum({x}, 0.0)", "tl.where({x} > 0, 1.0, 0.0)"),
    aten.floor.default: _unary("tl.floor({x})", "0.0"),
    aten.ceil.default: _unary("tl.ceil({x})", "0.0"),
    aten.reciprocal.default: _unary("1.0 / {x}", "-{y} * {y}"),
    aten.pow.Tensor_Scalar: _pow,
    aten.where.self: _where,
    aten.minimum.default: _minmax("min"),
    aten.maximum.default: _minmax("max"),
    aten.clamp.default: _clamp,
    aten.clamp.Tensor: _clamp,
    aten.clamp_min.default: _clamp,
    aten.clamp_max.default: _clamp,
    aten.eq.Tensor: _compare("=="),
    aten.eq.Scalar: _compare("=="),
    aten.ne.Tensor: _compare("!="),
    aten.ne.Scalar: _compare("!="),
    aten.lt.Tensor: _compare("<"),
    aten.lt.Scalar: _compare("<"),
    aten.le.Tensor: _compare("<="),
    aten.le.Scalar: _compare("<="),
    aten.gt.Tensor: _compare(">"),
    aten.gt.Scalar: _compare(">"),
    aten.ge.Tensor: _compare(">="),
    aten.ge.Scalar: _compare(">="),
    aten.logical_and.default: _logical("&"),
    aten.logical_or.default: _logical("|"),
    aten.logical_not.default: _not,
    aten.bitwise_and.Tensor: _bitwise("&"),
    aten.bitwise_or.Tensor: _bitwise("|"),
    aten.bitwise_xor.Tensor: _bitwise("^"),
    aten.bitwise_not.default: _not,
}


def lower(traced: Traced, owner) -> tuple[str, list[torch.Tensor]]:
    """Triton source of ``score_mod(score, b, h, q, kv, off, SM) -> (value, d value / d score)`` (float32,
    score's shape) for a traced mod, and the captured tensors in slot order. The forward uses the value
    alone (the compiler drops the derivative's unused lines). Raises :class:`Unlowerable` (op and line)."""
    e = _Emitter(traced, owner)
    out = e.run()
    body = [f"    {ln}" for ln in e.lines]
    zero = "tl.zeros_like(score).to(tl.float32)"
    body.append(f"    return ({e.cast(out, torch.float32)}) + {zero}, ({out.d or '0.0'}) + {zero}")
    src = "@triton.jit\ndef score_mod(score, b, h, q, kv, off, SM):\n" + "\n".join(body) + "\n"
    return src, e.tensors


def lower_grads(traced: Traced, owner, slots: set) -> str | None:
    """Triton source of ``score_mod_bwd(score, b, h, q, kv, off, SM, ds)``: for every read of a captured
    tensor in ``slots`` (a float tensor that requires grad), ``dC[index] += ds * d(mod)/d(value read)`` by
    atomic adds into the float32 buffer ``SM[7 + slot]`` (contiguous, the tensor's shape: the kernels read
    such tensors contiguous), skipping entries where ``ds`` is 0 (masked, padding); reads whose index is the
    same for the whole tile add the tile's sum once. None when no read needs a gradient."""
    first = _Emitter(traced, owner)
    first.run()
    body = []
    for k, (slot, *_rest) in enumerate(first.loads):
        if slot not in slots:
            continue
        e = _Emitter(traced, owner, prefix=f"g{k}_")
        out = e.run(seed=k)
        if out.d is None:  # (read, but the output does not depend on it smoothly: no gradient)
            continue
        _, offset, ok, scalar, _dtype = e.loads[k]
        body += [f"    {ln}" for ln in e.lines]
        contrib = f"tl.where(ds != 0.0, ds * ({out.d}), 0.0)"
        ptr = f"SM[{7 + slot}]"
        if scalar:
            mask = "" if ok == "True" else f", mask={ok}"
            body.append(f"    tl.atomic_add({ptr} + {offset}, tl.sum(tl.sum({contrib}, 1), 0){mask})")
        else:
            full = f"{offset} + tl.zeros_like(ds).to(tl.int64)"
            body.append(f"    tl.atomic_add({ptr} + ({full}), {contrib}, mask=({ok}) & (ds != 0.0))")
    if not body:
        return None
    return "@triton.jit\ndef score_mod_bwd(score, b, h, q, kv, off, SM, ds):\n" + "\n".join(body) + "\n"
